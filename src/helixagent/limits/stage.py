"""The pipeline stage: :class:`LimitsStage` reserves a request's cost against every applicable limit
before the upstream call and settles it to the real usage afterwards; the ``x-ratelimit-*`` headers and
the 429/503/400 errors it answers with; :func:`install` wires the limiter into the gateway."""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext, Stage
from ..redis_client import PoolExhausted
from .backends import DAY, GCRA, BackendUnavailable, Reservation
from .limiter import (_UNIT_WORD, BUDGET_REFRESH_SECONDS, MICRO, REQ, TOK, USD, Limit, Limiter, Plan,
                      make_backend)

log = logging.getLogger("helixagent.limits")


def fmt_reset(seconds: float) -> str:
    """OpenAI's duration style: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, int(math.ceil(seconds * 1000)))}ms"
    s = int(math.ceil(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"



class LimitsStage(Stage):
    name = "limits"

    def __init__(self, limiter: Limiter):
        self.limiter = limiter
        self.backend = limiter.backend
        self.sync = getattr(limiter.backend, "sync", False)

    async def pre(self, ctx: RequestContext) -> bool:
        lm = self.limiter
        plan = lm.plan(ctx.identity)
        limits = plan.limits
        if plan.budgets:
            lm.active[plan.source.key_id] = plan
        if lm.ip_rpm is not None:
            limits = [Limit(REQ, GCRA, f"{lm.prefix}:ip:{ctx.ip}", lm.ip_rpm, f"IP {ctx.ip}", lm.ip_burst), *limits]
        if not limits:
            return False
        tok = usd = 0
        reserve = ctx.state.get("reserve")
        if reserve is not None and (plan.tok or plan.usd):
            # a request of several upstream calls (an ensemble) reserves its own worst case: every call
            # it may make, each priced at its provider (raises the unpriced 400 when a price is needed)
            tok, dollars = reserve(lm, plan.usd)
            usd = int(math.ceil(dollars * MICRO))
        elif plan.tok or plan.usd:
            tok = lm.estimate_tokens(ctx)
            if plan.usd:
                price = lm.estimate_price(ctx.request)
                if price is None:
                    raise _unpriced(ctx.request.model)
                pin, pout = price
                if ctx.endpoint != "embeddings":
                    out_est = tok - ctx.estimated_tokens
                    usd = int(math.ceil((ctx.estimated_tokens * pin + out_est * pout) * MICRO))
                else:
                    usd = int(math.ceil(tok * pin * MICRO))
        costs = [1 if x.unit == REQ else tok if x.unit == TOK else usd for x in limits]
        if self.sync:
            res = self.backend.reserve(limits, costs)
        else:
            try:
                res = await self.backend.reserve(limits, costs)
            except BackendUnavailable:
                self._policy(plan, lm.ip_rpm is not None)
                return False
            except PoolExhausted:
                raise _busy() from None
        headers = _headers(limits, res)
        if not res.ok:
            lm.rejected += 1
            bad = limits[res.failed]
            if bad.unit == REQ:
                msg = f"rate limit exceeded: {bad.describe()}; retry after {fmt_reset(res.retry_after)}"
            else:
                need = costs[res.failed]
                need_s = f"${need / MICRO:.6f}" if bad.unit == USD else f"{need} tokens"
                left = res.remaining[res.failed]
                left_s = f"${left / MICRO:.6f}" if bad.unit == USD else f"{left}"
                msg = (f"rate limit exceeded: {bad.describe()}; this request reserves about {need_s} "
                       f"({left_s} left); retry after {fmt_reset(res.retry_after)}")
            budget = bad.algo >= DAY  # a day/month token or cost budget, not a per-minute rate
            if budget:
                lm.budget_rejected += 1
                msg = "budget exceeded" + msg[len("rate limit exceeded"):]
            lm._emit("rejected", {"limit": bad.describe(), "unit": _UNIT_WORD[bad.unit],
                                  "reason": "budget" if budget else "rate_limit"})
            # the same 429, type and headers as OpenAI's rate limits; only the code tells a budget apart
            raise GatewayError(429, msg, type="rate_limit_error",
                               code="budget_exceeded" if budget else "rate_limit_exceeded",
                               retry_after=res.retry_after, headers=headers,
                               kind="budget_exceeded" if budget else "rate_limited")
        ctx.response_headers.update(headers)
        if plan.tok or plan.usd:
            ctx.state["limits"] = (limits, res.handles, costs)
        return False

    def _policy(self, plan: Plan, has_ip: bool) -> None:
        lm = self.limiter
        lm.backend_errors += 1
        pol = lm.rl.on_backend_error
        deny = ((plan.tok or plan.usd) and pol.budgets == "deny") or \
               ((plan.req or has_ip) and pol.requests == "deny")
        lm._emit("policy", {"decision": "deny" if deny else "allow"})
        if deny:
            raise GatewayError(503, "the rate limit backend is unavailable and rate_limits.on_backend_error "
                                    "denies requests until it is back", code="rate_limit_backend_unavailable",
                               retry_after=1, kind="limits_unavailable")

    async def post(self, ctx: RequestContext) -> None:
        r = ctx.state.pop("limits", None)
        if r is None:
            return
        limits, handles, costs = r
        lm = self.limiter
        p, c = lm.real_tokens(ctx)
        tokens = p + c
        usd = -1
        deltas: list[int] = []
        ttls: list[int] = []
        for lim, cost in zip(limits, costs, strict=True):
            if lim.unit == TOK:
                deltas.append(tokens - cost)
            elif lim.unit == USD:
                real = ctx.state.get("real_cost")  # several upstream calls: their real total, priced each
                if usd < 0 and real is not None:
                    usd = int(math.ceil(real * MICRO))
                if usd < 0:
                    price = lm.price(ctx.provider, ctx.upstream_model) if tokens else (0.0, 0.0)
                    # unknown here (a provider outside the candidates priced before): the reservation
                    # stands -- counted at the dearest candidate's price rather than as free
                    usd = cost if price is None else int(math.ceil((p * price[0] + c * price[1]) * MICRO))
                deltas.append(usd - cost)
            else:
                deltas.append(0)
            ttls.append(lim.ttl)
        if not any(deltas):
            return
        if self.sync:
            self.backend.settle(handles, deltas, ttls)
            return
        try:
            await self.backend.settle(handles, deltas, ttls)
        except (BackendUnavailable, PoolExhausted):
            lm.backend_errors += 1  # the reservation stands (counted high rather than lost)


def _unpriced(model: str) -> GatewayError:
    return GatewayError(400, f"model {model!r} has no known price, and this API key has a dollar budget: "
                             "a call it cannot price cannot be counted against the budget (the gateway's "
                             "rate_limits.unknown_price is 'reject'; set model_prices for it, or "
                             "unknown_price: default with default_price_per_mtok)",
                        type="invalid_request_error", param="model", code="model_price_unknown",
                        kind="model_price_unknown")


def _busy() -> GatewayError:
    return GatewayError(503, "the gateway is overloaded: no connection to the rate limit backend became free "
                             "in time (rate_limits.redis_pool_timeout); retry shortly",
                        code="rate_limit_backend_busy", retry_after=1, kind="limits_busy")


def _headers(limits: list[Limit], res: Reservation) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the tightest request and token limit."""
    h: dict[str, str] = {}
    rq = tk = -1
    rem = res.remaining
    for i, lim in enumerate(limits):
        if lim.unit == REQ:
            if rq < 0 or rem[i] < rem[rq]:
                rq = i
        elif lim.unit == TOK:
            if tk < 0 or rem[i] < rem[tk]:
                tk = i
    if rq >= 0:
        h["x-ratelimit-limit-requests"] = str(limits[rq].limit)
        h["x-ratelimit-remaining-requests"] = str(rem[rq])
        h["x-ratelimit-reset-requests"] = fmt_reset(res.reset[rq])
    if tk >= 0:
        h["x-ratelimit-limit-tokens"] = str(limits[tk].limit)
        h["x-ratelimit-remaining-tokens"] = str(rem[tk])
        h["x-ratelimit-reset-tokens"] = fmt_reset(res.reset[tk])
    return h


def install(gw: GatewayLike) -> None:
    backend = make_backend(gw.cfg)
    limiter = Limiter(gw.cfg, backend, gw)
    gw.services["limits"] = limiter
    gw.add_stage(LimitsStage(limiter))
    if not backend.sync:
        task: dict[str, Any] = {}

        async def loop() -> None:
            while True:
                await asyncio.sleep(BUDGET_REFRESH_SECONDS)
                try:
                    await limiter.refresh_budgets()
                except Exception:
                    log.exception("budget refresh failed")

        async def start() -> None:
            task["t"] = asyncio.ensure_future(loop())

        async def stop() -> None:
            t = task.pop("t", None)
            if t is not None:
                t.cancel()

        gw.on_startup(start)
        gw.on_shutdown(stop)
    gw.on_shutdown(backend.close)
