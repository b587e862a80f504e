"""The upstream HTTP/1.1 client (providers/h1.py, behind providers/http.py) against hostile raw-socket servers.

Each server here is a plain asyncio socket server that answers with exactly the bytes a test gives it, so
framing, resets, stalls, trickles, compression, interim answers, garbage and TLS are exercised on the wire.
"""
from __future__ import annotations

import asyncio
import gzip
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from helixagent.config import HTTPConfig, ProviderConfig
from helixagent.errors import GatewayError
from helixagent.providers import h1
from helixagent.providers.http import UpstreamHTTP

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]


class Raw:
    """A socket server: every connection runs ``handler``; counts connections and what was received."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None):
        self.handler, self.tls = handler, tls
        self.conns = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.state: dict[str, Any] = {}

    async def __aenter__(self) -> "Raw":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1/chat/completions"

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns += 1
        try:
            await self.handler(r, w, self.state)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def read_request(self, r: asyncio.StreamReader) -> bytes:
        head = await r.readuntil(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        req = head + (await r.readexactly(n) if n else b"")
        self.requests.append(req)
        return req


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), extra, body)


def client(timeout_ms: int = 5000, first_byte_ms: int | None = None, **http: Any) -> UpstreamHTTP:
    p = ProviderConfig(name="up", type="openai", base_url="http://x", timeout_ms=timeout_ms,
                       first_byte_timeout_ms=first_byte_ms)
    return UpstreamHTTP(p, HTTPConfig(**http))


HDRS = {"authorization": "Bearer sk-test", "content-type": "application/json"}


async def test_keep_alive_reuses_one_connection_and_sends_exact_bytes() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            await srv.read_request(r)
            w.write(ok(b'{"a":1}', b"x-thing: A\r\nX-Thing: B\r\n"))
            await w.drain()

    async with Raw(h) as srv:
        c = client()
        for i in range(5):
            status, headers, body = await c.post(srv.url, b'{"n":%d}' % i, HDRS)
            assert (status, body) == (200, b'{"a":1}')
            assert headers.get("X-THING") == "A, B" and headers.get("content-type") == "application/json"
            assert "missing" not in headers and headers.get("missing", "d") == "d"
        assert srv.conns == 1
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n" % srv.port)
        assert b"authorization: Bearer sk-test\r\n" in first and first.endswith(b"content-length: 7\r\n\r\n{\"n\":0}")
        assert b"accept-encoding" not in first.lower()
        await c.close()


def test_upstream_connections_have_tcp_nodelay_on_asyncio_and_uvloop() -> None:
    import socket

    import uvloop

    async def run() -> None:
        async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
            while True:
                await srv.read_request(r)
                w.write(ok(b"{}"))
                await w.drain()

        async with Raw(h) as srv:
            c = client()
            assert (await c.post(srv.url, b"{}", HDRS))[0] == 200
            conns = [conn for idle in c.pool().idle.values() for conn in idle]
            assert len(conns) == 1 and conns[0].transport is not None
            sock = conns[0].transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            await c.close()

    asyncio.run(run())
    uvloop.run(run())


async def test_chunked_and_eof_delimited_answers() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            req = await srv.read_request(r)
            if b'"eof"' in req:   # no length, no chunking: the body ends with the connection
                w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{\"eof\":")
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(b"true}")
                return
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"c\r\n5\r\nh\":1}\r\n0\r\n\r\n")
            await w.drain()

    async with Raw(h) as srv:
        c = client()
        assert (await c.post(srv.url, b'"chunked"', HDRS))[2] == b'{"ch":1}'
        assert (await c.post(srv.url, b'"eof"', HDRS))[2] == b'{"eof":true}'
        await c.close()


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once_on_a_new_one() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        w.write(ok(b"{}"))
        await w.drain()
        # keep-alive was not refused, but the server drops the idle connection right away
        w.transport.abort()

    async with Raw(h) as srv:
        c = client()
        assert (await c.post(srv.url, b"{}", HDRS))[0] == 200
        await asyncio.sleep(0.05)
        assert (await c.post(srv.url, b"{}", HDRS))[0] == 200
        assert srv.conns == 2 and len(srv.requests) == 2
        await c.close()


async def test_reset_after_the_request_was_read_is_not_retried() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        w.transport.abort()

    async with Raw(h) as srv:
        c = client()
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b"{}", HDRS)
        assert ei.value.status == 502 and ei.value.code == "upstream_connection_error" and ei.value.retryable
        assert len(srv.requests) == 1   # a new connection's failure is never resent: the upstream may have acted
        await c.close()


async def test_cut_mid_body_is_a_connection_error_and_mid_stream_a_stream_error() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                b"a\r\ndata: {}\n\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.transport.abort()

    async with Raw(h) as srv:
        c = client()
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b"{}", HDRS)
        assert ei.value.code == "upstream_connection_error"
        resp = await c.open_stream(srv.url, b"{}", HDRS)
        assert resp.status == 200 and resp.headers.get("content-type") == "text/event-stream"
        got = []
        with pytest.raises(GatewayError) as ei:
            async for ch in resp.chunks():
                got.append(ch)
        assert got == [b"data: {}\n\n"]
        assert ei.value.code == "upstream_stream_error" and "stream broke" in ei.value.message
        await c.close()


async def test_no_head_within_the_read_timeout_is_504_and_the_connection_is_closed() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        await r.read()   # never answers; returns when the client hangs up
        srv.closed_by_peer.set()

    async with Raw(h) as srv:
        c = client(timeout_ms=5000, first_byte_ms=200)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b"{}", HDRS)
        took = asyncio.get_running_loop().time() - t0
        assert ei.value.status == 504 and ei.value.code == "upstream_timeout" and 0.15 < took < 1.5
        await asyncio.wait_for(srv.closed_by_peer.wait(), 2)
        await c.close()


async def test_a_trickle_is_bounded_by_the_total_timeout_and_a_stall_by_the_read_timeout() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        req = await srv.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        await w.drain()
        stall = b"stall" in req
        for _ in range(100):
            await asyncio.sleep(0.1 if not stall else 1.0)
            w.write(b"7\r\ndata:\n\n\r\n")
            await w.drain()

    async with Raw(h) as srv:
        c = client(timeout_ms=600, first_byte_ms=300)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(GatewayError) as ei:   # a byte every 100 ms never trips the read timeout ...
            await c.post(srv.url, b"{}", HDRS)
        took = asyncio.get_running_loop().time() - t0
        assert ei.value.status == 504 and 0.5 < took < 1.5   # ... but the whole exchange is bounded
        resp = await c.open_stream(srv.url, b'"stall"', HDRS)   # a stream has no total bound: only stalls
        with pytest.raises(GatewayError) as ei:
            async for _ in resp.chunks():
                pass
        assert ei.value.status == 504 and "stalled mid-stream" in ei.value.message
        await c.close()


async def test_kept_alive_requests_arm_no_timer_and_a_stall_on_a_reused_connection_still_times_out() -> None:
    """One timer per connection: requests on a kept-alive connection reuse it (no call_at per request), and
    a request that stalls on that connection after many quick ones still fails at its read timeout."""
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            req = await srv.read_request(r)
            if b"stall" in req:
                await r.read()
                return
            w.write(ok(b'{"a":1}'))
            await w.drain()

    async with Raw(h) as srv:
        loop = asyncio.get_running_loop()
        c = client(timeout_ms=5000, first_byte_ms=1000)
        await c.post(srv.url, b"{}", HDRS)   # the connection and its timer
        conn = next(iter(c.pool().idle.values()))[-1]
        timer = conn.timer
        assert timer is not None
        for _ in range(20):
            assert (await c.post(srv.url, b"{}", HDRS))[0] == 200
        assert conn.timer is timer and srv.conns == 1   # the same timer: nothing armed or cancelled per request
        t0 = loop.time()
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b'"stall"', HDRS)
        took = loop.time() - t0
        assert ei.value.status == 504 and 0.9 < took < 3.0
        assert conn.timer is None and conn.transport is None   # closed, its timer gone with it
        await c.close()


async def test_gzip_is_decoded_and_an_unknown_encoding_refused() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            req = await srv.read_request(r)
            if b'"br"' in req:
                w.write(ok(b"\x00\x01", b"content-encoding: br\r\n"))
            else:
                w.write(ok(gzip.compress(b'{"zipped":true}' * 100), b"content-encoding: gzip\r\n"))
            await w.drain()

    async with Raw(h) as srv:
        c = client()
        assert (await c.post(srv.url, b"{}", HDRS))[2] == b'{"zipped":true}' * 100
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b'"br"', HDRS)
        assert "UnsupportedEncoding" in ei.value.message
        await c.close()


async def test_interim_100_continue_then_the_answer() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"x":2}'))
        await w.drain()
        await r.read()

    async with Raw(h) as srv:
        c = client()
        assert (await c.post(srv.url, b"{}", HDRS))[::2] == (200, b'{"x":2}')
        await c.close()


async def test_garbage_and_unsolicited_bytes() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        req = await srv.read_request(r)
        if b'"garbage"' in req:
            w.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        else:   # a valid answer followed by bytes nobody asked for: the connection is not reused
            w.write(ok(b"{}") + b"HTTP/1.1 200 OK\r\n")
        await w.drain()
        await r.read()

    async with Raw(h) as srv:
        c = client()
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b'"garbage"', HDRS)
        assert ei.value.code == "upstream_connection_error" and "RemoteProtocolError" in ei.value.message
        assert (await c.post(srv.url, b"{}", HDRS))[2] == b"{}"
        assert (await c.post(srv.url, b"{}", HDRS))[2] == b"{}"
        assert srv.conns == 3
        await c.close()


@pytest.mark.parametrize("name,value", [("x-evil", "a\r\nx-injected: 1"), ("x-evil\r\nx-injected", "1"),
                                        ("x-evil", "a\nb"), ("x-evil", "a\x00b")])
async def test_header_injection_is_refused_before_anything_is_sent(name: str, value: str) -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)

    async with Raw(h) as srv:
        c = client()
        with pytest.raises(GatewayError) as ei:
            await c.post(srv.url, b"{}", {**HDRS, name: value})
        assert ei.value.status == 502 and "BadRequestHeaders" in ei.value.message
        assert srv.conns == 0 and srv.requests == []
        await c.close()


async def test_cancelling_closes_the_upstream_connection_at_once() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        await r.read()
        srv.closed_by_peer.set()

    async with Raw(h) as srv:
        c = client()
        task = asyncio.ensure_future(c.post(srv.url, b"{}", HDRS))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.closed_by_peer.wait(), 1)
        await c.close()


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    piece = b"data: " + b"x" * 4090 + b"\n\n"   # 4 KiB events, 64 MiB in all

    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
                % (len(piece) * 16384))
        for _ in range(16384):
            w.write(piece)
            await w.drain()

    async with Raw(h) as srv:
        c = client(first_byte_ms=2000)
        resp = await c.open_stream(srv.url, b"{}", HDRS)
        n = peak = 0
        async for ch in resp.chunks():
            n += len(ch)
            peak = max(peak, len(ch))
            await asyncio.sleep(0)   # the consumer yields: the socket keeps delivering between reads
        assert n == len(piece) * 16384
        assert peak <= h1._HIGH + 256 * 1024   # never much more than the high-water mark buffered
        await c.close()


async def test_idle_connections_are_closed_after_the_idle_timeout() -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        await srv.read_request(r)
        w.write(ok(b"{}"))
        await w.drain()
        await r.read()
        srv.closed_by_peer.set()

    async with Raw(h) as srv:
        c = client(idle_conn_timeout=0.2)
        await c.post(srv.url, b"{}", HDRS)
        await asyncio.wait_for(srv.closed_by_peer.wait(), 2)
        await c.close()


async def test_connect_refused_is_a_retryable_502() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    c = client()
    with pytest.raises(GatewayError) as ei:
        await c.post(f"http://127.0.0.1:{port}/v1/x", b"{}", HDRS)
    assert ei.value.status == 502 and "ConnectError" in ei.value.message and ei.value.retryable
    await c.close()


async def test_tls_verified_against_the_trusted_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_tls_probes import make_pki
    ca, cert, key = make_pki(tmp_path)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)

    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            await srv.read_request(r)
            w.write(ok(b'{"tls":1}'))
            await w.drain()

    async with Raw(h, tls=sctx) as srv:
        monkeypatch.setattr(h1, "_SSL", None)
        c = client()
        with pytest.raises(GatewayError) as ei:   # an unknown CA: refused
            await c.post(srv.url, b"{}", HDRS)
        assert "TLSError" in ei.value.message or "ConnectError" in ei.value.message
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))   # OpenSSL's own variable for the trusted roots
        monkeypatch.setattr(h1, "_SSL", None)
        c2 = client()
        assert (await c2.post(srv.url, b"{}", HDRS))[2] == b'{"tls":1}'
        assert (await c2.post(srv.url, b"{}", HDRS))[2] == b'{"tls":1}'
        assert srv.conns == 1   # (the refused handshake never reached the handler) one kept-alive TLS connection
        await c.close()
        await c2.close()


class Proxy:
    """An HTTP proxy: CONNECT tunnels and absolute-form requests, piped both ways; remembers each request head."""

    def __init__(self, refuse: int | None = None):
        self.heads: list[bytes] = []
        self.refuse = refuse

    async def __aenter__(self) -> "Proxy":
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            head = await r.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            if self.refuse:
                w.write(b"HTTP/1.1 %d No\r\ncontent-length: 0\r\n\r\n" % self.refuse)
                await w.drain()
                return
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if method == b"CONNECT":
                host, port = target.rsplit(b":", 1)
                ur, uw = await asyncio.open_connection(host.decode(), int(port))
                w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await w.drain()
            else:   # absolute form: forward the head as it came
                u = target.split(b"/")[2]
                host, port = u.rsplit(b":", 1)
                ur, uw = await asyncio.open_connection(host.decode(), int(port))
                uw.write(head)

            async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
                b.close()
            await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


def _clear_proxies(mp: pytest.MonkeyPatch) -> None:
    for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        mp.delenv(k, raising=False)


async def test_https_through_a_connect_proxy_with_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_tls_probes import make_pki
    ca, cert, key = make_pki(tmp_path)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(cert, key)

    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            await srv.read_request(r)
            w.write(ok(b'{"via":"tunnel"}'))
            await w.drain()

    async with Raw(h, tls=sctx) as srv, Proxy() as px:
        _clear_proxies(monkeypatch)
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        monkeypatch.setenv("HTTPS_PROXY", f"http://us%40er:p%3Aw@127.0.0.1:{px.port}")
        monkeypatch.setattr(h1, "_SSL", None)
        c = client()
        for _ in range(3):
            assert (await c.post(srv.url, b"{}", HDRS))[2] == b'{"via":"tunnel"}'
        assert len(px.heads) == 1   # one tunnel, kept alive
        head = px.heads[0]
        assert head.startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n" % srv.port)
        import base64
        assert b"proxy-authorization: Basic " + base64.b64encode(b"us@er:p:w") in head
        # the upstream saw a normal origin-form request, never the proxy's credentials
        assert srv.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert all(b"proxy-authorization" not in r for r in srv.requests)
        await c.close()


async def test_plain_http_through_a_proxy_and_no_proxy_bypass(monkeypatch: pytest.MonkeyPatch) -> None:
    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, st: dict[str, Any]) -> None:
        while True:
            await srv.read_request(r)
            w.write(ok(b"{}"))
            await w.drain()

    async with Raw(h) as srv, Proxy() as px:
        _clear_proxies(monkeypatch)
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{px.port}")
        c = client()
        assert (await c.post(srv.url, b"{}", HDRS))[0] == 200
        assert px.heads[0].startswith(b"POST http://127.0.0.1:%d/v1/chat/completions HTTP/1.1\r\n" % srv.port)
        await c.close()
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        c2 = client()
        assert (await c2.post(srv.url, b"{}", HDRS))[0] == 200
        assert len(px.heads) == 1   # bypassed: straight to the upstream
        await c2.close()


async def test_a_proxy_refusing_the_tunnel_is_a_502_naming_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async with Proxy(refuse=407) as px:
        _clear_proxies(monkeypatch)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{px.port}")
        c = client()
        with pytest.raises(GatewayError) as ei:
            await c.post("https://api.example.invalid/v1/chat/completions", b"{}", HDRS)
        assert ei.value.status == 502 and "ProxyError" in ei.value.message and ei.value.retryable
        assert px.heads[0].startswith(b"CONNECT api.example.invalid:443 HTTP/1.1\r\n")
        await c.close()
        monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
        c2 = client()
        with pytest.raises(GatewayError) as ei:
            await c2.post("https://api.example.invalid/v1/chat/completions", b"{}", HDRS)
        assert "unsupported proxy URL" in ei.value.message
        await c2.close()
