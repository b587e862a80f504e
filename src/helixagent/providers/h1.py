"""A small HTTP/1.1 client on the event loop: keep-alive connection pools for the upstream providers.

Why not a library client: measured side by side (README, "Hot-path dependencies"), a client running on the
gateway's own event loop -- asyncio protocols, httptools (llhttp, the parser uvicorn uses) for responses --
costs 60-70 µs less CPU per request than pyreqwest at the gateway's load, because pyreqwest completes every
request on its own runtime thread and hands it back across threads (a wake-up, a GIL hand-off and a
context switch per request on a busy core).  aiohttp's client, the other candidate, was slower than
pyreqwest.  What an LLM upstream needs is small: POST and GET, a request body of known length, responses
of any framing (content-length, chunked, to the end of the connection), TLS, keep-alive.

* One :class:`Pool` per provider; connections are reused last-in first-out, at most ``max_idle`` kept,
  closed after ``idle_timeout`` unused.  A request that finds its reused connection closed by the server
  before a single response byte arrived is sent again once on a new connection (the server never read it).
* Timeouts: ``connect`` bounds connecting (and the TLS handshake); ``read`` bounds every wait for upstream
  bytes (the response head and each later read, not while the gateway itself paused reading); ``total``,
  when given, bounds a whole exchange.  One timer per connection, moved only when it fires early (a new
  exchange's deadline is later than the last one's) or must fire earlier: a kept-alive request costs no
  timer operations.
* A cancelled request closes its connection at once: the upstream sees the client leave.
* Flow control: a streamed response that the gateway does not read fast enough pauses the socket past
  ``_HIGH`` buffered bytes and resumes once drained.
* No compression is asked for; a ``gzip``/``deflate`` answer is decoded anyway, any other encoding is an error.
* TCP_NODELAY on every connection (one write per request; nothing waits for a delayed ACK).
* Header names and values are checked: a CR, LF or NUL in either is refused before anything is sent.
* Outbound proxies from the environment, as curl and reqwest read them: ``HTTPS_PROXY`` / ``HTTP_PROXY``
  (``http://[user:password@]host:port``), ``NO_PROXY`` to bypass.  An ``https`` upstream goes through a
  ``CONNECT`` tunnel (TLS end to end, verified against the upstream's name); a plain ``http`` one is sent to
  the proxy in absolute form.  Read once per upstream URL, at its first request.
"""
from __future__ import annotations

import asyncio
import base64
import math
import socket
import ssl
import zlib
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

_HIGH = 256 * 1024  # buffered bytes of a streamed response past which the socket is paused


class UpstreamTimeout(Exception):
    """No answer (or no next byte of it) within the timeout."""


class UpstreamBroken(Exception):
    """The connection failed: refused, reset, closed early, or an answer that is not HTTP."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail   # the gateway's own words (never an upstream's text, never a secret)


class BadRequestHeaders(ValueError):
    """A header name or value the gateway will not put on the wire (CR, LF or NUL in it)."""


_SSL: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL
    if _SSL is None:
        _SSL = ssl.create_default_context()
        _SSL.set_alpn_protocols(["http/1.1"])
    return _SSL


class Proxy:
    """An outbound HTTP proxy: where to connect and the credentials to present."""

    __slots__ = ("host", "port", "auth")

    def __init__(self, host: str, port: int, auth: str | None):
        self.host, self.port, self.auth = host, port, auth


def proxy_for(scheme: str, host: str) -> Proxy | None:
    """The proxy the environment names for ``scheme://host`` (None: connect directly)."""
    import urllib.request   # here, not at import: it pulls in http.client and email (RSS), once per upstream URL
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]  # not in typeshed
        return None
    u = urlsplit(url if "://" in url else f"http://{url}")
    if u.scheme != "http" or not u.hostname:
        raise UpstreamBroken("ProxyError", f"unsupported proxy URL in {scheme.upper()}_PROXY (only http://host:port)")
    auth = None
    if u.username is not None:
        cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
        auth = "Basic " + base64.b64encode(cred).decode("ascii")
    return Proxy(u.hostname, u.port or 80, auth)


class Origin:
    """Where one URL's requests go: scheme, host, port, the request target, and the proxy on the way."""

    __slots__ = ("tls", "host", "port", "target", "host_header", "key", "proxy", "extra")

    def __init__(self, url: str):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UpstreamBroken("InvalidURL", f"not an http(s) URL: {u.scheme or '?'}://{u.hostname or '?'}")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        default = 443 if self.tls else 80
        h = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = h if self.port == default else f"{h}:{self.port}"
        self.proxy = p = proxy_for(u.scheme, self.host)
        self.extra = ""   # request header lines the proxy needs (plain http through a proxy)
        if p is not None and not self.tls:
            self.target = f"http://{self.host_header}{self.target}"   # absolute form: the proxy forwards it
            if p.auth:
                self.extra = f"proxy-authorization: {p.auth}\r\n"
        self.key = (self.tls, self.host, self.port) if p is None else (self.tls, self.host, self.port, p.host, p.port)


def encode_request(method: str, origin: Origin, headers: dict[str, str], body: bytes | None) -> bytes:
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    n = len(headers)
    if lines.count("\n") != n or lines.count("\r") != n or "\x00" in lines:
        raise BadRequestHeaders("a header name or value holds CR, LF or NUL")
    head = f"{method} {origin.target} HTTP/1.1\r\nhost: {origin.host_header}\r\n{origin.extra}{lines}"
    if body is None:
        return (head + "\r\n").encode("latin-1")
    return b"".join(((head + f"content-length: {len(body)}\r\n\r\n").encode("latin-1"), body))


class Exchange:
    """One request's answer as it arrives: status, headers, body chunks, the end or the error."""

    __slots__ = ("conn", "loop", "status", "raw_headers", "chunks", "buffered", "head_done", "done", "got_bytes",
                 "error", "waiter", "deadline", "read_timeout", "last_io", "framed", "decoder", "_hdrs")

    def __init__(self, conn: "Conn", read_timeout: float, total: float | None):
        self.conn: Conn | None = conn
        self.loop: Any = conn.loop
        loop = self.loop
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.head_done = False
        self.done = False
        self.got_bytes = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.framed = False        # content-length or chunked: the end is in the message, not at EOF
        self.decoder: Any = None
        self._hdrs: dict[str, str] | None = None
        now = loop.time()
        self.last_io = now
        self.read_timeout = read_timeout
        self.deadline = now + total if total is not None else math.inf
        conn.arm(min(self.deadline, now + read_timeout))

    def header(self, name: str) -> str | None:
        h = self._hdrs
        if h is None:
            h = self._hdrs = {}
            for k, v in self.raw_headers:
                ks = k.decode("latin-1").lower()
                vs = v.decode("latin-1")
                h[ks] = f"{h[ks]}, {vs}" if ks in h else vs
        return h.get(name.lower())

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def complete(self) -> None:
        self.done = True
        self.conn = None
        self.wake()

    def fail(self, exc: BaseException) -> None:
        """End the exchange with an error and close its connection (it cannot carry another request)."""
        if self.done:
            return
        self.error = exc
        self.done = True
        c, self.conn = self.conn, None
        if c is not None:
            c.abort()
        self.wake()

    async def wait(self) -> None:
        """Until something new happened (head, a body chunk, the end, an error)."""
        w = self.waiter = self.loop.create_future()
        await w

    def take(self) -> bytes:
        """Everything buffered so far, as one bytes object; resumes a paused socket."""
        c = self.chunks
        data = c.popleft() if len(c) == 1 else b"".join(c)
        c.clear()
        self.buffered = 0
        conn = self.conn
        if conn is not None and conn.paused:
            self.last_io = self.loop.time()
            conn.resume()
        return data

    def finish(self) -> None:
        """The caller is done with this exchange.  Unfinished (cancelled, abandoned): close the connection."""
        if not self.done:
            self.fail(UpstreamBroken("Cancelled"))


class Conn(asyncio.Protocol):
    """One connection and the exchange it is carrying (HTTP/1.1, no pipelining)."""

    def __init__(self, pool: "Pool", key: tuple[Any, ...]):
        self.pool = pool
        self.key = key
        self.loop = pool.loop
        self.transport: Any = None   # Any: uvloop's transports are not asyncio's classes
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.idle_since = 0.0
        self.paused = False
        self.timer: asyncio.TimerHandle | None = None  # the deadline of the exchange it carries (see arm)
        self.timer_at = 0.0

    # -- the exchange's deadline -------------------------------------------------------------------------
    def arm(self, due: float) -> None:
        """The current exchange must not wait past ``due``: the timer stays when it fires before that (it
        then moves on), and is moved earlier only when it would fire too late."""
        t = self.timer
        if t is None or self.timer_at > due:
            if t is not None:
                t.cancel()
            self.timer_at = due
            self.timer = self.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self.timer = None
        ex = self.ex
        if ex is None or ex.done:  # idle (or between exchanges): the next exchange arms it again
            return
        now = self.loop.time()
        due = ex.deadline if self.paused else min(ex.deadline, ex.last_io + ex.read_timeout)
        if now >= due:
            ex.fail(UpstreamTimeout())
        else:
            self.timer_at = due
            self.timer = self.loop.call_at(due, self._tick)

    def _disarm(self) -> None:
        t = self.timer
        if t is not None:
            self.timer = None
            t.cancel()

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # no Nagle on an upstream connection, whichever event loop runs it (uvloop and asyncio both set it
        # today; said here so that a request's bytes never wait for an ACK of the last ones)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:   # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        ex.got_bytes = True
        ex.last_io = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            ex.fail(UpstreamBroken("RemoteProtocolError", f"not a valid HTTP answer ({type(exc).__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._disarm()
        self.pool.forget(self)
        ex, self.ex = self.ex, None
        if ex is not None and not ex.done:
            ex.conn = None
            if ex.head_done and not ex.framed and ex.error is None:
                ex.complete()   # an answer delimited by the end of the connection
            else:
                ex.fail(UpstreamBroken(type(exc).__name__ if exc else "RemoteDisconnected",
                                       "the upstream closed the connection"))

    # -- httptools callbacks -----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.ex is None:   # a second answer in the bytes after the first: the connection cannot be trusted
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        ex.raw_headers.append((name, value))
        ln = name.lower()
        if ln == b"content-length" or (ln == b"transfer-encoding" and b"chunked" in value.lower()):
            ex.framed = True
        elif ln == b"content-encoding":
            v = value.strip().lower()
            if v in (b"gzip", b"x-gzip", b"deflate"):
                ex.decoder = zlib.decompressobj(47)   # gzip or zlib, told apart by the header
            elif v not in (b"", b"identity"):
                ex.error = UpstreamBroken("UnsupportedEncoding", f"content-encoding {v.decode('latin-1')!r}")

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            return
        ex.status = status = self.parser.get_status_code()
        if 100 <= status < 200:   # an interim answer (100 Continue, 103 Early Hints): the real one follows
            ex.raw_headers = []
            ex.framed = False
            ex.decoder = None
            return
        if ex.error is not None:
            err, ex.error = ex.error, None
            ex.fail(err)
            return
        ex.head_done = True
        ex.wake()

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None or ex.done:
            return
        if ex.decoder is not None:
            try:
                body = ex.decoder.decompress(body)
            except zlib.error:
                ex.fail(UpstreamBroken("DecodeError", "a compressed body that does not decode"))
                return
            if not body:
                return
        ex.chunks.append(body)
        ex.buffered += len(body)
        if ex.buffered > _HIGH and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        ex.wake()

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is None or 100 <= ex.status < 200:
            return
        if ex.decoder is not None:
            tail = ex.decoder.flush()
            if tail:
                ex.chunks.append(tail)
                ex.buffered += len(tail)
        keep = self.parser.should_keep_alive()
        self.ex = None
        ex.complete()
        if keep and self.transport is not None:
            self.pool.release(self)
        else:
            self.abort()

    # -- control ---------------------------------------------------------------------------------------
    def start(self, data: bytes, read_timeout: float, total: float | None) -> Exchange:
        ex = self.ex = Exchange(self, read_timeout, total)
        assert self.transport is not None
        self.transport.write(data)
        return ex

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            self.transport = None
            t.abort()
        self._disarm()
        self.pool.forget(self)


class Pool:
    """Keep-alive connections to the origins of one provider."""

    def __init__(self, connect_timeout: float, max_idle: int, idle_timeout: float):
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: dict[tuple[Any, ...], list[Conn]] = {}
        self.origins: dict[str, Origin] = {}
        self.active: set[Conn] = set()
        self.loop: Any = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def origin(self, url: str) -> Origin:
        o = self.origins.get(url)
        if o is None:
            o = Origin(url)
            if len(self.origins) < 256:   # a provider's URLs are few; never grow without bound
                self.origins[url] = o
        return o

    async def connect(self, o: Origin) -> Conn:
        p = o.proxy
        loop: asyncio.AbstractEventLoop = self.loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                if p is None:
                    _, conn = await loop.create_connection(
                        lambda: Conn(self, o.key), o.host, o.port, ssl=_ssl_context() if o.tls else None,
                        server_hostname=o.host if o.tls else None)
                elif o.tls:
                    sock = await self._tunnel(o, p)
                    _, conn = await loop.create_connection(
                        lambda: Conn(self, o.key), sock=sock, ssl=_ssl_context(), server_hostname=o.host)
                else:
                    _, conn = await loop.create_connection(lambda: Conn(self, o.key), p.host, p.port)
        except TimeoutError:
            raise UpstreamTimeout() from None
        except ssl.SSLError as exc:
            raise UpstreamBroken("TLSError", exc.reason or type(exc).__name__) from None
        except OSError as exc:
            raise UpstreamBroken("ConnectError", exc.strerror or type(exc).__name__) from None
        if self.closed:
            conn.abort()
            raise UpstreamBroken("ClientClosed")
        self.active.add(conn)
        return conn

    async def _tunnel(self, o: Origin, p: Proxy) -> socket.socket:
        """A TCP connection to ``o`` through the proxy ``p`` (HTTP CONNECT), ready for TLS."""
        loop = self.loop
        family, kind, proto, _, addr = (await loop.getaddrinfo(p.host, p.port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            hp = f"[{o.host}]:{o.port}" if ":" in o.host else f"{o.host}:{o.port}"
            auth = f"proxy-authorization: {p.auth}\r\n" if p.auth else ""
            await loop.sock_sendall(sock, f"CONNECT {hp} HTTP/1.1\r\nhost: {hp}\r\n{auth}\r\n".encode("latin-1"))
            head = b""
            while b"\r\n\r\n" not in head:
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    raise UpstreamBroken("ProxyError", "the proxy closed the connection during CONNECT")
                head += data
                if len(head) > 16384:
                    raise UpstreamBroken("ProxyError", "the proxy's answer to CONNECT is too large")
            line = head.split(b"\r\n", 1)[0].split(None, 2)
            code = int(line[1]) if len(line) > 1 and line[1].isdigit() else 0
            if not line[0].startswith(b"HTTP/1.") or code // 100 != 2:
                raise UpstreamBroken("ProxyError", f"the proxy refused the tunnel (status {code or '?'})")
            if not head.endswith(b"\r\n\r\n"):   # bytes before the TLS handshake: not a tunnel to trust
                raise UpstreamBroken("ProxyError", "the proxy sent data after its answer to CONNECT")
        except BaseException:
            sock.close()
            raise
        return sock

    def checkout(self, o: Origin) -> Conn | None:
        idle = self.idle.get(o.key)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            c = idle.pop()
            t = c.transport
            if t is not None and not t.is_closing() and now - c.idle_since < self.idle_timeout:
                self.active.add(c)
                return c
            c.abort()
        return None

    def release(self, c: Conn) -> None:
        """An exchange completed on ``c`` and the connection may carry the next one."""
        self.active.discard(c)
        idle = self.idle.setdefault(c.key, [])
        if self.closed or len(idle) >= self.max_idle:
            c.abort()
            return
        c.resume()
        c.idle_since = self.loop.time()
        idle.append(c)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout, self._sweep)

    def forget(self, c: Conn) -> None:
        self.active.discard(c)
        idle = self.idle.get(c.key)
        if idle and c in idle:
            idle.remove(c)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        left = False
        for idle in list(self.idle.values()):
            for c in [c for c in idle if now - c.idle_since >= self.idle_timeout]:
                c.abort()
            left = left or bool(idle)
        if left and not self.closed:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in list(self.idle.values()):
            for c in list(idle):
                c.abort()
        for c in list(self.active):
            c.abort()
        self.idle.clear()

    # -- one exchange ------------------------------------------------------------------------------------
    async def open(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                   read_timeout: float, total: float | None) -> Exchange:
        """Send a request; return its exchange once the response head has arrived."""
        o = self.origin(url)
        data = encode_request(method, o, headers, body)
        for attempt in (0, 1):
            c = self.checkout(o)
            reused = c is not None
            if c is None:
                c = await self.connect(o)
            ex = c.start(data, read_timeout, total)
            try:
                while not ex.head_done and not ex.done:
                    await ex.wait()
            except BaseException:
                ex.finish()
                raise
            if ex.head_done:
                return ex
            err = ex.error
            if attempt == 0 and reused and isinstance(err, UpstreamBroken) and not ex.got_bytes:
                continue   # a kept-alive connection the server had closed: it never saw the request
            assert err is not None
            raise err
        raise AssertionError("unreachable")


async def read_all(ex: Exchange) -> bytes:
    """The rest of an answer's body."""
    try:
        while not ex.done:
            await ex.wait()
    except BaseException:
        ex.finish()
        raise
    if ex.error is not None:
        raise ex.error
    return ex.take() if ex.chunks else b""

