"""The observability stage (the first, outermost stage: its post-hook runs last, when every other stage
has filled in cost, cache status and identity) and the /metrics, /dashboard and /dashboard/data routes."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..api.http import _REQ_ID_OK
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from .access import AccessLog
from .metrics import CONTENT_TYPE, FLUSH_SECONDS, Metrics
from .metrics_server import start_metrics_server
from .tracing import setup_tracing
from .window import Window

log = logging.getLogger("helixagent.observability")

STATIC = Path(__file__).with_name("static")
REFRESH_SECONDS = 5.0
# Set by `helixagent serve` when it serves metrics.port itself (from the supervising process).
METRICS_PORT_SERVED_ENV = "HELIXAGENT_METRICS_PORT_SERVED"


class ObservabilityStage(Stage):
    name = "observability"
    outer = True

    def __init__(self, gw: GatewayLike):
        self.gw = gw
        self.metrics: Metrics | None = Metrics(gw) if gw.cfg.metrics.enabled else None
        self.window = Window()
        secrets = [gw.cfg.auth.master_key or ""]
        secrets += [p.api_key or "" for p in gw.cfg.providers]
        secrets += [p.cfg.api_key or "" for p in gw.providers.values()]
        secrets += gw.secrets.values()  # every configured secret (helixagent.redaction)
        self.access = AccessLog(gw.cfg, secrets)
        self.tracing = setup_tracing(gw.cfg)
        self._traced: list[Any] = []  # the provider objects tracing wrapped
        if self.tracing is not None:
            for p in gw.providers.values():
                self.tracing.instrument(p)
                self._traced.append(p)

    def reconfigure(self, gw: GatewayLike) -> None:
        """A config reload: the access log learns the new secrets, tracing instruments new providers and
        the metrics learn the new label values.  The access-log format, fields and file need a restart."""
        self.access.secrets = sorted({*self.access.secrets, *(s for s in gw.secrets.values() if len(s) >= 6)},
                                     key=len, reverse=True)
        if self.tracing is not None:
            for p in gw.providers.values():
                if not any(p is t for t in self._traced):
                    self.tracing.instrument(p)
                    self._traced.append(p)
            live = list(gw.providers.values())
            self._traced = [t for t in self._traced if any(t is p for p in live)]
        if self.metrics is not None:
            self.metrics.reconfigure(gw)

    async def pre(self, ctx: RequestContext) -> bool:
        ctx.state["obs"] = True  # entered: post() takes it back off the in-flight gauge
        m = self.metrics
        if m is not None:
            m._inflight_n += 1  # inflight_add(1), inline (only the event loop thread writes it)
        if self.tracing is not None:
            self.tracing.start(ctx)
        return False

    async def post(self, ctx: RequestContext) -> None:
        m = self.metrics
        entered = ctx.state.pop("obs", False)
        u = ctx.usage
        latency = ctx.latency
        if m is not None:
            if entered:
                m._inflight_n -= 1
            provider = m.record(ctx, latency)
        else:
            provider = ctx.provider or "none"
        cs = ctx.cache_status
        if cs is not None:
            low = cs.lower()
            cs = "hit" if "hit" in low else "miss" if "miss" in low else None
        self.window.add(int(time.time()), latency, ctx.error is not None, cs, provider,
                        u.prompt_tokens if u is not None else 0, u.completion_tokens if u is not None else 0,
                        ctx.cost or 0.0)
        self.access.emit(ctx)
        if self.tracing is not None:
            self.tracing.end(ctx)

    def http_done(self, scope: dict[str, Any], status: int, started: float, error: Any) -> None:
        """The access line of a request outside the pipeline (/v1/models, /health, /admin/*, /v1/usage,
        /metrics, /dashboard, unknown paths): the same fields, those that do not apply are null."""
        access = self.access
        if not access.logger.isEnabledFor(logging.INFO):
            return
        ua = rid = fwd = None
        for k, v in scope.get("headers") or ():
            if k == b"user-agent":
                ua = v.decode("latin-1")
            elif k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"x-forwarded-for":
                fwd = v.decode("latin-1")
        if rid is not None and not _REQ_ID_OK.match(rid):
            rid = None
        ctx = RequestContext(None, client_request_id=rid)  # type: ignore[arg-type]
        ctx.started = started
        ctx.finished_at = time.perf_counter()
        ctx.method = scope.get("method", "")
        ctx.path = scope.get("path", "")
        client = scope.get("client")
        ctx.ip = client[0] if client else ""
        fw = self.gw.forwarded
        if fwd and fw is not None:  # the same rule as the pipeline's (api/forwarded.py)
            ctx.ip = fw.client(ctx.ip, scope.get("headers") or ())
        ctx.user_agent = ua or ""
        ctx.identity = scope.get("helixagent.identity")
        ctx.status = status
        ctx.error = error
        access.emit(ctx)

    # -- dashboard data ----------------------------------------------------------------------------------
    def dashboard_data(self, span: int = 300) -> dict[str, Any]:
        gw = self.gw
        snap = self.window.snapshot(span=span)
        health = gw.services.get("health")
        avail = getattr(health, "availability", None) if health is not None else None
        bstate = getattr(health, "breaker_state", None) if health is not None else None
        providers = []
        for name, p in gw.providers.items():
            enabled = bool(p.cfg.enabled)
            a = 1.0 if enabled else 0.0
            if enabled and avail is not None:
                try:
                    a = float(avail(name))
                except Exception:  # noqa: BLE001 - DUBIOUS: the dashboard then shows availability 1.0
                    pass
            state = "closed" if enabled else "disabled"
            if bstate is not None:
                try:
                    state = str(bstate(name))
                except Exception:  # noqa: BLE001 - DUBIOUS: the dashboard then shows the breaker closed
                    pass
            w = snap["providers"].get(name, {})
            providers.append({"name": name, "type": p.cfg.type, "enabled": enabled, "availability": a,
                              "breaker": state, "stand_in_for": getattr(p, "stand_in_for", None),
                              "requests": w.get("requests", 0), "errors": w.get("errors", 0),
                              "prompt_tokens": w.get("prompt_tokens", 0),
                              "completion_tokens": w.get("completion_tokens", 0),
                              "cost": round(w.get("cost", 0.0), 6)})
        for name, w in snap["providers"].items():  # "none"/"other": requests that reached no provider
            if name not in gw.providers:
                providers.append({"name": name, "type": None, "enabled": None, "availability": None,
                                  "breaker": None, "stand_in_for": None, **w})
        snap["providers"] = providers
        snap["version"] = gw.version
        snap["pid"] = os.getpid()
        snap["workers"] = gw.cfg.server.workers
        snap["in_flight"] = self.metrics._inflight_n if self.metrics is not None else None
        queues = getattr(gw.router, "queues", None)
        snap["queues"] = queues.snapshot() if queues is not None else []  # this worker's (routing/queue.py)
        ens = gw.services.get("ensemble")
        snap["ensembles"] = ens.summary() if ens is not None else []
        return snap


# -- routes ---------------------------------------------------------------------------------------------------
def install(gw: GatewayLike) -> ObservabilityStage:
    stage = ObservabilityStage(gw)
    gw.services["observability"] = stage
    gw.add_stage(stage)
    cfg = gw.cfg
    m = stage.metrics
    if m is not None:
        gw.services["metrics"] = m

        async def metrics_route(gw: GatewayLike, req: Any) -> None:
            from ..api.http import send_bytes
            if not gw.services["auth"].open:  # with a master key, the main port's /metrics is admin-only
                await gw.authorize(req, "metrics")
            body = await asyncio.to_thread(m.exposition) if m.multiprocess else m.exposition()
            await send_bytes(req.send, 200, body, content_type=CONTENT_TYPE)

        gw.route("GET", cfg.metrics.path, metrics_route)
        refresher: dict[str, Any] = {}

        async def start() -> None:
            async def loop() -> None:
                n = 0
                while True:
                    try:
                        m.flush()
                        if n % int(REFRESH_SECONDS / FLUSH_SECONDS) == 0:
                            m.refresh()
                    except Exception:
                        log.exception("metrics flush failed")
                    n += 1
                    await asyncio.sleep(FLUSH_SECONDS)
            refresher["task"] = asyncio.ensure_future(loop())
            if cfg.metrics.port and not os.environ.get(METRICS_PORT_SERVED_ENV):
                refresher["server"] = start_metrics_server(m.exposition, cfg.server.host, cfg.metrics.port)

        async def stop() -> None:
            t = refresher.pop("task", None)
            if t is not None:
                t.cancel()
            srv = refresher.pop("server", None)
            if srv is not None:
                await asyncio.to_thread(srv.shutdown)
                srv.server_close()
            m.mark_dead()

        gw.on_startup(start)
        gw.on_shutdown(stop)

    gw.http_done = stage.http_done  # one access line for requests outside the pipeline too

    async def flush_access_log() -> None:
        stage.access.flush()

    gw.on_shutdown(flush_access_log)
    page = (STATIC / "dashboard.html").read_bytes()

    async def dashboard(gw: GatewayLike, req: Any) -> None:
        # The page is a static shell holding no data; the browser sends the admin key as a header to
        # /dashboard/data (a login form keeps it in sessionStorage, never in a URL).  So a browser
        # navigating here without a key (Accept: text/html) gets the shell and its sign-in form; any other
        # caller is authenticated like every admin endpoint (a key, and the admin role).
        from ..api.http import send_bytes
        if req.bearer() is not None or "text/html" not in req.headers.get("accept", ""):
            await gw.authorize(req, "admin")
        await send_bytes(req.send, 200, page, {"cache-control": "no-store", "vary": "accept, authorization",
                                               "content-security-policy": "default-src 'self'; script-src "
                                               "'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
                                               "x-frame-options": "DENY", "referrer-policy": "no-referrer"},
                         content_type=b"text/html; charset=utf-8")

    async def dashboard_data(gw: GatewayLike, req: Any) -> None:
        from ..api.http import send_json
        await gw.authorize(req, "admin")
        try:
            span = int(req.q("span", "300") or 300)
        except ValueError:
            span = 300
        await send_json(req.send, 200, stage.dashboard_data(span), {"cache-control": "no-store"})

    gw.route("GET", "/dashboard", dashboard)
    gw.route("GET", "/dashboard/data", dashboard_data)
    return stage
