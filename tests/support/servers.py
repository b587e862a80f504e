"""Run real HTTP servers for tests: the gateway (uvicorn, in a thread) and fake upstreams (aiohttp)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from aiohttp import web


def bound_socket(port: int | None = None) -> socket.socket:
    """A listening-ready socket bound on 127.0.0.1 (port 0 = any free port, with no race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadLoop:
    """An asyncio loop in a daemon thread; coroutines are submitted with :meth:`run`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class AiohttpServer:
    """Serve an aiohttp ``web.Application`` on 127.0.0.1 in its own thread."""

    def __init__(self, app: web.Application, port: int | None = None):
        self.app = app
        self.sock = bound_socket(port)
        self.port = self.sock.getsockname()[1]
        self.tl = ThreadLoop()
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)

        async def start() -> None:
            await self.runner.setup()
            site = web.SockSite(self.runner, self.sock)
            await site.start()

        self.tl.run(start())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        try:
            self.tl.run(self.runner.cleanup(), timeout=10)
        finally:
            self.tl.stop()


class GatewayServer:
    """Run a HelixAgent gateway built from a config dict with uvicorn, in a thread, over real HTTP."""

    def __init__(self, cfg_data: dict[str, Any] | None = None, port: int | None = None, cfg: Any = None):
        from helixagent.app import create_app
        from helixagent.config import load_config_dict
        self.cfg = cfg if cfg is not None else load_config_dict(cfg_data or {}, "<test>")
        self.sock = bound_socket(port)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(self.cfg)
        from helixagent.api.server import uvicorn_config
        # the gateway's own HTTP protocol and server: limits (header size/count, deadlines, connection cap);
        # the drain is kept short for tests unless the config sets one
        server_cfg = self.cfg.server
        if "drain_timeout" not in server_cfg.model_fields_set:
            server_cfg = server_cfg.model_copy(update={"drain_timeout": 2.0})
        # uvloop, as `helixagent serve` runs (asyncio's own loop added ~44 ms to every keep-alive request here)
        config = uvicorn_config(self.app, server_cfg, host="127.0.0.1", port=self.port, loop="uvloop",
                                lifespan="on", access_log=False, log_config=None)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's own loop (to inspect or drive its services)."""
        return asyncio.run_coroutine_threadsafe(coro, self.app.loop).result(timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
