"""One request on a connection of :class:`helixagent.api.protocol.HelixHttpProtocol`: the ASGI ``receive``
and ``send`` pair, and how the answer is written.

Writes: a whole answer (a known length) leaves in one write -- its head is held until the body's first
write (the pipeline records the request between the two, so nothing the client could use is delayed).
A streamed (chunked) answer's first chunk leaves at once, with the head if that is still held (the head
waits for it until the end of the loop iteration in which it was sent, then leaves on its own); later
chunks are gathered and flushed at the end of the loop iteration, so the events of one upstream read go
out in one vectored write; the terminal chunk is written at once.  A ``HEAD`` answer's head leaves at once.

One ASGI extension, advertised in ``scope["extensions"]`` as ``helixagent.head_block``: an
``http.response.start`` message may carry, under that key, header lines already encoded and checked by the
application (``name: value\r\n`` each; api/http.py builds them from names that are tokens and values that
are plain visible ASCII or percent-encoded, and never puts ``content-length``, ``transfer-encoding`` or
``connection`` there).  They are written after the message's ``headers`` -- the per-header loop is for
the few that decide the framing -- once one regex has found them to be whole header lines (a token,
``: ``, a value without control characters but HT); else the head is refused as for a bad header.  About
3-4 µs less on an answer of 14 headers.
"""
from __future__ import annotations

import asyncio
import http
import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocol import HelixHttpProtocol

server_log = logging.getLogger("uvicorn.error")  # where uvicorn's protocol logged, kept for operators

def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase)


STATUS_LINE = {code: _status_line(code) for code in range(100, 600)}  # what uvicorn writes, its table not imported

_JOIN_MAX = 64 * 1024  # a held head and a body up to this size are joined into one buffer, larger vectored
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# response header names: a token; values: no control characters but HT (RFC 9110), as uvicorn checks.
# Checked once over all names and once over all values of a head (a bad byte survives the join).
_NAME_BAD = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_VALUE_BAD = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
# a head block (the helixagent.head_block extension): whole header lines, each a token, ": " and a value
_BLOCK_OK = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [\t\x20-\x7e\x80-\xff]*\r\n)*")

_DISCONNECT = {"type": "http.disconnect"}

# SIGTERM received (the readiness delay, then the drain): every answer from here on says ``Connection:
# close`` and its connection is closed after it.  A keep-alive connection the server closes while idle races
# with a request a proxy is writing on it at that moment (a POST it must not replay: a 502 from a healthy
# instance); closed after an answer that said so, it cannot be reused.  So by the time the drain closes
# the idle ones, a proxy that kept sending during the delay holds no reused connection to this process.
_closing = False


def close_after_every_answer() -> None:
    """From here on every answer closes its connection (signal-handler safe: sets a flag)."""
    global _closing
    _closing = True

HEAD_BLOCK = "helixagent.head_block"
EXTENSIONS: dict[str, dict[str, Any]] = {HEAD_BLOCK: {}}  # scope["extensions"] of every request


class Cycle:
    """One request and its response: the ASGI ``receive``/``send`` pair."""

    __slots__ = ("proto", "scope", "transport", "loop", "body", "more_body", "ready", "waiters", "disconnected",
                 "keep_alive", "expect_100", "response_started", "response_complete", "chunked", "remaining",
                 "held", "buf", "first_chunk", "is_head", "running")

    def __init__(self, proto: "HelixHttpProtocol", scope: dict[str, Any], keep_alive: bool, expect_100: bool):
        self.proto = proto
        self.scope = scope
        self.transport: asyncio.Transport = proto.transport
        self.loop = proto.loop
        self.body = bytearray()
        self.more_body = True
        self.ready = False  # something for receive(): body bytes, the body's end, a disconnect
        self.waiters: list[asyncio.Future[None]] = []
        self.disconnected = False
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.remaining = 0  # bytes of a known-length body still to send
        self.held: bytes | None = None  # the response head, until the body's first write
        self.buf: list[bytes] = []  # a stream's gathered chunks
        self.first_chunk = True
        self.is_head = scope["method"] == "HEAD"
        self.running = True

    def wake(self) -> None:
        self.ready = True
        ws = self.waiters
        if ws:
            self.waiters = []
            for w in ws:
                if not w.done():
                    w.set_result(None)

    # -- ASGI --------------------------------------------------------------------------------------------
    async def run(self, app: Any) -> None:
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:  # noqa: BLE001 - as uvicorn: logged, answered 500 or the connection closed
            server_log.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500()
            else:
                self.close()
        else:
            if result is not None:
                server_log.error("ASGI callable should return None, but returned '%s'.", result)
                self.close()
            elif not self.response_started and not self.disconnected:
                server_log.error("ASGI callable returned without starting response.")
                await self.send_500()
            elif not self.response_complete and not self.disconnected:
                server_log.error("ASGI callable returned without completing response.")
                self.close()
        finally:
            self.running = False

    async def send_500(self) -> None:
        await self.send({"type": "http.response.start", "status": 500,
                         "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"),
                                     (b"connection", b"close")]})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})

    async def receive(self) -> dict[str, Any]:
        if self.expect_100:
            self.expect_100 = False
            if not self.transport.is_closing():
                self.transport.write(_CONTINUE)
        if not self.disconnected and not self.response_complete:
            self.proto.resume_reading()
            if not self.ready:
                w = self.loop.create_future()
                self.waiters.append(w)
                await w
            self.ready = False
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            await proto.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            # raises on a bad header: the response has not started then
            head = self._head(message["status"], message.get("headers", ()), message.get(HEAD_BLOCK))
            self.response_started = True
            self.expect_100 = False
            if self.is_head:
                self.transport.write(head)
            else:
                self.held = head
                if self.chunked:
                    self.loop.call_soon(self.flush)
            return
        if self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.is_head:
            pass
        elif self.chunked:
            if body:
                data = b"%x\r\n%b\r\n" % (len(body), body)
                if not more:
                    data += _LAST_CHUNK
            elif not more:
                data = _LAST_CHUNK
            else:
                data = b""
            if data:
                self._chunk(data, not more)
        else:
            n = len(body)
            if n > self.remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self.remaining -= n
            held = self.held
            if held is not None:
                self.held = None
                if n <= _JOIN_MAX:
                    self.transport.write(held + body)
                else:
                    self.transport.writelines((held, body))
            elif n:
                self.transport.write(body)
        if not more:
            if self.remaining != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.wake()
            if self.held is not None or self.buf:
                self.flush()
            if not self.keep_alive:
                self.transport.close()
            if self.running:
                proto.on_response_complete()

    def _head(self, status: int, headers: Any, block: bytes | None = None) -> bytes:
        default = self.proto.server_state.default_headers
        if default:
            headers = [*default, *headers]
        parts = [STATUS_LINE[status]]
        close = False
        length = chunked = False
        names = []
        values = []
        for name, value in headers:
            name = name.lower()
            names.append(name)
            values.append(value)
            if name == b"content-length":
                if not chunked and not length:
                    self.remaining = int(value.decode())
                    length = True
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked":  # as uvicorn: chunked framing wins over a length
                    self.remaining = 0
                    chunked = True
                    length = False
            elif name == b"connection":
                if b"close" in [t.lower().strip() for t in value.split(b",")]:
                    self.keep_alive = False
                    close = True
            parts += (name, b": ", value, b"\r\n")
        if _NAME_BAD.search(b"".join(names)):
            raise RuntimeError("Invalid HTTP header name.")
        if _VALUE_BAD.search(b"".join(values)):
            raise RuntimeError("Invalid HTTP header value.")
        if block:
            if _BLOCK_OK.fullmatch(block) is None:
                raise RuntimeError("Invalid HTTP header block.")
            parts.append(block)
        if _closing:
            self.keep_alive = False
        if not self.keep_alive and not close:
            parts.append(b"connection: close\r\n")
        if not length and not chunked and not self.is_head and status not in (204, 304):
            chunked = True  # neither a length nor transfer-encoding: chunked
            parts.append(b"transfer-encoding: chunked\r\n")
        if self.is_head:
            self.remaining = 0
        self.chunked = chunked
        parts.append(b"\r\n")
        return b"".join(parts)

    # -- writes --------------------------------------------------------------------------------------------
    def _chunk(self, data: bytes, last: bool) -> None:
        if self.first_chunk:  # a stream's first chunk: at once (with the head, if it is still held)
            self.first_chunk = False
            held = self.held
            if held is not None:
                self.held = None
                data = held + data
            if not self.transport.is_closing():
                self.transport.write(data)
            return
        buf = self.buf
        buf.append(data)
        if last:  # the end of the stream: out now, before anything that follows
            self.flush()
        elif len(buf) == 1:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        held = self.held
        buf = self.buf
        if held is None and not buf:
            return
        t = self.transport
        if held is not None:
            self.held = None
            if not t.is_closing():
                t.write(held)
        if buf:
            self.buf = []
            if not t.is_closing():
                t.writelines(buf)

    def close(self) -> None:
        self.flush()
        self.transport.close()
