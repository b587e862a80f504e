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
"""
from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from typing import Any, AsyncIterator

from ..canonical import ChatRequest, EmbeddingRequest, Usage
from ..config import Config, HedgingConfig, RouteConfig
from ..errors import GatewayError, not_found
from ..pipeline import RequestContext
from ..providers import Provider
from ..tokens import estimate_messages
from . import adapt, costs
from .health import DENIED, NORMAL, OPEN, Health, ProviderHealth, Throttle
from .queue import BudgetSpent, LeasedStream, ProviderQueue, Queues

log = logging.getLogger("helixagent.routing")

_monotonic = time.monotonic
_perf = time.perf_counter
_END = object()
_UNSET = object()
_NONE: list[Any] = []  # a shared empty list (never appended to)


class Candidate:
    __slots__ = ("provider", "model", "health", "price", "per_request_limit", "timeout", "max_attempts",
                 "weight", "name", "throttle", "drop_params", "queue")

    def __init__(self, provider: Provider, model: str):
        self.provider = provider
        self.model = model
        self.name = provider.name
        self.health: ProviderHealth | None = None
        self.throttle: Throttle | None = None  # the (provider, model) rate-limit cooldown
        self.price: tuple[float, float] | None = None
        self.per_request_limit: float | None = None
        self.timeout = provider.cfg.timeout_ms / 1000.0
        self.max_attempts = 1
        self.weight = provider.cfg.weight
        self.drop_params = False  # adapt a request it cannot serve as asked (adapt.py) instead of skipping
        self.queue: ProviderQueue | None = None  # its concurrency cap's queue (queue.py), when capped

    def __repr__(self) -> str:
        return f"Candidate({self.provider.name}, {self.model})"


class Route:
    """The routing policy that applies to one public model name."""

    __slots__ = ("strategy", "hedging", "max_cost_per_token", "max_cost_per_request", "drop_params")

    def __init__(self, strategy: str, hedging: HedgingConfig | None, cpt: float | None, cpr: float | None,
                 drop_params: bool | None = None):
        self.strategy = strategy
        self.hedging = hedging if hedging is not None and hedging.enabled else None
        self.max_cost_per_token = cpt
        self.max_cost_per_request = cpr
        self.drop_params = drop_params  # None: each provider's setting, else routing.drop_params


class Plan:
    __slots__ = ("primary", "fallback", "all", "route", "priced_out", "needs_estimate")

    def __init__(self, primary: list[Candidate], fallback: list[Candidate], route: Route,
                 priced_out: list[str]):
        self.primary = primary
        self.fallback = fallback
        self.all = primary + fallback
        self.route = route
        self.priced_out = priced_out
        self.needs_estimate = route.strategy == "cost" or any(
            c.per_request_limit is not None and c.price is not None for c in self.all)


def _min_limit(*vals: float | None) -> float | None:
    xs = [v for v in vals if v is not None]
    return min(xs) if xs else None


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

    # -- candidate selection -----------------------------------------------------------------------
    def default_model(self, p: Provider) -> str:
        ms = p.models()
        if not ms:
            raise GatewayError(400, f"provider {p.name!r} has no models configured; name a model", param="model",
                               code="model_required")
        return ms[0]

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

    def route_for(self, model: str) -> Route:
        rc = self._exact_routes.get(model)
        if rc is None:
            for prefix, r in self._prefix_routes:
                if model.startswith(prefix):
                    rc = r
                    break
        g = self.rcfg
        if rc is None:
            return Route(g.strategy, g.hedging, g.max_cost_per_token, g.max_cost_per_request)
        return Route(rc.strategy or g.strategy, rc.hedging if rc.hedging is not None else g.hedging,
                     _min_limit(rc.max_cost_per_token, g.max_cost_per_token),
                     _min_limit(rc.max_cost_per_request, g.max_cost_per_request), rc.drop_params)

    def _select(self, model: str, pinned: str | None) -> list[Candidate]:
        primary: list[Candidate] = []
        if pinned is not None:
            p = self.providers.get(pinned)
            if p is None or not p.cfg.enabled:
                raise not_found(f"provider {pinned!r} is not configured "
                                f"(configured: {', '.join(self.providers) or 'none'})",
                                code="provider_not_found", param="provider")
            primary.append(Candidate(p, model or self.default_model(p)))
        else:
            aliases = self.rcfg.aliases.get(model)
            if aliases:
                for t in aliases:
                    p = self.providers.get(t.provider)
                    if p is not None and p.cfg.enabled:
                        primary.append(Candidate(p, t.model))
                primary.sort(key=lambda c: c.provider.cfg.priority)
            elif not model:
                if not self.ordered:
                    raise not_found("no providers are configured", code="provider_not_found")
                p = self.ordered[0]
                primary.append(Candidate(p, self.default_model(p)))
            else:
                primary = [Candidate(p, model) for p in self.ordered if p.serves(model)]
            if not primary:
                raise not_found(f"the model {model!r} does not exist or is not served by any configured provider",
                                code="model_not_found", param="model")
        return primary

    def _build_plan(self, model: str, pinned: str | None) -> Plan:
        primary = self._select(model, pinned)
        # Fallback chains (breadth-first, no repeats).
        seen = {c.provider.name for c in primary}
        chain = list(primary)
        i = 0
        while i < len(chain):
            for name in chain[i].provider.cfg.fallback_to:
                if name in seen:
                    continue
                p = self.providers.get(name)
                if p is None or not p.cfg.enabled:
                    continue
                seen.add(name)
                m = chain[i].model if p.serves(chain[i].model) else (p.models()[0] if p.models() else None)
                if m:
                    chain.append(Candidate(p, m))
            i += 1
        route = self.route_for(model)
        retries = self.rcfg.retries
        kept: list[Candidate] = []
        priced_out: list[str] = []
        for c in chain:
            pc = c.provider.cfg
            c.health = self.health.get(c.name)
            c.throttle = self.health.throttle(c.name, c.model)
            c.queue = self.queues.get(pc.name)
            c.price = costs.price(pc, c.model)
            c.max_attempts = pc.max_retries + 1 if "max_retries" in pc.model_fields_set else retries.max_attempts
            c.drop_params = (route.drop_params if route.drop_params is not None else
                             pc.drop_params if pc.drop_params is not None else self.rcfg.drop_params)
            per_token = _min_limit(pc.max_cost_per_token, route.max_cost_per_token)
            if per_token is not None and c.price is not None and max(c.price) > per_token:
                priced_out.append(f"{c.name}/{c.model} costs {max(c.price):.10g}/token > {per_token:.10g}")
                continue
            c.per_request_limit = _min_limit(pc.max_cost_per_request, route.max_cost_per_request)
            kept.append(c)
        n_primary = sum(1 for c in kept if any(c is p for p in primary))
        return Plan(kept[:n_primary], kept[n_primary:], route, priced_out)

    def order(self, plan: Plan, req: Any, stream: bool = False, prompt_tokens: int = 0) -> list[Candidate]:
        """The candidates for this request, best first: strategy order, cost limits, open breakers out.
        ``prompt_tokens``: the prompt estimate when an earlier stage already made it (0 = count here)."""
        strategy = plan.route.strategy
        prim = plan.primary
        est: tuple[int, int] | None = None
        if plan.needs_estimate and isinstance(req, ChatRequest):
            mt = req.max_tokens
            est = (prompt_tokens or estimate_messages(req.messages, req.params.get("tools")),
                   mt if mt is not None else self.rcfg.estimate_completion_tokens)
        if strategy == "priority" or len(prim) < 2:
            seq = plan.all if not plan.fallback else prim + plan.fallback
        else:
            if strategy == "cost":
                pt, ct = est if est is not None else (1, 1)
                inf = float("inf")
                prim = sorted(prim, key=lambda c: inf if c.price is None else c.price[0] * pt + c.price[1] * ct)
            elif strategy == "latency":
                prim = sorted(prim, key=lambda c: c.health.latency(stream))  # type: ignore[union-attr]  # fleet's when shared
            elif strategy == "weighted":
                rnd = random.random
                prim = sorted(prim, key=lambda c: -(rnd() ** (1.0 / c.weight)) if c.weight > 0 else 1.0)
            seq = prim + plan.fallback
        now = self.clock()
        out: list[Candidate] = []
        over: list[str] | None = None
        benched: list[Candidate] | None = None
        for c in seq:
            h = c.health
            if not h.available(now) or stream and not h.stream.available(now):  # type: ignore[union-attr]
                continue
            lim = c.per_request_limit
            if lim is not None and est is not None and c.price is not None:
                cost = c.price[0] * est[0] + c.price[1] * est[1]
                if cost > lim:
                    if over is None:
                        over = []
                    over.append(f"{c.name}/{c.model} ~{cost:.6g} > {lim:.6g}")
                    continue
            if c.throttle.until > now:  # type: ignore[union-attr]  # in a Retry-After cooldown: last
                if benched is None:
                    benched = []
                benched.append(c)
                continue
            out.append(c)
        if benched is not None:
            if len(benched) > 1:
                benched.sort(key=lambda c: c.throttle.until)  # type: ignore[union-attr]
            out += benched
        if not out:
            raise self._nothing_left(plan, over, now, stream)
        return out

    def _nothing_left(self, plan: Plan, over: list[str] | None, now: float, stream: bool = False) -> GatewayError:
        if not plan.all or (over and all(c.health.available(now) and (  # type: ignore[union-attr]
                not stream or c.health.stream.available(now)) for c in plan.all)):  # type: ignore[union-attr]
            why = list(plan.priced_out) + list(over or ())
            return GatewayError(400, "no provider can serve this request within the configured cost limits ("
                                + "; ".join(why) + ")", code="cost_limit_exceeded", kind="cost_limit")
        return self._unavailable(plan.all, now, stream)

    def _unavailable(self, cands: list[Candidate], now: float, stream: bool = False) -> GatewayError:
        waits = []
        for c in cands:
            for b in (c.health, c.health.stream) if stream else (c.health,):  # type: ignore[union-attr]
                if b.state is OPEN:  # type: ignore[union-attr]
                    waits.append(b.cfg.cooldown - (now - b.opened_at))  # type: ignore[union-attr]
        what = "stream circuit breaker" if stream and not any(
            c.health.state is OPEN for c in cands) else "circuit breaker"  # type: ignore[union-attr]
        return GatewayError(503, f"every provider for this model is unavailable ({what} open: "
                            + ", ".join(c.name for c in cands) + ")", type="service_unavailable",
                            code="providers_unavailable", retry_after=max(0.0, min(waits)) if waits else None,
                            kind="breaker_open")

    def _cooling(self, c: Candidate, wait: float, prev: GatewayError | None) -> GatewayError:
        """The answer for a candidate skipped because of its Retry-After cooldown (no upstream call).
        When several are skipped, the client learns the soonest any of them is free again."""
        if prev is not None and prev.kind == "rate_limit_cooldown" and prev.retry_after <= wait:  # type: ignore[operator]
            return prev
        t = c.throttle
        assert t is not None
        rl = t.status == 429
        return GatewayError(t.status, f"provider {c.name!r} is {'rate limited' if rl else 'overloaded'} for model "
                            f"{c.model!r}: the upstream asked to retry after {wait:.3g} s",
                            type="rate_limit_error" if rl else "service_unavailable",
                            code="upstream_rate_limited" if rl else "upstream_overloaded", provider=c.name,
                            retryable=True, retry_after=wait, kind="rate_limit_cooldown")

    # -- execution ---------------------------------------------------------------------------------
    async def handle_chat(self, ctx: RequestContext) -> None:
        req: ChatRequest = ctx.request
        await self._serve_chat(ctx, self.plan(req.model, req.provider))

    async def handle_pinned(self, ctx: RequestContext) -> None:
        """One call to exactly ``ctx.request.provider`` / ``ctx.request.model`` (an ensemble's member or
        judge): the normal call path -- mapping, breaker, retries, cost -- without the ``fallback_to`` chain,
        so a panel member is never answered by another member's provider."""
        req: ChatRequest = ctx.request
        assert req.provider is not None, "a pinned call names its provider"
        plan = self.plan(req.model, req.provider)
        if plan.fallback:
            plan = Plan(plan.primary, [], plan.route, plan.priced_out)
        await self._serve_chat(ctx, plan)

    async def _serve_chat(self, ctx: RequestContext, plan: Plan) -> None:
        req: ChatRequest = ctx.request
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

    def _prepare(self, c: Candidate, req: Any, op: str) -> tuple[Any, Any, list[str]]:
        """The candidate's request, its vendor wire request and what was adapted (the mapping step; no
        upstream call, no verdict on the provider).  Input the mapping rejects is a 400, never retried nor
        counted (with ``drop_params`` on, refused parameters are first clamped or dropped: adapt.py); any
        other exception here is a gateway bug: a loud 500, never the provider's fault."""
        sub = req
        if req.model != c.model:
            sub = req.copy_for(c.model) if op != "embed" else EmbeddingRequest(c.model, req.input, req.params,
                                                                               req.provider)
        p = c.provider
        dropped: list[str] = _NONE
        try:
            if op == "embed" and type(p).embed is Provider.embed:  # no embeddings: refused before any call
                raise p.unsupported("embeddings", "model")
            if op != "embed":
                refused = sub.refusal_for(p)
                if refused is not None:
                    raise refused
            steps = 0
            while True:
                try:
                    wire = p.prepare(sub, op)
                    break
                except GatewayError as exc:
                    a = None
                    if c.drop_params and op != "embed" and exc.code == adapt.UNSUPPORTED and steps < adapt.MAX_STEPS:
                        a = adapt.adapt(sub, exc.param, p.cfg.type)
                    if a is None:
                        raise
                    sub, item = a
                    dropped = [*dropped, item]
                    steps += 1
            if c.drop_params and op != "embed":
                ign = adapt.ignored(sub, p.cfg.type)
                if ign:
                    dropped = [*dropped, *ign]
            return sub, wire, dropped
        except GatewayError as exc:
            exc.retryable = False
            if exc.provider is None:
                exc.provider = c.name
            raise
        except Exception:
            log.exception("mapping the request for provider %s (%s) failed: a gateway bug", c.name,
                          c.provider.cfg.type)
            raise GatewayError(500, f"internal error while preparing the request for provider {c.name!r}",
                               type="server_error", code="internal_error", kind="internal") from None

    async def _attempt(self, c: Candidate, sub: Any, op: str, remaining: float, probe: int, wire: Any,
                       sprobe: int = NORMAL) -> Any:
        """One upstream call with a prepared request, bounded by the provider's timeout and the request's
        remaining budget.  Reports the outcome to the provider's breaker.  For streams: returns (first
        chunk, stream, stream-breaker probe); the stream breaker's verdict comes when the stream ends."""
        h = c.health
        assert h is not None
        budget_limited = remaining < c.timeout
        p = c.provider
        # Non-streamed calls are bounded by the HTTP client's total timeout (providers/http.py); the
        # router arms its own timer for the wait for a stream's first chunk (the HTTP client bounds
        # only each read there) and whenever the request's remaining budget is the tighter bound.
        timer: _Timer | None = None
        if op == "stream" or budget_limited:
            timer = _Timer(remaining if budget_limited else c.timeout)
        t0 = _perf()
        res: Any  # ChatResponse | (first chunk, stream) | EmbeddingResponse
        first: object
        try:
            if op == "stream":
                s = await p.send(sub, op, wire)
                try:
                    first = await s.__anext__()
                except StopAsyncIteration:
                    first = _END
                except BaseException:
                    await _aclose(s)
                    raise
                res = (first, s, sprobe)
            else:
                res = await p.send(sub, op, wire)
        except GatewayError as exc:
            if op == "stream":
                h.stream.cancelled(sprobe)  # type: ignore[union-attr]  # no stream verdict before the first chunk
            if not exc.retryable and (exc.status >= 500 or exc.status == 429):
                exc.retryable = True  # an upstream failure (e.g. a stream that broke before its first chunk)
            if exc.status == 429:
                h.throttled(probe, exc.kind)
                c.throttle.hit(self.clock(), 429, exc.retry_after, *self._rl)  # type: ignore[union-attr]
            elif exc.retryable:
                h.failure(probe, exc.kind)
                if exc.retry_after is not None and exc.kind == "overloaded":
                    c.throttle.hit(self.clock(), 503, exc.retry_after, *self._rl)  # type: ignore[union-attr]
            else:  # the provider answered (the request was at fault): it is up
                h.success(None, False, probe)
            raise
        except asyncio.CancelledError:
            if op == "stream":
                h.stream.cancelled(sprobe)  # type: ignore[union-attr]
            if timer is None or not timer.expired:
                h.cancelled(probe)
                raise
            timer.task.uncancel()
            if budget_limited:  # our budget ran out, not the provider's timeout: no verdict
                h.cancelled(probe)
                raise self._budget_error() from None
            h.failure(probe, "timeout")
            raise GatewayError(504, f"provider {c.name!r} timed out after {c.provider.cfg.timeout_ms} ms",
                               type="timeout_error", code="upstream_timeout", provider=c.name, retryable=True,
                               kind="timeout") from None
        except Exception:
            # Not the provider's: the adapters turn every upstream failure and every answer they cannot
            # read into a GatewayError (providers/base.py read_answer), so this is a gateway bug.
            # Loud, not retried, no verdict on the provider.
            if op == "stream":
                h.stream.cancelled(sprobe)  # type: ignore[union-attr]
            h.cancelled(probe)
            log.exception("provider %s: the gateway failed handling the call (a gateway bug)", c.name)
            raise GatewayError(500, f"internal error while calling provider {c.name!r}", type="server_error",
                               code="internal_error", provider=c.name, kind="internal") from None
        finally:
            if timer is not None:
                timer.handle.cancel()
        h.success(_perf() - t0 if op != "embed" else None, op == "stream", probe)
        t = c.throttle
        if t.streak:  # type: ignore[union-attr]
            t.streak = 0  # type: ignore[union-attr]
        return res

    async def _hedged(self, ctx: RequestContext, cands: list[Candidate], req: ChatRequest,
                      hcfg: HedgingConfig, m: _Mapped | None = None) -> tuple[Candidate, Any]:
        """Race candidates: start the next one when the newest has not answered within its p95 latency
        (at least ``min_delay_ms``), at most ``max_extra`` extra; the first answer wins and the others
        are cancelled.  A failed attempt is replaced by the next candidate at once (no same-provider
        retry in hedged mode)."""
        op = "stream" if req.stream else "chat"
        if m is None:
            m = _Mapped(self, req, op)
        mapped = m
        deadline = self.clock() + self.budget
        tasks: dict[asyncio.Task[Any], Candidate] = {}
        idx = 0
        extra = 0
        last: GatewayError | None = None
        last_launch = 0.0
        hedge_delay: float | None = None
        cooling: GatewayError | None = None
        counters = self.counters
        floor = hcfg.min_delay_ms / 1000.0

        def launch(hedge: bool) -> bool:
            nonlocal idx, last_launch, hedge_delay, cooling
            while idx < len(cands):
                c = cands[idx]
                idx += 1
                now = self.clock()
                until = c.throttle.until  # type: ignore[union-attr]
                if until > now:  # in a Retry-After cooldown: hedged mode does not wait
                    cooling = self._cooling(c, until - now, cooling)
                    continue
                try:
                    sub, wire, _ = mapped.get(c)
                except GatewayError as exc:
                    if ctx.provider is None:
                        ctx.provider = c.name
                    mapped.skip(c, exc)  # it cannot serve the request as asked: the next one may
                    continue
                h = c.health
                probe = h.acquire(now)  # type: ignore[union-attr]
                if probe == DENIED:
                    continue
                sprobe = NORMAL
                if req.stream:
                    sprobe = h.stream.acquire(now)  # type: ignore[union-attr]
                    if sprobe == DENIED:
                        h.cancelled(probe)  # type: ignore[union-attr]
                        continue
                ctx.attempts += 1
                counters["attempts"] += 1
                if ctx.candidates_tried:
                    if hedge:
                        counters["hedges"] += 1
                    else:
                        ctx.fallbacks += 1
                        counters["fallbacks"] += 1
                ctx.candidates_tried.append(c.name)
                if c.queue is not None:
                    from .queue import queued_attempt
                    t = asyncio.ensure_future(queued_attempt(self, ctx, c, sub, op, deadline, probe, wire, sprobe))
                else:
                    t = asyncio.ensure_future(self._attempt(c, sub, op, deadline - now, probe, wire, sprobe))
                tasks[t] = c
                last_launch = now
                stats = c.health.ttfb if req.stream else c.health.full  # type: ignore[union-attr]
                hedge_delay = max(floor, stats.p95() or 0.0) if stats.count >= hcfg.min_samples else None
                return True
            return False

        started = _perf()
        if not launch(False):
            raise m.named(cooling or self._unavailable(m.unskipped(cands), self.clock(), req.stream))
        try:
            while tasks:
                now = self.clock()
                wait = deadline - now
                can_hedge = extra < hcfg.max_extra and idx < len(cands) and hedge_delay is not None
                if can_hedge:
                    wait = min(wait, last_launch + hedge_delay - now)  # type: ignore[operator]
                done, _ = await asyncio.wait(tasks, timeout=max(0.0, wait), return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if self.clock() >= deadline:
                        raise m.named(last or self._budget_error())
                    if can_hedge:
                        extra += 1
                        ctx.state["hedged"] = extra
                        launch(True)
                    continue
                for t in done:
                    c = tasks.pop(t)
                    exc = t.exception()
                    if exc is None:
                        ctx.upstream_latency = _perf() - started
                        return c, t.result()
                    if not isinstance(exc, GatewayError) or not exc.retryable:
                        ctx.provider = c.name
                        raise exc
                    last = exc
                    ctx.provider = c.name
                if not tasks and not launch(False):
                    break
        finally:
            for t, lc in tasks.items():  # the losers
                t.cancel()
                t.add_done_callback(functools.partial(_reap, lc))
        assert last is not None
        raise m.named(last)

    async def _relay(self, ctx: RequestContext, c: Candidate, first: Any, stream: AsyncIterator[dict[str, Any]],
                     sprobe: int = NORMAL) -> AsyncIterator[dict[str, Any]]:
        """The client's stream: the first chunk (already received), then the rest.  How the stream ends
        is judged by the provider's *stream* breaker only (health.py): a failure after the first chunk is
        a cut, a stream that ends as it should a success; a client that leaves (or a gateway bug) gives
        no verdict.  The pipeline turns a failure into an error event."""
        assert c.health is not None and c.health.stream is not None
        sh = c.health.stream
        usage = None
        verdict = False
        try:
            if first is not _END:
                usage = first.get("usage")
                yield first
                async for chunk in stream:
                    u = chunk.get("usage")
                    if u:
                        usage = u
                    yield chunk
            verdict = True
            sh.success(None, True, sprobe)
        except GatewayError as exc:
            verdict = True
            sh.failure(sprobe, exc.kind)
            raise
        finally:
            if not verdict:
                sh.cancelled(sprobe)
            await _aclose(stream)
        if usage and c.price is not None:
            cost = costs.usage_cost(c.provider.cfg, c.model, c.price, Usage.from_openai(usage))
            if cost is not None:
                ctx.cost = cost



class _Mapped:
    """One request's mapping onto its candidates: each candidate's prepared request (mapped once), the
    candidates skipped because they cannot serve the request as asked, and the adaptations made.

    The rule (docs/routing.md, "Requests a provider cannot serve as asked"): the request is judged
    against the *primary* candidates -- the model the client named -- whatever their health: malformed
    input is a 400 at once, and a request none of them can serve as asked is the first one's 400
    (``unsupported_feature``), never sent anywhere.  Any other candidate whose mapping refuses it is
    skipped, and named in the error when no candidate answers; the error is then the failure of those
    that were tried (5xx/429 with its Retry-After), never a fallback's 400."""

    __slots__ = ("router", "req", "op", "done", "skipped", "primary", "named_ids")

    def __init__(self, router: Router, req: Any, op: str):
        self.router = router
        self.req = req
        self.op = op
        self.done: dict[Candidate, tuple[Any, Any, list[str]] | GatewayError] = {}
        self.skipped: list[tuple[Candidate, GatewayError]] = _NONE  # allocated on the first skip
        self.primary: list[Candidate] = _NONE
        self.named_ids: set[int] | None = None

    def get(self, c: Candidate) -> tuple[Any, Any, list[str]]:
        """(request, wire request, adaptations) for ``c``, or its mapping's GatewayError."""
        hit = self.done.get(c)
        if hit is None:
            try:
                hit = self.router._prepare(c, self.req, self.op)
            except GatewayError as exc:
                hit = exc
            self.done[c] = hit
        if isinstance(hit, GatewayError):
            raise hit
        return hit

    def check(self, ctx: RequestContext, primary: list[Candidate]) -> None:
        """Raise the 400 for a request no primary candidate can serve as asked (or malformed input)."""
        self.primary = primary
        first: GatewayError | None = None
        for c in primary:
            try:
                self.get(c)
                return
            except GatewayError as exc:
                if exc.code != adapt.UNSUPPORTED:
                    ctx.provider = ctx.provider or c.name
                    raise
                if first is None:
                    first = exc
        if first is not None:
            ctx.provider = ctx.provider or first.provider
            raise first

    def skip(self, c: Candidate, exc: GatewayError) -> None:
        """``c``'s mapping refused the request: skip it (a gateway bug, a 5xx, is raised)."""
        if exc.status >= 500:
            raise exc
        if self.skipped is _NONE:
            self.skipped = []
        if all(x is not c for x, _ in self.skipped):
            self.skipped.append((c, exc))
            log.info("provider %s skipped: cannot serve the request as asked (%s)", c.name, exc.code)

    def unskipped(self, cands: list[Candidate]) -> list[Candidate]:
        """The candidates not skipped (those the breakers left out included): the unavailable ones."""
        sk = [x for x, _ in self.skipped]
        out: list[Candidate] = []
        for c in (*self.primary, *cands):
            if all(c is not x for x in sk) and all(c is not x for x in out):
                out.append(c)
        return out or cands

    def named(self, err: GatewayError) -> GatewayError:
        """``err`` naming the candidates skipped because they cannot serve the request as asked."""
        if not self.skipped:
            return err
        if self.named_ids is None:
            self.named_ids = set()
        if id(err) not in self.named_ids:
            self.named_ids.add(id(err))
            err.message += (" [skipped, cannot serve this request as asked: "
                            + "; ".join(f"{c.name}: {e.message}" + (f" (param {e.param!r})" if e.param else "")
                                        for c, e in self.skipped) + "]")
            err.args = (err.message,)
        return err

    def served_by(self, ctx: RequestContext, c: Candidate) -> None:
        """Name what was adapted for the candidate that answered (header, record state)."""
        hit = self.done.get(c)
        if isinstance(hit, tuple) and hit[2]:
            adapt.add_dropped(ctx.response_headers, hit[2])
            ctx.state["dropped_params"] = hit[2]


class _Timer:
    """A deadline for the current task: cancels it when it expires (cheaper than asyncio.timeout)."""

    __slots__ = ("task", "expired", "handle")

    def __init__(self, seconds: float):
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a _Timer is armed inside a task"
        self.task = task
        self.expired = False
        self.handle = loop.call_at(loop.time() + seconds, self._fire)

    def _fire(self) -> None:
        self.expired = True
        self.task.cancel()


def _reap(c: Candidate, t: asyncio.Task[Any]) -> None:
    """Done-callback of a cancelled hedge loser: retrieve its outcome; close a stream it opened anyway
    (and free its stream-breaker probe: an abandoned stream gives no verdict)."""
    if t.cancelled():
        return
    exc = t.exception()
    if exc is None:
        res = t.result()
        if isinstance(res, tuple) and len(res) == 3 and hasattr(res[1], "aclose"):
            c.health.stream.cancelled(res[2])  # type: ignore[union-attr]
            asyncio.ensure_future(_aclose(res[1]))


async def _aclose(stream: Any) -> None:
    closer = getattr(stream, "aclose", None)
    if closer is not None:
        try:
            await closer()
        except Exception:  # noqa: BLE001 - closing an abandoned upstream stream (its socket may be gone)
            pass
