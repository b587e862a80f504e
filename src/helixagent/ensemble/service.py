"""The ensemble feature: ``POST /v1/ensemble/completions``, named ensembles as the model ``ensemble/<name>``
on every chat endpoint, the handler that runs a panel in place of the router, and the metrics.

How a request flows: the endpoint's parser (or, for ``ensemble/<name>``, the ``ensemble`` stage after auth)
resolves the panel into ``ctx.state["ensemble"]``; the same stage hands the limits stage the panel's worst
case (``ctx.state["reserve"]``) and keeps the request out of the response cache; the chat pipeline's handler
runs the panel instead of the router for such a request.  Everything else in the pipeline (auth, limits,
records, observability) applies to the ensemble request as to any other; each member call is a child
request with a record of its own (panel.py)."""
from __future__ import annotations

import functools
import time
from typing import Any, AsyncIterator, Callable

import orjson

from ..api import openai_format as fmt
from ..api.http import Request
from ..api.openai_routes import new_context, serve_chat
from ..canonical import ChatRequest
from ..errors import GatewayError, bad_request, not_found
from ..gateway_types import GatewayLike
from ..limits import Limiter
from ..pipeline import RequestContext, Stage
from ..routing import costs
from . import stream as estream
from .budget import worst_case
from .engine import Engine, combined_body, describe, response_of
from .metrics import EnsembleMetrics
from .panel import Calls
from .spec import PREFIX, Spec, check_edge, resolve
from .strategies import Decision

ENDPOINT = "/v1/ensemble/completions"
_STATS = ("requests", "errors", "members", "answered", "agreement", "decided", "decision_s", "cost", "left_out")


class EnsembleService:
    def __init__(self, gw: GatewayLike):
        self.gw = gw
        self.router = gw.router
        m = gw.services.get("metrics")
        self.metrics = EnsembleMetrics(m.registry) if m is not None else None
        self.stats: dict[str, dict[str, float]] = {}  # strategy -> totals since start (this worker; /dashboard)

    @property
    def default_completion(self) -> int:
        """``rate_limits.default_completion_tokens`` of the running config (a reload may change it, as it
        changes the limiter's, which prices the reservation itself)."""
        return self.gw.cfg.rate_limits.default_completion_tokens

    def price(self, provider: str, model: str) -> tuple[float, float] | None:
        p = self.router.providers.get(provider)
        return costs.price(p.cfg, model) if p is not None else None

    # -- resolving -----------------------------------------------------------------------------------
    def named(self, model: str) -> Spec:
        name = model[len(PREFIX):]
        ensembles = self.gw.cfg.ensembles  # read per request: a reloaded config's ensembles apply at once
        ec = ensembles.get(name)
        if ec is None:
            raise not_found(f"the ensemble {name!r} is not configured (configured: "
                            f"{', '.join(PREFIX + n for n in ensembles) or 'none'})",
                            code="model_not_found", param="model")
        return resolve(ec, self.router, "", name)

    def parse(self, raw: bytes) -> tuple[ChatRequest, dict[str, Any]]:
        """An OpenAI chat body plus ``ensemble_config`` (or a model ``ensemble/<name>``)."""
        body = fmt.load_json_object(raw)
        ec = check_edge(body.pop("ensemble_config")) if "ensemble_config" in body else None
        if ec is not None and "model" not in body and "provider" not in body:
            body["model"] = "ensemble"  # optional with an ensemble_config: the members name their models
        req, helix = fmt.parse_chat(orjson.dumps(body), self.gw.providers)
        if ec is not None:
            spec = resolve(ec, self.router, req.model)
        elif req.provider is None and req.model.startswith(PREFIX):
            spec = self.named(req.model)
        else:
            raise bad_request("'ensemble_config' is required (or name a configured ensemble as the model "
                              "'ensemble/<name>')", param="ensemble_config", code="missing_required_parameter")
        check_request(req)
        helix["_ensemble"] = spec
        return req, helix

    # -- the handler ---------------------------------------------------------------------------------
    def wrap(self, inner: Callable[[RequestContext], Any]) -> Callable[[RequestContext], Any]:
        async def handle(ctx: RequestContext) -> None:
            spec = ctx.state.get("ensemble")
            if spec is None:
                await inner(ctx)
                return
            await self.serve(ctx, spec)
        return handle

    def _calls(self, ctx: RequestContext) -> Calls:
        rec = self.gw.services.get("records")
        lm = self.gw.services.get("limits")
        return Calls(self.router, ctx, rec.writer.record if rec is not None else None,
                     lm if isinstance(lm, Limiter) else None)

    async def serve(self, ctx: RequestContext, spec: Spec) -> None:
        eng = Engine(spec, ctx.request, self._calls(ctx), self.router.health)
        ctx.state["ensemble_id"] = ctx.request_id
        # known before the panel runs: a stream's response head carries these too (the rest is in its last chunk)
        ctx.response_headers["x-helixagent-ensemble-id"] = ctx.request_id
        ctx.response_headers["x-helixagent-ensemble-strategy"] = spec.strategy
        if ctx.request.stream:
            ctx.stream = estream.combined_stream(self, ctx, eng)
            ctx.streamed = True
            return
        d: Decision | None = None
        try:
            answers = await eng.panel()
            d = eng.decision = await eng.decide(answers)
        except BaseException as exc:  # also a client that left: what the members spent still settles
            self.done(ctx, eng, None, exc if isinstance(exc, GatewayError) else None)
            raise
        body = combined_body(eng, d, ctx.request_id, int(time.time()), "logprobs" in ctx.request.params)
        body["ensemble"] = describe(eng, ctx.request_id, d, ctx.state.get("ensemble_reserved"))
        ctx.response = response_of(body, eng, d)
        self.done(ctx, eng, d, None)

    def done(self, ctx: RequestContext, eng: Engine, d: Decision | None, err: GatewayError | None) -> None:
        """The parent request's totals, headers and metrics (once, however it ended)."""
        if ctx.state.get("ensemble_done"):
            return
        ctx.state["ensemble_done"] = True
        calls = eng.calls
        ctx.usage = calls.usage
        ctx.cost = calls.cost
        if calls.limits_cost is not None:
            ctx.state["real_cost"] = calls.limits_cost
        h = ctx.response_headers
        answered = sum(1 for a in eng.final if a.ok)
        h["x-helixagent-ensemble-members"] = f"{answered}/{len(eng.spec.members)}"
        if calls.cost:
            h["x-helixagent-cost"] = costs.format_cost(calls.cost)
        if d is not None:
            w = d.winner.member
            ctx.provider = w.provider
            ctx.upstream_model = w.model
            h["x-helixagent-ensemble-decision"] = d.decision
            h["x-helixagent-ensemble-winner"] = w.provider
            h["x-helixagent-ensemble-agreement"] = f"{d.agreement:.3f}"
        latency = (eng.decided_at - ctx.started) if eng.decided_at is not None else None
        left = [a.status for a in calls.all if not a.ok and a is not eng.judge]
        st = self.stats.setdefault(eng.spec.strategy, dict.fromkeys(_STATS, 0.0))
        st["requests"] += 1
        st["errors"] += d is None
        st["members"] += len(eng.spec.members)
        st["answered"] += answered
        st["left_out"] += len(left)
        st["cost"] += calls.cost
        if d is not None:
            st["decided"] += 1
            st["agreement"] += d.agreement
        if latency is not None:
            st["decision_s"] += latency
        if self.metrics is not None:
            self.metrics.observe(eng.spec.strategy, d.decision if d is not None else "error", len(eng.spec.members),
                                 d.agreement if d is not None else None, latency, calls.cost, left)

    def summary(self) -> list[dict[str, Any]]:
        """Per strategy, since this worker started: requests, errors, mean panel size, answered members and
        agreement, mean decision latency, cost, members left out (the /dashboard's ensemble table)."""
        out = []
        for strategy, st in sorted(self.stats.items()):
            n = st["requests"] or 1.0
            dec = st["decided"] or 1.0
            out.append({"strategy": strategy, "requests": int(st["requests"]), "errors": int(st["errors"]),
                        "panel_size": round(st["members"] / n, 2), "answered": round(st["answered"] / n, 2),
                        "agreement": round(st["agreement"] / dec, 3) if st["decided"] else None,
                        "decision_ms": round(st["decision_s"] / dec * 1000, 1) if st["decided"] else None,
                        "cost": round(st["cost"], 6), "left_out": int(st["left_out"])})
        return out

    # -- SSE -----------------------------------------------------------------------------------------
    async def frames(self, ctx: RequestContext, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        include_usage = ctx.request.include_usage
        dumps = orjson.dumps
        async for chunk in chunks:
            if chunk is estream.KEEPALIVE:
                yield b": keep-alive\n\n"
                continue
            if chunk.get("usage") is not None and not chunk.get("choices") and not include_usage:
                continue
            yield b"data: " + dumps(chunk) + b"\n\n"
        if ctx.error is not None:
            yield b"data: " + dumps(ctx.error.openai_body()) + b"\n\n"
        else:
            yield b"data: [DONE]\n\n"


def check_request(req: ChatRequest) -> None:
    if getattr(req, "builtin", None) or getattr(req, "native_only", None):  # a Responses body for OpenAI only
        raise bad_request("an ensemble's members answer translated chat requests: built-in tools and OpenAI-only "
                          "items cannot go to a panel", param="tools", code="unsupported_feature")
    if req.endpoint not in ("chat", "responses"):
        raise bad_request("an ensemble answers chat requests (/v1/chat/completions, /v1/messages, /v1/responses, "
                          "/v1/ensemble/completions), not legacy completions", param="model")
    n = req.params.get("n")
    if n is not None and n != 1:
        raise bad_request("'n' must be 1 for an ensemble (the panel gives one combined answer)", param="n",
                          code="invalid_value")


class EnsembleStage(Stage):
    """After auth, before limits: a request for the model ``ensemble/<name>`` gets its panel; every ensemble
    request gets its worst-case reservation and skips the response cache."""

    name = "ensemble"

    def __init__(self, svc: EnsembleService):
        self.svc = svc

    async def pre(self, ctx: RequestContext) -> bool:
        spec = ctx.state.get("ensemble")
        req = ctx.request
        if spec is None:
            if not isinstance(req, ChatRequest) or req.provider is not None or not req.model.startswith(PREFIX):
                return False
            spec = self.svc.named(req.model)
            check_request(req)
            ctx.state["ensemble"] = spec
        ctx.state["ensemble_id"] = ctx.request_id  # its record is the parent's, refused by a later stage too
        ctx.state["ensemble_reserved"] = worst_case(spec, req, self.svc.price, self.svc.default_completion, False)
        ctx.state["reserve"] = functools.partial(_reserve, ctx, spec, req)
        helix = dict(ctx.state.get("helix") or {})
        helix["cache"] = False  # every member answers anew: an ensemble is never served from the cache
        ctx.state["helix"] = helix
        return False


def _reserve(ctx: RequestContext, spec: Spec, req: ChatRequest, limiter: Any, need_usd: bool) -> tuple[int, float]:
    got = worst_case(spec, req, limiter.price, limiter.default_completion, need_usd)
    ctx.state["ensemble_reserved"] = got
    return got


async def ensemble_completions(gw: GatewayLike, req: Request) -> None:
    svc: EnsembleService = gw.services["ensemble"]

    def on_parsed(ctx: RequestContext) -> None:
        ctx.state["ensemble"] = ctx.state["helix"].pop("_ensemble")
        ctx.state["ensemble_keepalive"] = True

    await serve_chat(gw, req, new_context(gw, req, "ensemble"), svc.parse,
                     render=lambda ctx: fmt.render_chat(ctx.response), frames=svc.frames,
                     error_body=GatewayError.openai_body, on_parsed=on_parsed)


def install(gw: GatewayLike) -> None:
    svc = EnsembleService(gw)
    gw.services["ensemble"] = svc
    gw.route("POST", ENDPOINT, ensemble_completions, pipeline=True)
    gw.add_stage(EnsembleStage(svc))
    gw.chat_pipeline.handler = svc.wrap(gw.chat_pipeline.handler)
