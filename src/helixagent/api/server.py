"""The HTTP server process: uvicorn's httptools protocol with hard limits, and the serve/supervise loop.

:class:`HelixHttpProtocol` adds, per connection, what uvicorn's protocol lacks (``server:`` config):

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

:func:`serve` binds the socket itself (and logs "listening" only once it is bound and the workers are
up), reloads the config on SIGHUP (forwarded by the supervisor to every worker; see reload.py),
applies ``drain_timeout`` to the shutdown, and stops the whole server with a
non-zero status when a worker cannot start instead of respawning it forever.

TLS: with ``server.tls.enabled`` the port speaks HTTPS only (uvicorn's ``ssl_certfile``/``ssl_keyfile``).
SIGTERM: readiness fails at once (``/readyz`` 503 ``draining``, see api/probes.py); requests are still
served for ``server.drain_readiness_delay`` (so a load balancer stops sending first), then the server
stops accepting and running requests get ``drain_timeout`` to finish; a drained SIGTERM exits 0.  A second
SIGTERM (or SIGINT) during the delay starts the drain at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from . import probes
from .stream_writes import StreamWrites

log = logging.getLogger("helixagent")

_LINGER_SECONDS = 1.0
_LINGER_BYTES = 4 * 1024 * 1024

# connection phases (what the connection's deadline is for)
_HEAD, _BODY, _APP, _IDLE, _LINGER = 0, 1, 2, 3, 4


@dataclass(frozen=True)
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
    count = 0
    last = 0.0

    @classmethod
    def note(cls, limit: int) -> None:
        cls.count += 1
        now = time.monotonic()
        if now - cls.last >= 10.0:
            log.warning("connection limit reached (server.max_connections: %d per worker): refused %d "
                        "connection(s) with 503", limit, cls.count)
            cls.count = 0
            cls.last = now


class HelixHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head/connection limits and deadlines (see the module doc)."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        lim: ServerLimits = getattr(config, "helix_limits", None) or ServerLimits()
        self._lim = lim
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
                cycle.message_event.set()
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
        if self.flow is not None:
            self.flow.resume_reading()
        transport = self.transport
        if transport.can_write_eof():
            transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            transport.close()

    # -- connection --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self._lim.max_connections:
            # beyond the cap: not registered as a connection, answered at once, closed after a short linger
            self.transport = transport
            _RefusalLog.note(self._lim.max_connections)
            self._reject(503, b"Service Unavailable", "too_many_connections",
                         "the server has too many open connections; retry later")
            return
        super().connection_made(transport)
        self._set_deadline(_HEAD, self._lim.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = None
        super().connection_lost(exc)

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
                        cycle.message_event.set()
                    self.transport.close()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            self._set_deadline(_APP, None)  # the connection is no longer HTTP/1.1 requests
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and self._msgs_done == done:
            # no message ended in this chunk and a head is still open: the whole chunk is head bytes
            self._head_raw += len(data)
            if self._head_raw > self._lim.max_header_bytes:
                self._reject(431, b"Request Header Fields Too Large", "request_header_fields_too_large",
                             f"the request head exceeds {self._lim.max_header_bytes} bytes")

    # -- parser callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
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
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._set_deadline(_BODY, self._lim.body_timeout)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:  # a stream's chunks of one loop iteration leave together (api/stream_writes.py)
            cycle.transport = StreamWrites(self.transport, cycle, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._msgs_done += 1
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            # answered before its body was read: now idle (the keep-alive deadline)
            if self._phase == _BODY:
                self._set_deadline(_IDLE, self._lim.keep_alive_timeout)
            return
        self._set_deadline(_APP, None)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._phase == _APP:
            self._set_deadline(_IDLE, self._lim.keep_alive_timeout)
        # else: the request's body is still arriving (answered early): its body deadline stays

    def shutdown(self) -> None:
        if self._phase == _LINGER:
            self.transport.close()
            return
        super().shutdown()


def uvicorn_config(app: Any, server_cfg: Any, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn Config running :class:`HelixHttpProtocol` with the ``server:`` limits."""
    # (uvicorn's own timeout_keep_alive timer is not used: the protocol's one timer covers keep-alive)
    tls = server_cfg.tls
    if tls.enabled:
        kwargs.setdefault("ssl_certfile", tls.cert_path)
        kwargs.setdefault("ssl_keyfile", tls.key_path)
    config = uvicorn.Config(app, http=HelixHttpProtocol, timeout_graceful_shutdown=server_cfg.drain_timeout,
                            **kwargs)
    config.helix_limits = ServerLimits.from_config(server_cfg)  # type: ignore[attr-defined]
    config.helix_drain_delay = float(server_cfg.drain_readiness_delay)  # type: ignore[attr-defined]
    return config


# -- the serve process ---------------------------------------------------------------------------------------
class HelixServer(uvicorn.Server):
    """uvicorn's Server that reloads its config on SIGHUP (reload.py) and says "listening" only once it is."""

    announce: str | None = None  # logged once start-up is complete (single worker)
    _exit_at: float | None = None  # SIGTERM received: the drain begins at this monotonic time
    _drain_logged = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        # runs in a signal handler: no logging here (on_tick logs)
        probes.start_draining()
        delay: float = getattr(self.config, "helix_drain_delay", 0.0)
        if sig == signal.SIGTERM and delay > 0 and self._exit_at is None and not self.should_exit:
            self._exit_at = time.monotonic() + delay
            return
        if sig == signal.SIGTERM:
            # a drained SIGTERM is a normal stop (exit 0): not re-raised after the shutdown as uvicorn does
            self.should_exit = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and not self.should_exit:
            if not self._drain_logged:
                self._drain_logged = True
                log.info("SIGTERM: not ready (/readyz 503) for %.3gs, still serving; then draining for up to "
                         "%.3gs", self._exit_at - time.monotonic(), self.config.timeout_graceful_shutdown or 0)
            if time.monotonic() >= self._exit_at:
                self.should_exit = True
        return await super().on_tick(counter)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()

            def on_hup(signum: int, frame: Any) -> None:
                from .. import reload
                loop.call_soon_threadsafe(reload.on_sighup)  # re-read the config, in-process
            previous = signal.signal(signal.SIGHUP, on_hup)
            try:
                await super().serve(sockets)
            finally:
                signal.signal(signal.SIGHUP, previous)
        else:
            await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            log.info("%s", self.announce)


class _WorkerProcess(Process):
    """A worker: exits with STARTUP_FAILURE whenever its server never started (whatever the reason)."""

    ready = False

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = HelixServer(config=self.config)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover - child
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (inherited so from _Supervisor._new; kept until serve)
        threading.Thread(target=self.always_pong, daemon=True).start()
        try:
            self.server.run(sockets)
        except KeyboardInterrupt:
            return
        except Exception as exc:  # noqa: BLE001 - loud: logged, and the whole server stops
            if self.server.started:
                raise
            log.error("worker [%d] failed to start: %s: %s", os.getpid(), type(exc).__name__, exc,
                      exc_info=True)
            sys.exit(STARTUP_FAILURE)
        if not self.server.started:
            sys.exit(STARTUP_FAILURE)


class _Supervisor(Multiprocess):
    """uvicorn's Multiprocess, except that a worker that dies before it was ever ready stops the whole
    server (non-zero exit) instead of being respawned forever, and "listening" is logged once every
    worker is up."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], announce: str) -> None:
        super().__init__(config, sockets)
        from ..reload import SUPERVISOR_ENV
        os.environ[SUPERVISOR_ENV] = str(os.getpid())  # workers signal it: POST /admin/reload reaches all
        self.announce: str | None = announce
        self.failure: str | None = None

    def _new(self) -> _WorkerProcess:
        p = _WorkerProcess(self.config, self.sockets)
        # the worker inherits SIGHUP ignored until its server installs the reload handler: a SIGHUP
        # forwarded while it boots must not kill it (it reads the config file as it starts anyway)
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            p.start()
        finally:
            signal.signal(signal.SIGHUP, previous)
        return p

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._new())

    @staticmethod
    def _probe(process: _WorkerProcess, timeout: float) -> bool | None:
        """The worker's "started" flag, or None if it is dead or does not answer within ``timeout``
        (uvicorn's own check blocks for the whole timeout when the worker dies meanwhile)."""
        if not process.process.is_alive():
            return None
        try:
            process.parent_conn.send(b"ping")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.parent_conn.poll(0.05):
                    return bool(process.parent_conn.recv())
                if not process.process.is_alive():
                    return None
        except (OSError, EOFError):
            return None
        return None

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(cast(list[_WorkerProcess], self.processes)):
            state = self._probe(process, self.config.timeout_worker_healthcheck)
            if state is not None:
                if state and not process.ready:
                    process.ready = True
                continue
            process.kill()
            process.join()
            if self.should_exit.is_set():
                return
            if process.exitcode == STARTUP_FAILURE or not process.ready:
                self.failure = (f"worker [{process.pid}] failed to start (exit status {process.exitcode}); "
                                "stopping the server")
                log.error("%s", self.failure)
                self.should_exit.set()
                return
            log.warning("worker [%s] died (exit status %s); starting a new one", process.pid, process.exitcode)
            new = self._new()
            self.processes[idx] = new
        if self.announce and all(p.ready for p in self.processes):  # type: ignore[attr-defined]
            log.info("%s", self.announce)
            self.announce = None

    def handle_hup(self) -> None:
        """SIGHUP: forwarded to every worker, which reloads its config in-process (reload.py); no worker
        is replaced and no connection is dropped."""
        pids = []
        for p in self.processes:
            if p.process.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGHUP)
                    pids.append(p.pid)
                except ProcessLookupError:
                    pass
        log.info("SIGHUP: config reload forwarded to worker(s) %s", ", ".join(map(str, pids)) or "none")

    def handle_ttin(self) -> None:
        log.info("SIGTTIN ignored: the number of workers is fixed by server.workers / --workers")

    def handle_ttou(self) -> None:
        log.info("SIGTTOU ignored: the number of workers is fixed by server.workers / --workers")


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """Bind and listen (raises OSError, e.g. the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(server_cfg: Any, host: str, port: int, workers: int, version: str,
          app: str = "helixagent.cli:app_factory") -> int:
    """Run the gateway until stopped; returns the exit status (non-zero: it could not start)."""
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if server_cfg.tls.enabled else "http"
    announce = (f"HelixAgent {version} listening on {scheme}://{shown}:{sock.getsockname()[1]} "
                f"({workers} worker{'' if workers == 1 else 's'})")
    config = uvicorn_config(app, server_cfg, factory=True, host=host, port=port, workers=workers, loop="uvloop",
                            lifespan="on", access_log=False, log_config=None, server_header=False,
                            date_header=False, proxy_headers=False)
    try:
        if workers > 1:
            sup = _Supervisor(config, [sock], announce)
            sup.run()
            return 1 if sup.failure else 0
        server = HelixServer(config)
        server.announce = announce
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        except SystemExit as exc:
            if exc.code not in (None, 0):
                log.error("the server failed to start; stopping")
                return 1
        except Exception as exc:  # noqa: BLE001 - loud: one message, non-zero exit
            if server.started:
                raise
            log.error("the server failed to start: %s: %s", type(exc).__name__, exc, exc_info=True)
            return 1
        if not server.started:
            log.error("the server failed to start; stopping")
            return 1
        return 0
    finally:
        sock.close()
