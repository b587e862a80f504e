"""Unit tests of the HTTP edge's per-request shortcuts (api/http.py): the header-name cache, the one-message
body, the response-header name cache and the per-loop waiting list of DisconnectWatch."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from helixagent.api import http
from helixagent.api.http import DisconnectWatch, Request, _hdrs
from helixagent.errors import GatewayError


def _req(headers: list[tuple[bytes, bytes]], messages: list[dict[str, Any]] | None = None) -> Request:
    msgs = list(messages or [])

    async def receive() -> dict[str, Any]:
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(msg: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
             "client": ("127.0.0.1", 1)}
    return Request(scope, receive, send)


def test_header_names_lowercased_and_cached_last_value_wins() -> None:
    for _ in range(2):  # the second pass reads the cached names
        r = _req([(b"Content-Type", b"application/json"), (b"X-Request-ID", b"a"), (b"x-request-id", b"b"),
                  (b"\xc0-Odd", b"\xe9")])
        assert r.headers == {"content-type": "application/json", "x-request-id": "b", "\xe0-odd": "\xe9"}
    assert http._HEADER_NAMES[b"Content-Type"] == "content-type"


def test_header_name_cache_is_bounded() -> None:
    long_name = b"x-" + b"a" * 100
    r = _req([(long_name, b"1")])
    assert r.headers == {long_name.decode(): "1"}
    assert long_name not in http._HEADER_NAMES  # long names are decoded every time, never kept
    saved = dict(http._HEADER_NAMES)
    try:
        for i in range(600):
            _req([(f"x-n{i}".encode(), b"v")])
        assert len(http._HEADER_NAMES) <= 512
        assert _req([(b"X-N599", b"v")]).headers == {"x-n599": "v"}  # past the bound: still right
    finally:
        http._HEADER_NAMES.clear()
        http._HEADER_NAMES.update(saved)


async def test_body_one_message_chunked_too_large_and_disconnect() -> None:
    assert await _req([], [{"type": "http.request", "body": b"abc"}]).body(10) == b"abc"
    assert await _req([], [{"type": "http.request"}]).body(10) == b""
    parts = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"}]
    assert await _req([], parts).body(10) == b"abc"
    with pytest.raises(GatewayError) as e:
        await _req([], [{"type": "http.request", "body": b"x" * 11}]).body(10)
    assert e.value.status == 413
    with pytest.raises(GatewayError) as e:
        await _req([], [{"type": "http.request", "body": b"x" * 6, "more_body": True},
                        {"type": "http.request", "body": b"x" * 6}]).body(10)
    assert e.value.status == 413
    with pytest.raises(asyncio.CancelledError):
        await _req([], [{"type": "http.request", "body": b"ab", "more_body": True},
                        {"type": "http.disconnect"}]).body(10)
    with pytest.raises(asyncio.CancelledError):
        await _req([], [{"type": "http.disconnect"}]).body(10)


def test_response_headers_names_cached_values_made_safe() -> None:
    h = {"x-a": "plain", "x-b": 3, "x-c": "caf\xe9", "x-d": " pad", "x-e": "", "bad name": "v", "x-f": "a\r\nb"}
    for _ in range(2):  # the second pass reads the cached names
        assert _hdrs(h) == [(b"x-a", b"plain"), (b"x-b", b"3"), (b"x-c", b"caf%C3%A9"), (b"x-d", b"%20pad"),
                            (b"x-e", b""), (b"x-f", b"a%0D%0Ab")]
    assert "bad name" not in http._NAME_CACHE


def test_response_header_block_matches_the_pairs_and_keeps_framing_headers_apart() -> None:
    """The pre-encoded block (helixagent.head_block) holds exactly what _hdrs would send, made safe the same
    way; content-length, transfer-encoding and connection go to the server as pairs (they decide framing)."""
    h = {"x-a": "plain", "x-b": 3, "x-c": "caf\xe9", "x-d": " pad", "x-e": "", "bad name": "v", "x-f": "a\r\nb",
         "Connection": "close", "x-g": "a\nset-cookie: x=1"}
    for _ in range(2):  # the second pass reads the cached prefixes
        out: list[tuple[bytes, bytes]] = []
        block = http._hdr_block(h, out)
        pairs = [p for p in _hdrs(h) if p[0].lower() != b"connection"]
        assert block == b"".join(k + b": " + v + b"\r\n" for k, v in pairs)
        assert out == [(b"Connection", b"close")]
        assert b"\r\nb" not in block and b"\nset-cookie" not in block
    assert "bad name" not in http._NAME_CACHE


def test_disconnect_watch_follows_the_running_loop() -> None:
    """Each event loop has its own waiting list, also when loops alternate (the last one is remembered)."""
    seen = []

    async def one() -> None:
        w = DisconnectWatch(_req([]), lambda _: None, None)
        assert w.waiting is not None and w.waiting.loop is asyncio.get_running_loop()
        assert w.task is asyncio.current_task()
        seen.append(w.waiting)
        w.stop()
        assert w.waiting is None and not seen[-1].since

    for _ in range(3):
        asyncio.run(one())
    assert len({id(w) for w in seen}) == 3
