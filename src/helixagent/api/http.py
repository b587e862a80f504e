"""Minimal ASGI plumbing: the request object, body reading with a size limit, JSON and SSE responses.

A plain ASGI application (no framework) keeps the request path short; see README, "Design"."""
from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar
from urllib.parse import parse_qs, quote

import orjson

from ..errors import GatewayError
from .forwarded import ForwardedFor

_PEER_ONLY = ForwardedFor(())  # trust_forwarded=True: the immediate peer is the one trusted proxy

log = logging.getLogger("helixagent.http")

_REQ_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
JSON_CT = (b"content-type", b"application/json")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


# Request header names as the server hands them over (bytes) -> the lowercased str the request uses:
# the same few names arrive on every request, so each is decoded and lowercased once.
_HEADER_NAMES: dict[bytes, str] = {}


HEAD_BLOCK = "helixagent.head_block"  # the server takes pre-encoded header lines (api/protocol.py)


class Request:
    __slots__ = ("scope", "receive", "send", "method", "path", "headers", "_query", "ip", "head_block")

    def __init__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                 send: Callable[..., Awaitable[Any]], trust_forwarded: "ForwardedFor | bool | None" = None):
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        headers: dict[str, str] = {}
        names = _HEADER_NAMES
        for k, v in scope["headers"]:
            name = names.get(k)
            if name is None:
                name = k.decode("latin-1").lower()
                if len(names) < 512 and len(k) <= 64:  # clients send few names; odd ones are not kept
                    names[k] = name
            headers[name] = v.decode("latin-1")
        self.headers = headers
        self._query: dict[str, list[str]] | None = None
        client = scope.get("client")
        ip = client[0] if client else ""
        if trust_forwarded:  # X-Forwarded-For from the right, through trusted proxies only (api/forwarded.py)
            fw = _PEER_ONLY if trust_forwarded is True else trust_forwarded
            ip = fw.client(ip, scope["headers"])
        self.ip = ip
        ext = scope.get("extensions")
        self.head_block: bool = ext is not None and HEAD_BLOCK in ext

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            qs = self.scope.get("query_string", b"").decode("latin-1")
            self._query = parse_qs(qs, keep_blank_values=True)
        return self._query

    def q(self, name: str, default: str | None = None) -> str | None:
        v = self.query.get(name)
        return v[0] if v else default

    def request_id(self) -> str | None:
        rid = self.headers.get("x-request-id")
        if rid and _REQ_ID_OK.match(rid):
            return rid
        return None

    def bearer(self) -> str | None:
        from ..auth import bearer_of
        return bearer_of(self.headers)

    async def body(self, limit: int) -> bytes:
        cl = self.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > limit:
                    raise too_large(limit)
            except ValueError:
                raise GatewayError(400, "invalid Content-Length header", code="invalid_request") from None
        msg = await self.receive()
        if msg["type"] == "http.request" and not msg.get("more_body", False):  # the whole body at once
            b: bytes = msg.get("body", b"")
            if len(b) > limit:
                raise too_large(limit)
            return b
        chunks: list[bytes] = []
        size = 0
        while True:
            t = msg["type"]
            if t == "http.request":
                b = msg.get("body", b"")
                if b:
                    size += len(b)
                    if size > limit:
                        raise too_large(limit)
                    chunks.append(b)
                if not msg.get("more_body", False):
                    break
            elif t == "http.disconnect":
                raise asyncio.CancelledError("client disconnected")
            msg = await self.receive()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


# Response headers: every value we send is built here, from our own data and from client or upstream data
# (a model name, a provider's retry-after, ...).  A value that is not plain visible ASCII (CR, LF, NUL, other
# control characters, non-ASCII, or leading/trailing blanks) is percent-encoded (RFC 3986, '%' included),
# so it can neither split the response (CR/LF) nor make the server refuse the head; a name that is not an
# RFC 9110 token is dropped and logged (a bug of ours: names are constants).
_HDR_NAME_OK = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HDR_VALUE_OK = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?\Z")
_HDR_SAFE = "".join(chr(c) for c in range(0x21, 0x7f) if chr(c) != "%")


def header_value(value: Any) -> str:
    """``value`` as a safe header value: unchanged when it is plain visible ASCII, else percent-encoded."""
    v = value if type(value) is str else str(value)
    # str methods first (about 5x cheaper than the regex); the regex is the definition
    if v.isascii() and v.isprintable() and (not v or (v[0] != " " and v[-1] != " ")):
        return v
    if _HDR_VALUE_OK.match(v):
        return v
    return quote(v, safe=_HDR_SAFE)


# checked names -> (the name encoded, b"name: " for a header line, or b"" for a framing header, which goes to
# the server as a pair); names are constants of ours, so it stays small
_NAME_CACHE: dict[str, tuple[bytes, bytes]] = {}
# framing headers go to the server as (name, value) pairs even when the others go as one block
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


def _encode_headers(extra: dict[str, Any], out: list[tuple[bytes, bytes]], lines: list[bytes] | None) -> None:
    """Check and encode ``extra``: a name that is not a token is dropped (and logged), a value that is not
    plain visible ASCII is percent-encoded (:func:`header_value`).  Each header is appended to ``out`` as a
    pair, or to ``lines`` as ``name``, ``: value``, CRLF when ``lines`` is given and it is not a framing header."""
    cache = _NAME_CACHE
    for k, v in extra.items():
        c = cache.get(k)
        if c is None:
            if not _HDR_NAME_OK.match(k):
                log.error("response header name %r is not a token: dropped", k)
                continue
            kb = k.encode("ascii")
            c = (kb, b"" if k.lower() in _FRAMING else kb + b": ")
            if len(cache) < 256:
                cache[k] = c
        if type(v) is str and v.isascii() and v.isprintable() and v[:1] != " " and v[-1:] != " ":
            vb = v.encode()  # plain visible ASCII: its UTF-8 is its ASCII
        else:
            vb = header_value(v).encode("ascii")
        if lines is not None and c[1]:
            lines += (c[1], vb, b"\r\n")
        else:
            out.append((c[0], vb))


def _hdrs(extra: dict[str, Any] | None) -> list[tuple[bytes, bytes]]:
    """``extra`` as checked (name, value) pairs."""
    out: list[tuple[bytes, bytes]] = []
    if extra:
        _encode_headers(extra, out, None)
    return out


def _hdr_block(extra: dict[str, Any], out: list[tuple[bytes, bytes]]) -> bytes:
    """``extra`` as encoded header lines (``name: value\r\n``), checked as :func:`_hdrs` checks them, for a
    server that takes them as they are (``helixagent.head_block``); framing headers are appended to ``out``."""
    lines: list[bytes] = []
    _encode_headers(extra, out, lines)
    return b"".join(lines)


class ResponseFailed(Exception):
    """The server refused the response head (``http.response.start``): nothing reached the client."""


def _refused(exc: BaseException) -> ResponseFailed:
    return ResponseFailed(f"the response could not be started: {type(exc).__name__}: {exc}")


async def start_response(send: Callable[..., Awaitable[Any]], status: int,
                         headers: list[tuple[bytes, bytes]]) -> None:
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
    except (OSError, RuntimeError) as exc:
        raise _refused(exc) from exc


# Lingering close (RFC 9112 section 9.6): a response sent before the request body was read in full (a 413)
# is followed by reading and discarding what the client still sends, up to LINGER_BYTES or LINGER_SECONDS,
# before the connection is closed.  A client that writes its whole body before it reads (urllib, curl
# without Expect) then receives the answer instead of a connection reset (closing a socket with unread
# data makes the kernel send RST, which discards the response the client has not read yet).
LINGER_BYTES = 64 * 1024 * 1024
LINGER_SECONDS = 5.0


async def drain_request(receive: Callable[..., Awaitable[Any]], max_bytes: int = LINGER_BYTES,
                        seconds: float = LINGER_SECONDS) -> int:
    """Read and discard the rest of the request body (bounded); returns the bytes discarded."""
    n = 0
    try:
        async with asyncio.timeout(seconds):
            while n < max_bytes:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                n += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        pass
    return n


async def send_bytes(send: Callable[..., Awaitable[Any]], status: int, body: bytes,
                     headers: dict[str, Any] | None = None, content_type: bytes = b"application/json", *,
                     linger: Callable[..., Awaitable[Any]] | None = None,
                     started: Callable[[], Awaitable[None]] | None = None, head_block: bool = False) -> None:
    """Send a whole response.  ``linger``: the request's ``receive``, when the request body may not have
    been read in full (see :func:`drain_request`).  ``started``: awaited once the head was accepted,
    before the body is sent (the pipeline records the request there).  ``head_block``: the server takes
    pre-encoded header lines (``Request.head_block``).  Raises :class:`ResponseFailed` when the server
    refuses the head."""
    h = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if linger is not None:
        h.append((b"connection", b"close"))
    if head_block and headers:
        start = {"type": "http.response.start", "status": status, "headers": h, HEAD_BLOCK: _hdr_block(headers, h)}
    else:
        h.extend(_hdrs(headers))
        start = {"type": "http.response.start", "status": status, "headers": h}
    try:  # start_response(), inline: one coroutine less per answer
        await send(start)
    except (OSError, RuntimeError) as exc:
        raise _refused(exc) from exc
    if started is not None:
        await started()
    if linger is None:
        await send({"type": "http.response.body", "body": body})
        return
    # the whole answer now (the client may read it while it still sends), the end after the drain
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await drain_request(linger)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_json(send: Callable[..., Awaitable[Any]], status: int, obj: Any,
                    headers: dict[str, Any] | None = None, *,
                    linger: Callable[..., Awaitable[Any]] | None = None) -> None:
    await send_bytes(send, status, orjson.dumps(obj), headers, linger=linger)


# A client that hangs up while we wait for an answer (a non-streamed one, or a stream's first chunk) is
# noticed by a watcher task that is armed only once the request has waited WATCH_AFTER seconds: a quick
# answer costs a dict insert and pop (one shared timer per event loop arms the old ones), not a task.
# The environment override is for measurements (bench) only.
WATCH_AFTER = float(os.environ.get("HELIX_DISCONNECT_WATCH_AFTER", "0.05"))


class _Waiting:
    """Per event loop: the requests waiting for their answer, oldest first, and the one timer that arms
    the watchers of those that have waited WATCH_AFTER."""

    __slots__ = ("loop", "since", "handle")
    by_loop: ClassVar[dict[Any, "_Waiting"]] = {}
    last: ClassVar["_Waiting | None"] = None  # the one of the loop used last (a server runs one loop): no lookup

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.since: dict[DisconnectWatch, float] = {}
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_Waiting":
        w = cls.by_loop.get(loop)
        if w is None:
            if len(cls.by_loop) > 16:  # event loops of the past (tests start many gateways)
                for old in [lp for lp in cls.by_loop if lp.is_closed()]:
                    del cls.by_loop[old]
            w = cls.by_loop[loop] = cls(loop)
        return w

    def add(self, watch: "DisconnectWatch") -> None:
        now = self.loop.time()
        self.since[watch] = now
        if self.handle is None:
            self.handle = self.loop.call_at(now + WATCH_AFTER, self.tick)

    def tick(self) -> None:
        self.handle = None
        cutoff = self.loop.time() - WATCH_AFTER
        due = []
        for watch, t in self.since.items():  # insertion order is age order
            if t > cutoff:
                self.handle = self.loop.call_at(t + WATCH_AFTER, self.tick)
                break
            due.append(watch)
        for watch in due:
            del self.since[watch]
            watch.arm()


class DisconnectWatch:
    """While the current task waits for the answer: if the client disconnects, call ``on_gone(arg)``
    and cancel the task (the pipeline turns that into a 499 and runs its post-hooks).  Call
    :meth:`stop` as soon as the wait is over, with no await in between."""

    __slots__ = ("receive", "on_gone", "arg", "task", "waiting", "watcher")

    def __init__(self, req: Request, on_gone: Callable[[Any], None], arg: Any):
        self.receive = req.receive
        self.on_gone = on_gone
        self.arg = arg
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task(loop)  # the loop given: current_task() would look it up again
        self.watcher: asyncio.Task[None] | None = None
        if WATCH_AFTER > 0:
            w = _Waiting.last
            if w is None or w.loop is not loop:
                w = _Waiting.last = _Waiting.of(loop)
            self.waiting: _Waiting | None = w
            w.add(self)
        else:
            self.waiting = None
            self.arm()

    def arm(self) -> None:
        self.waiting = None
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            while True:
                msg = await self.receive()
                if msg["type"] == "http.disconnect":
                    break
        except Exception:  # noqa: BLE001 - the server's receive() failed: nothing left to watch
            return
        self.on_gone(self.arg)
        if self.task is not None:
            self.task.cancel()

    def stop(self) -> None:
        waiting = self.waiting
        if waiting is not None:
            self.waiting = None
            waiting.since.pop(self, None)
        w = self.watcher
        if w is not None:
            # the cancelled task's traceback holds its frame, which holds this watch: without these the
            # request (its body, its answer) would wait in that cycle for the garbage collector
            self.watcher = None
            self.arg = None
            w.cancel()


async def send_sse(req: Request, status: int, headers: dict[str, Any] | None,
                   events: AsyncIterator[bytes], on_disconnect: Callable[[], None] | None = None,
                   on_cancel: Callable[[], None] | None = None) -> bool:
    """Stream SSE frames.  Stops early (closing ``events``, after calling ``on_disconnect``) if the
    client goes away; returns False then.  If the task is cancelled for another reason (the server's
    shutdown drain ended) while a frame is being written, ``on_cancel`` is called and the stream is
    closed (a cancellation while ``events`` waits for the upstream is theirs to turn into a last error
    event).  Raises :class:`ResponseFailed` (``events`` untouched) when the server refuses the head."""
    send = req.send
    h = list(SSE_HEADERS)
    if headers and "content-type" in headers:  # a stream in another framing (Gemini's JSON-array stream)
        h = [x for x in h if x[0] != b"content-type"]
    if req.head_block and headers:
        try:
            await send({"type": "http.response.start", "status": status, "headers": h,
                        HEAD_BLOCK: _hdr_block(headers, h)})
        except (OSError, RuntimeError) as exc:
            raise _refused(exc) from exc
    else:
        h.extend(_hdrs(headers))
        await start_response(send, status, h)
    task = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            msg = await req.receive()
            if msg["type"] == "http.disconnect":
                gone = True
                if on_disconnect is not None:
                    on_disconnect()
                if task is not None:
                    task.cancel()  # stop waiting on the upstream at once
                return

    watcher = asyncio.ensure_future(watch())
    ok = True
    cut = False
    try:
        async for frame in events:
            try:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            except (OSError, RuntimeError):
                ok = False
                break
        if ok:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if task is None:
            raise
        if not gone:
            if on_cancel is None:
                raise
            on_cancel()
            cut = True
        task.uncancel()
        ok = False
    except (OSError, RuntimeError):
        ok = False
    finally:
        watcher.cancel()
        if not ok and not gone and not cut and on_disconnect is not None:
            on_disconnect()  # the server could not write: the connection is gone
        closer = getattr(events, "aclose", None)
        if closer is not None:
            await closer()
    return ok
