"""The HTTP/1.1 server protocol: ASGI over httptools, with hard limits, one lean cycle per request.

uvicorn runs the server (sockets, workers, lifespan, graceful shutdown) and creates one
:class:`HelixHttpProtocol` per connection (``uvicorn.Config(http=HelixHttpProtocol)``); the protocol and its
:class:`Cycle` replace uvicorn's ``HttpToolsProtocol`` and ``RequestResponseCycle`` (bench/server_layer.py,
CPU per request with the same raw ASGI app: uvicorn's 57.5 µs, these 42.0, a bare httptools protocol that
writes a canned answer itself 19.5); the ASGI interface the application sees is the same (scope,
``receive``, ``send``).

Per connection, beyond what uvicorn's protocol does (``server:`` config):

* a bound on the request head: ``max_header_bytes`` (request line + header lines) and ``max_headers``;
  beyond either the answer is 431 with a small JSON error and the connection is closed.  The bytes of a
  head still being received are counted as they arrive (``data_received``), so a client that never ends
  its headers is cut off after ``max_header_bytes`` -- the parser's buffer never grows past that;
* deadlines: the head must arrive within ``header_timeout`` (from the connection's start, or from the
  first byte of a keep-alive request) -- else 408 and close; the body within ``body_timeout`` once the
  head is in -- else 408 (or a close, if the answer has started) and the application's ``receive()``
  sees ``http.disconnect``; an idle keep-alive connection is closed after ``keep_alive_timeout``;
* at most ``max_connections`` open connections per worker: a connection beyond that is answered at
  once with 503 (JSON body, ``Connection: close``) and closed, without reading a request.

Error answers are followed by a bounded lingering close (write side shut, input read and dropped for at
most a second or ``_LINGER_BYTES``), so a client that is still sending sees the answer instead of a reset.
The deadlines share one timer per connection that is re-armed only when it fires early (a phase change
moves the deadline, not the timer), so a keep-alive request costs no timer operations at all.

The request's cycle (the ASGI ``receive``/``send``, how the answer is written, the ``helixagent.head_block``
extension) is :class:`helixagent.api.cycle.Cycle`.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

from .cycle import EXTENSIONS, HEAD_BLOCK, STATUS_LINE, Cycle, server_log

__all__ = ["HEAD_BLOCK", "Cycle", "HelixHttpProtocol", "ServerLimits"]

log = logging.getLogger("helixagent")

_LINGER_SECONDS = 1.0
_LINGER_BYTES = 4 * 1024 * 1024
HIGH_WATER = 65536  # request body bytes buffered before reading pauses (until the application receives)

# connection phases (what the connection's deadline is for)
_HEAD, _BODY, _APP, _IDLE, _LINGER = 0, 1, 2, 3, 4


@dataclass  # not frozen: compiled, a frozen dataclass does not unpickle (the workers get it pickled)
class ServerLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 2048

    @classmethod
    def from_config(cls, server_cfg: Any) -> "ServerLimits":
        return cls(max_header_bytes=server_cfg.max_header_bytes, max_headers=server_cfg.max_headers,
                   header_timeout=server_cfg.header_timeout, body_timeout=server_cfg.body_timeout,
                   keep_alive_timeout=server_cfg.keep_alive_timeout,
                   max_connections=server_cfg.max_connections)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head beyond the limits."""


def _error_response(status: int, reason: bytes, code: str, message: str) -> bytes:
    body = (b'{"error":{"message":"' + message.encode("ascii") + b'","type":"invalid_request_error","code":"'
            + code.encode("ascii") + b'"}}')
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


class _RefusalLog:
    """Refused connections are logged at most every 10 s, with a count (an attack must not flood the log)."""
    count: ClassVar[int] = 0
    last: ClassVar[float] = 0.0

    @classmethod
    def note(cls, limit: int) -> None:
        cls.count += 1
        now = time.monotonic()
        if now - cls.last >= 10.0:
            log.warning("connection limit reached (server.max_connections: %d per worker): refused %d "
                        "connection(s) with 503", limit, cls.count)
            cls.count = 0
            cls.last = now


_FIRST_REQUEST_GRACE = 1.0  # shutdown: how long a connection that has sent nothing yet is left open


def _unread(transport: Any) -> int:
    """Bytes the kernel holds for this connection that the loop has not read yet (FIONREAD); 0 when the
    socket is gone (closing it then is what the caller does anyway)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(buf, sys.byteorder)


class HelixHttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: httptools parses, a :class:`Cycle` per request runs the ASGI application."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        # Any: uvloop's loop and transports are not asyncio's classes
        self.loop: Any = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.app_state = app_state
        self.root_path: str = config.root_path
        self.raw_root = self.root_path.encode("ascii")
        self.asgi = {"version": config.asgi_version, "spec_version": "2.3"}
        self.parser = httptools.HttpRequestParser(self)
        # answer the first of pipelined requests on a connection that said "close" (as uvicorn)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        lim: ServerLimits = getattr(config, "helix_limits", None) or ServerLimits()
        self._lim = lim
        self.transport: Any = None
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.cycle: Cycle | None = None
        self.pipeline: deque[Cycle] = deque()
        self.read_paused = False
        self.write_paused = False
        self._drain: list[asyncio.Future[None]] = []
        # per-request parse state
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect_100 = False
        # limits and deadlines
        self._phase = _HEAD
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._in_head = False  # a message has begun and its head is not complete
        self._head_raw = 0  # bytes received while the head was incomplete
        self._head_parsed = 0  # bytes of the request line and the header lines parsed so far
        self._header_count = 0
        self._msgs_done = 0
        self._linger_bytes = 0
        self.close_after = False  # the server is shutting down: the next answer is this connection's last

    # -- flow control --------------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        ws, self._drain = self._drain, []
        for w in ws:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        w = self.loop.create_future()
        self._drain.append(w)
        await w

    # -- deadlines -------------------------------------------------------------------------------------
    def _set_deadline(self, phase: int, seconds: float | None) -> None:
        self._phase = phase
        if seconds is None:
            self._deadline = None
            return
        at = self.loop.time() + seconds
        self._deadline = at
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        at = self._deadline
        if at is None or self.transport.is_closing():
            return
        if self.loop.time() < at:  # the deadline moved on since the timer was armed
            self._timer_at = at
            self._timer = self.loop.call_at(at, self._on_timer)
            return
        phase = self._phase
        self._deadline = None
        if phase == _HEAD and self._in_head:
            self._reject(408, b"Request Timeout", "request_timeout",
                         f"the request head was not received within {self._lim.header_timeout:g}s")
        elif phase == _BODY:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                started = cycle.response_started
                cycle.disconnected = True  # the application's receive() now returns http.disconnect
                cycle.wake()
                if not started:
                    self.transport.write(_error_response(
                        408, b"Request Timeout", "request_timeout",
                        f"the request body was not received within {self._lim.body_timeout:g}s"))
            self.transport.close()
        else:  # idle, head never begun, linger over
            self.transport.close()

    def _reject(self, status: int, reason: bytes, code: str, message: str) -> None:
        """Answer with an error, stop parsing, and close after a bounded lingering read."""
        self.transport.write(_error_response(status, reason, code, message))
        self._linger()

    def _linger(self) -> None:
        self._in_head = False
        self._set_deadline(_LINGER, _LINGER_SECONDS)
        self.resume_reading()
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            transport.close()

    def _bad_request(self) -> None:
        msg = b"Invalid HTTP request received."
        server_log.warning("Invalid HTTP request received.")
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        head += (b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                 % len(msg), msg)
        self.transport.write(b"".join(head))
        self.transport.close()

    # -- connection --------------------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if len(self.connections) >= self._lim.max_connections:
            # beyond the cap: not registered as a connection, answered at once, closed after a short linger
            _RefusalLog.note(self._lim.max_connections)
            self._reject(503, b"Service Unavailable", "too_many_connections",
                         "the server has too many open connections; retry later")
            return
        self.connections.add(self)
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self._set_deadline(_HEAD, self._lim.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = None
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.wake()
        self.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def eof_received(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self._phase == _LINGER:
            self._linger_bytes += len(data)
            if self._linger_bytes > _LINGER_BYTES:
                self.transport.close()
            return
        done = self._msgs_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                if self._in_head:
                    self._reject(431, b"Request Header Fields Too Large", "request_header_fields_too_large",
                                 str(exc.__context__))
                else:  # too many or too large trailers of a chunked body: the request is under way
                    cycle = self.cycle
                    if cycle is not None and not cycle.response_complete:
                        cycle.disconnected = True
                        cycle.wake()
                    self.transport.close()
                return
            self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            self._set_deadline(_APP, None)  # the connection is no longer HTTP/1.1 requests
            server_log.warning("Unsupported upgrade request.")
            return
        if self._in_head and self._msgs_done == done:
            # no message ended in this chunk and a head is still open: the whole chunk is head bytes
            self._head_raw += len(data)
            if self._head_raw > self._lim.max_header_bytes:
                self._reject(431, b"Request Header Fields Too Large", "request_header_fields_too_large",
                             f"the request head exceeds {self._lim.max_header_bytes} bytes")

    # -- parser callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100 = False
        self.headers = []
        self._in_head = True
        self._head_raw = 0
        self._head_parsed = 0
        self._header_count = 0
        if self._phase != _HEAD:  # a keep-alive request: its head deadline runs from its first byte
            self._set_deadline(_HEAD, self._lim.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_parsed += len(url)
        if self._head_parsed > self._lim.max_header_bytes:
            raise _HeadTooLarge(f"the request head exceeds {self._lim.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_parsed += len(name) + len(value) + 4
        self._header_count += 1
        if self._head_parsed > self._lim.max_header_bytes:
            raise _HeadTooLarge(f"the request head exceeds {self._lim.max_header_bytes} bytes")
        if self._header_count > self._lim.max_headers:
            raise _HeadTooLarge(f"the request has more than {self._lim.max_headers} header fields")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100 = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._set_deadline(_BODY, self._lim.body_timeout)
        parser = self.parser
        version = parser.get_http_version()
        # Any: httptools' stubs type ``query`` as bytes, but it is None without a query string (compiled,
        # a typed local would be checked at run time)
        url: Any = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope = {
            "type": "http", "asgi": self.asgi, "http_version": version, "server": self.server,
            "client": self.client, "scheme": self.scheme, "method": parser.get_method().decode("ascii"),
            "root_path": self.root_path, "path": self.root_path + path, "raw_path": self.raw_root + raw_path,
            "query_string": url.query or b"", "headers": self.headers, "state": self.app_state.copy(),
            "extensions": EXTENSIONS,
        }
        cycle = Cycle(self, scope, version != "1.0" and not self.close_after and parser.should_keep_alive(),
                      self.expect_100)
        existing = self.cycle
        self.cycle = cycle
        if existing is None or existing.response_complete:
            self._start(cycle)
        else:  # a pipelined request: it runs when the one before it has been answered
            self.pause_reading()
            self.pipeline.appendleft(cycle)

    def _start(self, cycle: Cycle) -> None:
        task = self.loop.create_task(cycle.run(self.app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        self._msgs_done += 1
        cycle = self.cycle
        if cycle is None:
            return
        if cycle.response_complete:
            # answered before its body was read: now idle (the keep-alive deadline)
            if self._phase == _BODY:
                self._set_deadline(_IDLE, self._lim.keep_alive_timeout)
            return
        self._set_deadline(_APP, None)
        cycle.more_body = False
        cycle.wake()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.pipeline:
            self._start(self.pipeline.pop())
        elif self._phase == _APP:
            self._set_deadline(_IDLE, self._lim.keep_alive_timeout)
        # else: the request's body is still arriving (answered early): its body deadline stays

    def shutdown(self) -> None:
        """Called by the server to start a graceful shutdown: an idle keep-alive connection is closed now; one
        with a request under way closes after its answer -- and so does one that has not sent its first
        request yet (the server has just accepted it: its request may be in the socket already, and a close
        would reset it), within :data:`_FIRST_REQUEST_GRACE`, and a keep-alive one whose next request is in
        the kernel's buffer, not read yet (closing a socket with unread bytes sends a reset: a proxy's POST
        written on its pooled connection just before the drain would be lost)."""
        self.close_after = True
        cycle = self.cycle
        if self._phase == _LINGER:
            self.transport.close()
        elif cycle is None or cycle.response_complete:
            if self._in_head:
                pass                      # a request under way
            elif self._msgs_done and not _unread(self.transport):
                self.transport.close()    # idle keep-alive
            else:  # nothing received yet (a request in flight arrives well within this), or a keep-alive
                # request that arrived since the loop last read: answered, not reset
                self._set_deadline(_HEAD, min(_FIRST_REQUEST_GRACE, self._lim.header_timeout))
        else:
            cycle.keep_alive = False
