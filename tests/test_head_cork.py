"""The response head of a whole (content-length) answer leaves in the same write as its body
(api/head_cork.py); a streamed answer's head, a 100 Continue and a HEAD answer are written as before.

Drives the real server protocol (HelixHttpProtocol over uvicorn's cycle) with a transport that records
every write, and the real gateway over a socket for the end-to-end answers."""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from helixagent.api.head_cork import HeadCork
from helixagent.api.server import HelixHttpProtocol, uvicorn_config
from helixagent.config import load_config_dict
from support.servers import GatewayServer


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:  # one call = one write on the wire (uvloop: one writev)
        self.writes.append(b"".join(bytes(p) for p in parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def make_app(kind: str, started: asyncio.Event | None = None):  # noqa: ANN201
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        if kind == "whole":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
            await asyncio.sleep(0.01)  # what the post-hooks do between head and body
            await send({"type": "http.response.body", "body": b'{"ok":true}'})
        elif kind == "stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            assert started is not None
            await started.wait()
            await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif kind == "empty":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
    return app


async def _serve(app: Any, request: bytes, until: Any) -> RecordingTransport:
    cfg = uvicorn_config(app, load_config_dict({}).server, log_level="warning")
    cfg.load()
    state = type("S", (), {"connections": set(), "tasks": set(), "default_headers": [], "total_requests": 0})()
    proto = HelixHttpProtocol(cfg, state, {})
    t = RecordingTransport()
    proto.connection_made(t)
    proto.data_received(request)
    for _ in range(500):
        if until(t):
            break
        await asyncio.sleep(0.005)
    proto.connection_lost(None)
    return t


POST = (b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")


def test_whole_answer_is_one_write() -> None:
    t = asyncio.run(_serve(make_app("whole"), POST, lambda t: any(b'{"ok":true}' in w for w in t.writes)))
    assert len(t.writes) == 1, t.writes
    head, _, body = t.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
    assert body == b'{"ok":true}'


def test_stream_head_is_written_before_the_first_event() -> None:
    async def run() -> RecordingTransport:
        ev = asyncio.Event()
        seen: list[int] = []

        def until(t: RecordingTransport) -> bool:
            if t.writes and not ev.is_set():
                seen.append(len(t.writes))  # the head is on the wire while the app still waits
                ev.set()
            return any(w.endswith(b"0\r\n\r\n") for w in t.writes)
        t = await _serve(make_app("stream", ev), POST, until)
        assert seen == [1] and t.writes[0].startswith(b"HTTP/1.1 200 OK")
        return t
    t = asyncio.run(run())
    assert b"transfer-encoding: chunked" in t.writes[0]
    assert b"data: 1" in b"".join(t.writes[1:])


def test_empty_answer_and_head_request() -> None:
    t = asyncio.run(_serve(make_app("empty"), POST, lambda t: bool(t.writes)))
    assert t.writes and t.writes[0].startswith(b"HTTP/1.1 204")
    head_req = b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n"
    t = asyncio.run(_serve(make_app("whole"), head_req, lambda t: bool(t.writes)))
    assert t.writes and t.writes[0].startswith(b"HTTP/1.1 200") and not t.writes[0].endswith(b"true}")


def test_100_continue_goes_out_before_the_answer() -> None:
    req = (b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")

    async def run() -> RecordingTransport:
        cfg = uvicorn_config(make_app("whole"), load_config_dict({}).server, log_level="warning")
        cfg.load()
        state = type("S", (), {"connections": set(), "tasks": set(), "default_headers": [], "total_requests": 0})()
        proto = HelixHttpProtocol(cfg, state, {})
        t = RecordingTransport()
        proto.connection_made(t)
        proto.data_received(req)
        for _ in range(200):
            if t.writes:
                break
            await asyncio.sleep(0.005)
        assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        proto.data_received(b"{}")
        for _ in range(500):
            if len(t.writes) > 1:
                break
            await asyncio.sleep(0.005)
        proto.connection_lost(None)
        return t
    t = asyncio.run(run())
    assert len(t.writes) == 2 and t.writes[1].startswith(b"HTTP/1.1 200") and t.writes[1].endswith(b'{"ok":true}')


def test_close_with_a_held_head_still_writes_it() -> None:
    t = RecordingTransport()
    cyc = type("C", (), {"response_started": True, "chunked_encoding": False, "expected_content_length": 5,
                         "scope": {"method": "GET"}})()
    cork = HeadCork(t, cyc)
    cork.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    assert t.writes == []
    cork.close()
    assert t.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"] and t.closed


def test_gateway_answers_over_keep_alive(gateway: GatewayServer) -> None:
    """End to end: several whole answers and an error on one keep-alive connection, each complete."""
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        for i in range(3):
            data = body if i != 1 else b'{"model":'
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n" % len(data) + data)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, rest = buf.partition(b"\r\n\r\n")
            n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
            while len(rest) < n:
                rest += s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200" if i != 1 else b"HTTP/1.1 400"), head
            assert len(rest) == n
    r = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"]
