"""Routing: which providers may serve a request, in which order, and failing over between them.

Per request:

1. **Plan** (cached per ``(pinned provider, model)``): the primary candidates (the providers serving
   the model, an alias's targets, or the pinned provider), each provider's ``fallback_to`` chain
   appended breadth-first, the route that applies (strategy, hedging, cost limits), each candidate's
   price and static cost-per-token verdict.
2. **Order**: the route's strategy orders the primary candidates (priority / cost / latency /
   weighted); the fallback chain follows.  Candidates whose circuit breaker is open, or whose estimated
   cost exceeds ``max_cost_per_request``, are left out; a (provider, model) still inside an upstream
   429/503 ``Retry-After`` (see ``health.Throttle``) moves behind the others.
3. **Execute**: attempts run one after another -- retries on the same provider with jittered
   exponential back-off that honours ``Retry-After``, then the next candidate -- all inside the
   request's budget (``routing.request_timeout_ms``); or, with hedging on, a second candidate is
   started when the first has not answered within its recent p95 latency and the first answer wins.

Layout: ``plan.py`` (candidates, routes, plans), ``ordering.py`` (step 2 and the errors for a request
no candidate is left for), ``mapping.py`` (mapping a request onto a candidate, the fallback-adaptation
rule ``_Mapped``), ``attempts.py`` (one upstream call, a stream's relay), ``hedge.py`` (hedged mode); the
``Router`` here holds the configuration, the plan cache, the entry points and the sequential loop with
retries and fallback.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, AsyncIterator, Awaitable

from ..canonical import ChatRequest, EmbeddingRequest
from ..config import Config, HedgingConfig, RouteConfig
from ..errors import GatewayError
from ..pipeline import RequestContext
from ..providers import Provider
from . import costs
from .attempts import attempt, relay
from .health import DENIED, NORMAL, OPEN, Health
from .hedge import hedged
from .mapping import _Mapped, prepare
from .ordering import cooling, nothing_left, order, unavailable
from .plan import Candidate, Plan, Route, build_plan, default_model, route_for, select
from .queue import BudgetSpent, LeasedStream, Queues

__all__ = ["Candidate", "Plan", "Route", "Router"]

log = logging.getLogger("helixagent.routing")

_monotonic = time.monotonic
_perf = time.perf_counter
_UNSET = object()


class Router:
    def __init__(self, cfg: Config, providers: dict[str, Provider], clock: Any = _monotonic):
        self.clock = clock
        self.health = Health(cfg.routing.circuit_breaker, providers, clock)
        self._configure(cfg, providers)
        # process-wide counters (the metrics exporter reads them)
        self.counters = {"attempts": 0, "retries": 0, "fallbacks": 0, "hedges": 0}

    def reconfigure(self, cfg: Config, providers: dict[str, Provider]) -> None:
        """A config reload: new providers, aliases, routes, strategy, retries and breaker settings.  The
        health/breaker state of every provider name is kept (``Health.reconfigure``); requests already
        routed keep the plan and the provider objects they started with."""
        self.health.reconfigure(cfg.routing.circuit_breaker, providers)
        self._configure(cfg, providers)

    def _configure(self, cfg: Config, providers: dict[str, Provider]) -> None:
        # every attribute is built first and then assigned: a request between two reads sees one config
        ordered = sorted((p for p in providers.values() if p.cfg.enabled), key=lambda p: p.cfg.priority)
        exact: dict[str, RouteConfig] = {}
        prefix: list[tuple[str, RouteConfig]] = []
        for rc in cfg.routing.routes:
            for m in rc.models:
                if m.endswith("*"):
                    prefix.append((m[:-1], rc))
                else:
                    exact.setdefault(m, rc)
        r = cfg.routing.retries
        g = cfg.routing
        self.cfg = cfg
        self.rcfg = cfg.routing
        self.providers = providers
        self.ordered = ordered
        self._plans: dict[tuple[str | None, str], Plan] = {}
        self._exact_routes = exact
        self._prefix_routes = prefix
        self.budget = cfg.routing.request_timeout_ms / 1000.0
        self._base = r.backoff_base_ms / 1000.0
        self._max_backoff = r.backoff_max_ms / 1000.0
        self._max_retry_after = r.max_retry_after_ms / 1000.0
        self._rl = (g.rate_limit_cooldown_max, g.rate_limit_cooldown_default, g.rate_limit_cooldown_after)
        queues: Queues | None = getattr(self, "queues", None)
        if queues is None:
            self.queues = Queues(cfg)  # concurrency caps as priority queues (queue.py)
        else:
            queues.reconfigure(cfg)  # a reload: the same queues with the new caps (waiters keep their place)
        from .coalesce import Coalescer
        co = cfg.routing.embedding_coalesce
        self.coalescer = Coalescer(self, co) if co.enabled else None

    # -- candidate selection (plan.py, ordering.py) -------------------------------------------------
    # (real methods that call the modules' functions, not the functions assigned as methods: compiled,
    # a function assigned in a class body is not bound)
    def default_model(self, p: Provider) -> str:
        return default_model(self, p)

    def route_for(self, model: str) -> Route:
        return route_for(self, model)

    def _select(self, model: str, pinned: str | None) -> list[Candidate]:
        return select(self, model, pinned)

    def _build_plan(self, model: str, pinned: str | None) -> Plan:
        return build_plan(self, model, pinned)

    def order(self, plan: Plan, req: Any, stream: bool = False, prompt_tokens: int = 0) -> list[Candidate]:
        return order(self, plan, req, stream, prompt_tokens)

    def _nothing_left(self, plan: Plan, over: list[str] | None, now: float, stream: bool = False) -> GatewayError:
        return nothing_left(self, plan, over, now, stream)

    def _unavailable(self, cands: list[Candidate], now: float, stream: bool = False) -> GatewayError:
        return unavailable(self, cands, now, stream)

    def _cooling(self, c: Candidate, wait: float, prev: GatewayError | None) -> GatewayError:
        return cooling(self, c, wait, prev)

    def candidates(self, model: str, pinned: str | None) -> list[Candidate]:
        """Every candidate for ``model`` in static order (primary by priority, then fallback chains)."""
        return self.plan(model, pinned).all

    def plan(self, model: str, pinned: str | None) -> Plan:
        key = (pinned, model)
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        out = self._build_plan(model, pinned)
        if len(self._plans) < 4096:
            self._plans[key] = out
        return out

    # -- execution: mapping.py (mapping a request onto a candidate), attempts.py (one upstream call, a
    # stream's relay), hedge.py (hedged mode); the sequential loop with retries and fallback is here
    def _prepare(self, c: Candidate, req: Any, op: str) -> tuple[Any, Any, list[str]]:
        return prepare(self, c, req, op)

    def _attempt(self, c: Candidate, sub: Any, op: str, remaining: float, probe: int, wire: Any,
                 sprobe: int = NORMAL) -> Awaitable[Any]:
        return attempt(self, c, sub, op, remaining, probe, wire, sprobe)

    def _hedged(self, ctx: RequestContext, cands: list[Candidate], req: ChatRequest, hcfg: HedgingConfig,
                m: _Mapped | None = None) -> Awaitable[tuple[Candidate, Any]]:
        return hedged(self, ctx, cands, req, hcfg, m)

    def _relay(self, ctx: RequestContext, c: Candidate, first: Any, stream: AsyncIterator[dict[str, Any]],
               sprobe: int = NORMAL) -> AsyncIterator[dict[str, Any]]:
        return relay(self, ctx, c, first, stream, sprobe)

    async def handle_chat(self, ctx: RequestContext, plan: Plan | None = None) -> None:
        """Serve ``ctx.request`` (the pipeline's handler); ``plan``: the candidates to use instead of the
        request's own plan (handle_pinned)."""
        req: ChatRequest = ctx.request
        if plan is None:
            plan = self.plan(req.model, req.provider)
        op = "stream" if req.stream else "chat"
        m = _Mapped(self, req, op)
        m.check(ctx, plan.primary)
        cands = self.order(plan, req, req.stream, ctx.estimated_tokens)
        hedging = plan.route.hedging
        if hedging is not None and len(cands) > 1:
            c, res = await self._hedged(ctx, cands, req, hedging, m)
        else:
            c, res = await self._sequential(ctx, cands, req, op, m)
        ctx.provider = c.name
        ctx.upstream_model = c.model
        m.served_by(ctx, c)
        if req.stream:
            first, stream, sprobe = res
            ctx.stream = self._relay(ctx, c, first, stream, sprobe)
            ctx.streamed = True
        else:
            ctx.response = res
            cost = costs.usage_cost(c.provider.cfg, c.model, c.price, res.usage)
            if cost is not None:
                ctx.cost = cost
                ctx.response_headers["x-helixagent-cost"] = costs.format_cost(cost)

    async def handle_pinned(self, ctx: RequestContext) -> None:
        """One call to exactly ``ctx.request.provider`` / ``ctx.request.model`` (an ensemble's member or
        judge): the normal call path -- mapping, breaker, retries, cost -- without the ``fallback_to`` chain,
        so a panel member is never answered by another member's provider."""
        req: ChatRequest = ctx.request
        assert req.provider is not None, "a pinned call names its provider"
        plan = self.plan(req.model, req.provider)
        if plan.fallback:
            plan = Plan(plan.primary, [], plan.route, plan.priced_out)
        await self.handle_chat(ctx, plan)

    async def handle_embeddings(self, ctx: RequestContext) -> None:
        req: EmbeddingRequest = ctx.request
        plan = self.plan(req.model, req.provider)
        m = _Mapped(self, req, "embed")
        m.check(ctx, plan.primary)
        co = self.coalescer
        if co is not None and co.accepts(req) and await co.submit(ctx, req, plan):
            return  # answered by a combined upstream call (coalesce.py)
        cands = self.order(plan, req)
        c, res = await self._sequential(ctx, cands, req, "embed", m)
        ctx.provider = c.name
        ctx.upstream_model = c.model
        ctx.response = res
        cost = costs.usage_cost(c.provider.cfg, c.model, c.price, res.usage)
        if cost is not None:
            ctx.cost = cost
            ctx.response_headers["x-helixagent-cost"] = costs.format_cost(cost)

    def _backoff(self, n: int, exc: GatewayError) -> float | None:
        """Seconds to wait before retry ``n`` (1-based) on the same provider; None = do not retry it."""
        ra = exc.retry_after
        if ra is not None:
            return ra if ra <= self._max_retry_after else None
        d = min(self._max_backoff, self._base * (1 << (n - 1)))
        return d * 0.5 + random.random() * d * 0.5  # "equal jitter"

    async def _sequential(self, ctx: RequestContext, cands: list[Candidate], req: Any, op: str,
                          m: _Mapped | None = None) -> tuple[Candidate, Any]:
        if m is None:
            m = _Mapped(self, req, op)
        deadline = self.clock() + self.budget
        last: GatewayError | None = None
        first_name: str | None = None
        counters = self.counters
        stream = op == "stream"
        for c in cands:
            h = c.health
            assert h is not None
            tries = 0
            failed = False
            wire: Any = _UNSET
            while True:
                now = self.clock()
                remaining = deadline - now
                if remaining <= 0:
                    raise m.named(last or self._budget_error())
                until = c.throttle.until  # type: ignore[union-attr]
                if until > now:  # a Retry-After cooldown (this request's or another's): wait or move on
                    wait = until - now
                    if (wait > self._max_retry_after or wait >= remaining
                            or any(x.throttle.until <= now for x in cands[cands.index(c) + 1:])):  # type: ignore[union-attr]
                        # too long to wait, or a later candidate is free (this one started cooling
                        # during the request): move on
                        last = self._cooling(c, wait, last)
                        if ctx.provider is None:
                            ctx.provider = c.name
                        break
                    await asyncio.sleep(wait)
                    continue
                if wire is _UNSET:  # map once per candidate: a request we cannot map never reaches it
                    if ctx.provider is None:
                        ctx.provider = c.name
                    try:
                        sub, wire, _ = m.get(c)
                    except GatewayError as exc:
                        m.skip(c, exc)  # it cannot serve the request as asked: the next one may
                        break
                lease = None
                if c.queue is not None:  # a concurrency cap: wait for a slot (queue.py), no health verdict
                    try:
                        lease = await c.queue.acquire(ctx, c.model, remaining)
                    except BudgetSpent:
                        raise m.named(last or self._budget_error()) from None
                    except GatewayError as exc:  # still busy: on to the next candidate, as for an overloaded one
                        last = exc
                        first_name = first_name or c.name
                        break
                    now = self.clock()
                    remaining = deadline - now
                probe = h.acquire(now)
                if probe == DENIED:
                    if lease is not None:
                        lease.release()
                    break
                sprobe = NORMAL
                if stream:
                    sprobe = h.stream.acquire(now)  # type: ignore[union-attr]
                    if sprobe == DENIED:
                        h.cancelled(probe)
                        if lease is not None:
                            lease.release()
                        break
                ctx.attempts += 1
                counters["attempts"] += 1
                if tries:
                    ctx.retries += 1
                    counters["retries"] += 1
                elif first_name is None:
                    first_name = c.name
                else:
                    ctx.fallbacks += 1
                    counters["fallbacks"] += 1
                ctx.candidates_tried.append(c.name)
                ctx.provider = c.name
                ctx.upstream_model = c.model
                try:
                    t0 = _perf()
                    res = await self._attempt(c, sub, op, remaining, probe, wire, sprobe)
                    ctx.upstream_latency = _perf() - t0  # to the whole answer, or a stream's first chunk
                    if lease is not None and stream:  # the slot is held until the stream ends
                        res = (res[0], LeasedStream(res[1], lease), res[2])
                        lease = None
                    return c, res
                except GatewayError as exc:
                    last = exc
                    if not exc.retryable:
                        raise
                finally:
                    if lease is not None:
                        lease.release()
                failed = True
                tries += 1
                if tries >= c.max_attempts or last.kind == "upstream_auth" or h.state is OPEN:
                    break
                delay = self._backoff(tries, last)
                if delay is None or delay >= deadline - self.clock():
                    break
                if delay > 0:
                    await asyncio.sleep(delay)
            if failed and last is not None:
                log.warning("provider %s failed (%s); %s", c.name, last.kind,
                            "falling back" if c is not cands[-1] else "no fallback left")
        if last is None:  # every candidate's breaker opened in the meantime, or could not serve it
            raise m.named(self._unavailable(m.unskipped(cands), self.clock(), stream))
        raise m.named(last)

    def _budget_error(self) -> GatewayError:
        return GatewayError(504, f"the request's time budget ({self.rcfg.request_timeout_ms} ms) ran out",
                            type="timeout_error", code="upstream_timeout", kind="timeout")
