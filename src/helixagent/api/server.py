"""The HTTP server process: uvicorn's server running HelixAgent's own HTTP/1.1 protocol, and the
serve/supervise loop.

The per-connection protocol (the head bounds, deadlines, connection cap and the writes) is
:class:`helixagent.api.protocol.HelixHttpProtocol`; :func:`uvicorn_config` sets it up with the ``server:``
limits.

:func:`serve` binds the socket itself (and logs "listening" only once it is bound and the workers are
up), reloads the config on SIGHUP (forwarded by the supervisor to every worker; see reload.py),
applies ``drain_timeout`` to the shutdown, and stops the whole server with a
non-zero status when a worker cannot start instead of respawning it forever.

TLS: with ``server.tls.enabled`` the port speaks HTTPS only (uvicorn's ``ssl_certfile``/``ssl_keyfile``).
SIGTERM: readiness fails at once (``/readyz`` 503 ``draining``, see api/probes.py); requests are still
served for ``server.drain_readiness_delay`` (so a load balancer stops sending first), each answer with
``Connection: close`` (so a proxy's pooled connections are closed where it can see it, not raced by the
drain's close of idle ones), then the server
stops accepting and running requests get ``drain_timeout`` to finish; a drained SIGTERM exits 0.  A second
SIGTERM (or SIGINT) during the delay starts the drain at once.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from . import probes
from .cycle import close_after_every_answer
from .protocol import HelixHttpProtocol, ServerLimits

__all__ = ["HelixHttpProtocol", "ServerLimits", "serve", "uvicorn_config"]

log = logging.getLogger("helixagent")


def uvicorn_config(app: Any, server_cfg: Any, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn Config running :class:`HelixHttpProtocol` with the ``server:`` limits."""
    # (uvicorn's own timeout_keep_alive timer is not used: the protocol's one timer covers keep-alive)
    tls = server_cfg.tls
    if tls.enabled:
        kwargs.setdefault("ssl_certfile", tls.cert_path)
        kwargs.setdefault("ssl_keyfile", tls.key_path)
    # ws="none": the protocol refuses upgrades, and uvicorn's "auto" would import the websockets package
    # (1.6-2.5 MB of RSS) wherever something else installed it
    kwargs.setdefault("ws", "none")
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
        close_after_every_answer()
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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Closing a listening socket resets every connection the kernel has accepted into its backlog and
        # the server not yet: a request a proxy wrote on one is lost (a POST is not replayed: a 502).  So
        # what waits in the backlog is accepted first, and the listeners are closed in the same step (no
        # await between: the loop cannot let more in); those connections are served, their answer closes.
        # A connection the kernel completes between that sweep and the close would be reset all the same
        # (a window of microseconds, but a proxy opening a connection per request after SIGTERM hits it):
        # so new handshakes are refused first -- their SYNs dropped, the client retries in about a second
        # and finds the port closed, a refused connect that a proxy retries elsewhere -- and the ones
        # under way get a moment to complete (the loop accepts and answers them meanwhile).
        close_after_every_answer()  # (set by handle_exit already; a shutdown reached otherwise too)
        if _drop_new_handshakes(self.servers):
            await asyncio.sleep(_HANDSHAKE_SETTLE)
        pending = _accept_backlog(self.servers)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        if pending:
            loop = asyncio.get_running_loop()
            config = self.config

            def create_protocol() -> asyncio.Protocol:
                protocol = HelixHttpProtocol(config=config, server_state=self.server_state,
                                             app_state=self.lifespan.state, _loop=loop)
                protocol.close_after = True
                return protocol
            for conn in pending:
                try:
                    await loop.connect_accepted_socket(create_protocol, conn, ssl=config.ssl)
                except OSError:  # the client has gone already
                    conn.close()
        await super().shutdown(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            log.info("%s", self.announce)


_HANDSHAKE_SETTLE = 0.05  # s: handshakes under way when new ones are refused complete (an RTT)
_SO_ATTACH_FILTER = 26    # Linux <asm-generic/socket.h>
# A classic BPF socket filter over the TCP header (a socket filter sees the packet from the transport
# header on): drop a segment whose flags are SYN without ACK -- a new handshake -- and accept the rest
# (the ACKs that complete the handshakes under way, and their data).
_DROP_SYN = b"".join(struct.pack("=HBBI", *ins) for ins in (
    (0x30, 0, 0, 13),          # ldb [13]         the TCP flags byte
    (0x54, 0, 0, 0x12),        # and #0x12        SYN | ACK
    (0x15, 0, 1, 0x02),        # jeq #0x02        SYN alone: drop
    (0x06, 0, 0, 0),           # ret #0
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1          anything else: keep
))


def _drop_new_handshakes(servers: list[Any]) -> bool:
    """Attach :data:`_DROP_SYN` to every TCP listening socket: the kernel completes no new connection
    from now on (a client's SYN is dropped; it retransmits it after about a second, to a port that is
    closed by then).  False where nothing could be attached (not Linux, no TCP listener)."""
    if not sys.platform.startswith("linux"):
        return False
    prog = ctypes.create_string_buffer(_DROP_SYN)
    fprog = struct.pack("HL", len(_DROP_SYN) // 8, ctypes.addressof(prog))  # struct sock_fprog
    attached = False
    for server in servers:
        for listener in server.sockets or ():
            if listener.type != socket.SOCK_STREAM or listener.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
            except OSError as exc:  # then the close is as before: a microsecond window of resets
                log.warning("shutdown: cannot refuse new connections before closing the listener (%s)", exc)
                continue
            attached = True
    return attached


def _accept_backlog(servers: list[Any]) -> list[socket.socket]:
    """Every connection waiting in the listening sockets' backlogs, accepted (non-blocking)."""
    accepted: list[socket.socket] = []
    for server in servers:
        for listener in server.sockets or ():
            if listener.type != socket.SOCK_STREAM:
                continue
            sock = socket.socket(fileno=os.dup(listener.fileno()))  # the same listening socket
            try:
                sock.setblocking(False)
                while True:
                    try:
                        conn, _ = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionAbortedError:  # reset by its client while it waited
                        continue
                    except OSError as exc:  # out of descriptors: the rest are reset by the close, as before
                        log.warning("shutdown: cannot accept the connections still waiting (%s)", exc)
                        break
                    conn.setblocking(False)
                    accepted.append(conn)
            finally:
                sock.close()
    return accepted


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
