"""The gateway application: builds providers, routing and the pipeline from the config, and serves the
HTTP API as a plain ASGI application."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from . import __version__
from .api.forwarded import for_server
from .api.http import Request, send_json
from .config import Config
from .errors import GatewayError
from .gateway_types import HttpDone, PrefixHandler, RouteHandler
from .pipeline import Pipeline, Stage
from .redaction import register_config
from .providers import Provider
from .providers.fleet import build_fleet
from .routing.router import Router

log = logging.getLogger("helixagent")

class Gateway:
    """Everything one server process needs.  Feature modules register routes, stages and
    start/stop hooks through :meth:`route`, :meth:`add_stage`, :meth:`on_startup`, :meth:`on_shutdown`."""

    def __init__(self, cfg: Config, config_path: str | None = None):
        self.cfg = cfg
        self.secrets = register_config(cfg)  # every configured secret, scrubbed from errors, records and logs
        self.fleet = build_fleet(cfg, cfg.http)  # the provider objects (rebuilt by a config reload)
        self.providers: dict[str, Provider] = self.fleet.providers
        self.mock_fallback = self.fleet.mock_fallback
        # the config file this process was started with (`serve --config F` / $HELIXAGENT_CONFIG), re-read
        # by a reload; None: built from a dict or the defaults (a reload then keeps what it has)
        self.config_path: str | None = config_path
        self.router = Router(cfg, self.providers)
        self.forwarded = for_server(cfg.server)  # client address from X-Forwarded-For (None: the peer)
        self.routes: dict[tuple[str, str], RouteHandler] = {}
        self.prefix_routes: list[tuple[str, str, PrefixHandler]] = []
        self.started_at = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.version = __version__
        self.paths: dict[str, list[str]] = {}
        self.stages: list[Stage] = []
        self._startup: list[Callable[[], Awaitable[None]]] = []
        self._shutdown: list[Callable[[], Awaitable[None]]] = []
        self.services: dict[str, Any] = {}   # shared services (store, limiter, cache, metrics...)
        # Routes that run the pipeline (whose outer stages write the access line themselves); every other
        # request is reported to http_done(req, status, started, error) when set (the access log).
        self.pipeline_routes: set[tuple[str, str]] = set()
        self.http_done: HttpDone | None = None
        self.chat_pipeline = Pipeline([], self.router.handle_chat)
        self.embed_pipeline = Pipeline([], self.router.handle_embeddings)
        from .features import install_features
        install_features(self)
        self.chat_pipeline.stages = list(self.stages)
        self.embed_pipeline.stages = list(self.stages)

    # -- registration -------------------------------------------------------------------------------
    def route(self, method: str, path: str, handler: RouteHandler, pipeline: bool = False) -> None:
        self.routes[(method, path)] = handler
        if pipeline:
            self.pipeline_routes.add((method, path))
        self.paths.setdefault(path, []).append(method)

    def prefix_route(self, method: str, prefix: str, handler: PrefixHandler) -> None:
        """``handler(gw, req, rest)`` for paths under ``prefix`` (e.g. /v1/models/{id})."""
        self.prefix_routes.append((method, prefix, handler))
        self.paths.setdefault(prefix, []).append(method)

    async def authorize(self, req: Any, action: str) -> Any:
        ident = await self.services["auth"].authorize(req.bearer(), action)
        req.scope["helixagent.identity"] = ident  # for the access line
        return ident

    def add_stage(self, stage: Stage) -> None:
        self.stages.append(stage)

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._startup.append(fn)

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._shutdown.append(fn)

    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        for fn in self._startup:
            await fn()
        tune_gc()

    async def shutdown(self) -> None:
        for fn in reversed(self._shutdown):
            try:
                await fn()
            except Exception:
                log.exception("shutdown hook failed")
        for p in self.providers.values():
            await p.close()
        reloader = self.services.get("reload")
        if reloader is not None:
            await reloader.close_retired()

    # -- ASGI -----------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        t = scope["type"]
        if t == "http":
            await self._http(scope, receive, send)
        elif t == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        done = self.http_done
        if done is not None and (scope["method"], scope["path"]) not in self.pipeline_routes:
            await self._http_logged(scope, receive, send, done)
            return
        await self._http_inner(scope, receive, send)

    async def _http_logged(self, scope: dict[str, Any], receive: Any, send: Any, done: Any) -> None:
        """A request outside the pipeline (models, health, admin, usage, metrics, dashboard, 404s): served
        as usual, then reported once (status, duration, error) for its access line."""
        started = time.perf_counter()
        status = [0]

        async def watch(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        scope["helixagent.error"] = None
        try:
            await self._http_inner(scope, receive, watch)
        finally:
            try:
                done(scope, status[0] or 499, started, scope.get("helixagent.error"))
            except Exception:
                log.exception("access hook failed")

    async def _http_inner(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        req = Request(scope, receive, send, self.forwarded)
        handler = self.routes.get((req.method, req.path))
        try:
            if handler is None:
                allowed: list[str] = []
                for method, prefix, h in self.prefix_routes:
                    if req.path.startswith(prefix) and len(req.path) > len(prefix):
                        if method == req.method:
                            await h(self, req, req.path[len(prefix):])
                            return
                        allowed.append(method)
                if allowed:
                    raise GatewayError(405, f"method {req.method} is not allowed on {req.path}",
                                       code="method_not_allowed", headers={"allow": ", ".join(sorted(allowed))})
                methods = self.paths.get(req.path)
                if methods:
                    raise GatewayError(405, f"method {req.method} is not allowed on {req.path}; use "
                                            f"{', '.join(sorted(methods))}", code="method_not_allowed",
                                       headers={"allow": ", ".join(sorted(methods))})
                raise GatewayError(404, f"no such endpoint: {req.method} {req.path}", code="unknown_url")
            await handler(self, req)
        except GatewayError as exc:
            exc.__traceback__ = None  # kept in scope for the access line: no frames (and bodies) with it
            scope["helixagent.error"] = exc
            await send_json(send, exc.status, self.error_body(req, exc), exc.response_headers(),
                            linger=receive if exc.status == 413 else None)  # body left unread: linger
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():
                return  # Request.body: the client left in the middle of its body; nobody to answer
            raise
        except Exception:
            log.exception("unhandled error on %s %s", req.method, req.path)
            err = GatewayError(500, "internal error", type="server_error", code="internal_error")
            scope["helixagent.error"] = err
            await send_json(send, 500, self.error_body(req, err))

    def error_body(self, req: Any, exc: GatewayError) -> dict[str, Any]:
        if req.path.startswith("/v1/messages"):
            return exc.anthropic_body()
        return exc.openai_body()


def tune_gc() -> None:
    """Garbage-collector settings for a long-running server: the objects built at start-up (config,
    SQLAlchemy metadata, catalogues, compiled regexes) move to the permanent generation so full
    collections stop re-scanning them, and young collections run less often.  Measured: about 15-30%
    less CPU per request with every stage on (bench/results/gateway.md)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 50)


def create_app(cfg: Config, config_path: str | None = None) -> Gateway:
    """The gateway for ``cfg``; raises ConfigError when :func:`helixagent.preflight.check_runtime` finds a
    problem (the same checks as ``helixagent config check``).  ``config_path``: the file ``cfg`` came from,
    re-read by a config reload (SIGHUP, ``POST /admin/reload``)."""
    from .preflight import require_runtime
    require_runtime(cfg)
    return Gateway(cfg, config_path)
