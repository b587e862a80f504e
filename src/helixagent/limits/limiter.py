"""The limiter: the configured limits compiled per API key (:class:`Limit`, :class:`Plan`), the token
estimates and prices a reservation is counted in, and the day/month budgets reported by ``/metrics``
(:meth:`Limiter.budget_remaining`).  :class:`~helixagent.limits.stage.LimitsStage` reserves and settles
against them."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import RequestContext
from ..routing import costs
from ..tokens import estimate_messages, estimate_text
from .backends import (DAY, DAY_MS, GCRA, MINUTE_MS, MONTH, SLIDING, BackendUnavailable, MemoryBackend,
                       RedisBackend)

log = logging.getLogger("helixagent.limits")


REQ, TOK, USD = 0, 1, 2
MICRO = 1_000_000  # dollar budgets are counted in micro-dollars (integers, exact in Redis and Lua)
_TTL = {SLIDING: 2 * MINUTE_MS + 5000, GCRA: 2 * MINUTE_MS, DAY: 2 * DAY_MS, MONTH: 33 * DAY_MS}
_UNIT_WORD = {REQ: "requests", TOK: "tokens", USD: "cost"}
BUDGET_ACTIVE_SECONDS = 3600.0   # a principal's budgets are reported for an hour after its last request
BUDGET_MAX_TRACKED = 10_000      # at most this many budget counters are read per refresh
BUDGET_REFRESH_SECONDS = 5.0     # Redis: how often the tracked budgets are read
_WINDOW_WORD = {SLIDING: "per minute", GCRA: "per minute", DAY: "per day", MONTH: "per month"}

class Limit:
    __slots__ = ("unit", "algo", "key", "limit", "burst", "scope", "ttl", "cat")

    def __init__(self, unit: int, algo: int, key: str, limit: int, scope: str, burst: int = 0, cat: str = ""):
        self.unit = unit
        self.algo = algo
        self.key = key
        self.limit = limit
        self.burst = burst
        self.scope = scope
        self.ttl = _TTL[algo]
        self.cat = cat  # "api_key" | "user" | "application" | "ip": a metric label (never the principal)

    def describe(self) -> str:
        if self.unit == USD:
            return f"cost budget {_WINDOW_WORD[self.algo]} for {self.scope} (${self.limit / MICRO:g})"
        return f"{_UNIT_WORD[self.unit]} {_WINDOW_WORD[self.algo]} for {self.scope} (limit {self.limit})"


class Plan:
    __slots__ = ("limits", "req", "tok", "usd", "source", "budgets")

    def __init__(self, limits: list[Limit], source: Any):
        self.limits = limits
        self.req = any(x.unit == REQ for x in limits)
        self.tok = any(x.unit == TOK for x in limits)
        self.usd = any(x.unit == USD for x in limits)
        self.source = source
        self.budgets = [x for x in limits if x.algo >= DAY]  # day/month budgets (for budget_remaining)


EMPTY = Plan([], None)


class Limiter:
    """The configured limits and the backend, shared by the stage and by anyone who wants counters."""

    def __init__(self, cfg: Any, backend: Any, gw: GatewayLike | None = None):
        self.backend = backend
        self.gw = gw
        kp = getattr(backend, "key_prefix", None)  # the backend decides the key layout (Cluster: hash tag)
        rlp = cfg.rate_limits.key_prefix
        self.prefix = kp(rlp) if kp is not None else f"{rlp}:rl"  # fixed for the process (the counters' names)
        self._configure(cfg)
        # counters (read by /metrics) and event listeners: fn(event, info) with event in
        # "rejected", "backend_error", "backend_recovered", "policy"
        self.backend_errors = 0      # requests (or settlements) decided without the backend
        self.outages = 0
        self.rejected = 0
        self.budget_rejected = 0     # of the rejections: day/month token or cost budgets
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # budget_remaining(): the plans with day/month budgets used since the last computation (one dict
        # store per request), then tracked by limit key for BUDGET_ACTIVE_SECONDS
        self.active: dict[Any, Plan] = {}
        self._tracked: dict[str, tuple[Limit, float]] = {}
        if isinstance(backend, RedisBackend):
            backend.on_error = self._backend_down
            backend.on_recover = self._backend_up

    def _configure(self, cfg: Any) -> None:
        rl = cfg.rate_limits
        ip = rl.ip
        ip_rpm = ip.requests_per_minute if ip is not None else None
        ip_burst = 0
        if ip_rpm is not None:
            ip_burst = max(1, ip.burst_size if ip.burst_size is not None else ip_rpm)
        dp = rl.default_price_per_mtok
        configured = configured_budgets(rl)
        self.cfg = cfg
        self.rl = rl
        self.default_completion = rl.default_completion_tokens
        self.ip_rpm = ip_rpm
        self.ip_burst = ip_burst
        self._plans: dict[str, Plan] = {}
        self._prices: dict[tuple[str, str], tuple[float, float] | None] = {}
        self._est_prices: dict[tuple[Any, str], tuple[float, float] | None] = {}
        # the price of a model nobody priced, under rate_limits.unknown_price (None: reject)
        self.unknown_price: tuple[float, float] | None = (
            (dp.input / 1e6, dp.output / 1e6) if rl.unknown_price == "default" and dp is not None else None)
        self._configured = configured
        self._remaining: dict[tuple[str, str], float] = {
            k: getattr(self, "_remaining", {}).get(k, 1.0) for k in configured}

    def reconfigure(self, cfg: Any) -> None:
        """A config reload: new rules, budgets and prices.  The backend and its counters are kept (a
        reload never resets a limit); the compiled per-key plans and price memos are rebuilt on use.
        The backend settings and ``key_prefix`` need a restart (reload.py reports them)."""
        self._configure(cfg)

    # -- events ------------------------------------------------------------------------------------
    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for fn in self.listeners:  # a listener that fails is a bug: it propagates (a 500), never skipped
            fn(event, info)

    def _backend_down(self, exc: Exception | None) -> None:
        self.outages += 1
        rl = self.rl.on_backend_error
        log.error("rate limit backend (Redis) is unreachable (%s); until it is back, request limits are %s "
                  "and token/cost budgets are %s (rate_limits.on_backend_error)", type(exc).__name__ if exc else "",
                  "allowed" if rl.requests == "allow" else "denied",
                  "allowed" if rl.budgets == "allow" else "denied")
        self._emit("backend_error", {"error": type(exc).__name__ if exc else None})

    def _backend_up(self) -> None:
        log.warning("rate limit backend (Redis) is reachable again; limits are enforced")
        self._emit("backend_recovered", {})

    @property
    def backend_up(self) -> bool:
        """False while the (Redis) backend is in an outage."""
        return not getattr(self.backend, "in_outage", False)

    # -- budget_remaining ------------------------------------------------------------------------------
    def budget_remaining(self) -> dict[tuple[str, str], float]:
        """``{(scope, window): fraction}``: the lowest remaining fraction of any day/month token or cost
        budget among the principals (keys, users, applications) that used one in the last
        BUDGET_ACTIVE_SECONDS; 1.0 for a configured budget nobody used.  scope is ``api_key``, ``user`` or
        ``application`` and window ``day`` or ``month`` -- label values from the configuration only.
        The memory backend is read now; Redis is read by :meth:`refresh_budgets` every few seconds."""
        if getattr(self.backend, "sync", False):
            limits = self._collect()
            self._compute(limits, self.backend.used(limits))
        return self._remaining

    def _collect(self) -> list[Limit]:
        now = time.monotonic()
        active, self.active = self.active, {}
        tracked = self._tracked
        for plan in active.values():
            for lim in plan.budgets:
                tracked[lim.key] = (lim, now)
        cutoff = now - BUDGET_ACTIVE_SECONDS
        dead = [k for k, (_, t) in tracked.items() if t < cutoff]
        for k in dead:
            del tracked[k]
        if len(tracked) > BUDGET_MAX_TRACKED:  # keep the most recently used
            keep = sorted(tracked.items(), key=lambda kv: kv[1][1])[-BUDGET_MAX_TRACKED:]
            self._tracked = tracked = dict(keep)
        return [lim for lim, _ in tracked.values()]

    def _compute(self, limits: list[Limit], used: list[float]) -> None:
        out = dict.fromkeys(self._configured, 1.0)
        for lim, u in zip(limits, used, strict=True):
            k = (lim.cat, "day" if lim.algo == DAY else "month")
            frac = max(0.0, lim.limit - u) / lim.limit if lim.limit > 0 else 0.0
            if frac < out.get(k, 2.0):
                out[k] = frac
        self._remaining = out

    async def refresh_budgets(self) -> None:
        """Read the tracked budgets' usage from the backend (one MGET per 500 with Redis)."""
        limits = self._collect()
        if getattr(self.backend, "sync", False):
            used = self.backend.used(limits)
        else:
            try:
                used = await self.backend.used(limits)
            except BackendUnavailable:
                return  # keep the last values; the outage is counted and logged by the request path
        self._compute(limits, used)

    # -- plans ---------------------------------------------------------------------------------------
    def plan(self, ident: Any) -> Plan:
        if ident is None or ident.key_id is None or ident.is_master:
            return EMPTY
        p = self._plans.get(ident.key_id)
        if p is not None and p.source is ident:
            return p
        p = Plan(self._compile(ident), ident)
        if len(self._plans) > 100_000:
            self._plans.clear()
        self._plans[ident.key_id] = p
        return p

    def _compile(self, ident: Any) -> list[Limit]:
        rl = self.rl
        kl = ident.limits or {}
        pre = self.prefix
        out: list[Limit] = []

        def add(unit: int, algo: int, key: str, value: Any, scope: str) -> None:
            if value is None:
                return
            v = int(round(value * MICRO)) if unit == USD else int(value)
            cat = "api_key" if scope.startswith("API key ") else "user" if scope.startswith("user ") else "application"
            out.append(Limit(unit, algo, key, v, scope, cat=cat))

        kid = ident.key_id
        ks = f"API key {kid}"
        cost = rl.cost
        ak = rl.api_key
        add(REQ, SLIDING, f"{pre}:key:{kid}:rpm", kl.get("requests_per_minute", ak and ak.requests_per_minute), ks)
        add(TOK, SLIDING, f"{pre}:key:{kid}:tpm", kl.get("tokens_per_minute", ak and ak.tokens_per_minute), ks)
        add(TOK, DAY, f"{pre}:key:{kid}:tpd", kl.get("tokens_per_day"), ks)
        add(TOK, MONTH, f"{pre}:key:{kid}:tpmo", kl.get("tokens_per_month"), ks)
        ck = cost.api_key if cost else None
        add(USD, DAY, f"{pre}:key:{kid}:usd-d", kl.get("cost_per_day", ck and ck.per_day), ks)
        add(USD, MONTH, f"{pre}:key:{kid}:usd-m", kl.get("cost_per_month", ck and ck.per_month), ks)
        if ident.user_id is not None:
            u = ident.user_id
            us = f"user {u!r}"
            ul = rl.user
            if ul is not None:
                add(TOK, SLIDING, f"{pre}:user:{u}:tpm", ul.tokens_per_minute, us)
                add(TOK, DAY, f"{pre}:user:{u}:tpd", ul.tokens_per_day, us)
            cu = cost.user if cost else None
            if cu is not None:
                add(USD, DAY, f"{pre}:user:{u}:usd-d", cu.per_day, us)
                add(USD, MONTH, f"{pre}:user:{u}:usd-m", cu.per_month, us)
        if ident.application is not None:
            a = ident.application
            as_ = f"application {a!r}"
            if rl.application is not None:
                add(TOK, MONTH, f"{pre}:app:{a}:tpmo", rl.application.tokens_per_month, as_)
            ca = cost.application if cost else None
            if ca is not None:
                add(USD, DAY, f"{pre}:app:{a}:usd-d", ca.per_day, as_)
                add(USD, MONTH, f"{pre}:app:{a}:usd-m", ca.per_month, as_)
        return out

    # -- estimates and prices ------------------------------------------------------------------------
    def estimate_tokens(self, ctx: RequestContext) -> int:
        req = ctx.request
        if ctx.endpoint == "embeddings":
            n = 0
            for item in req.input:
                n += estimate_text(item) if isinstance(item, str) else len(item)
            return n
        prompt = estimate_messages(req.messages, req.params.get("tools"))
        ctx.estimated_tokens = prompt
        mt = req.max_tokens
        choices = req.params.get("n")
        choices = choices if isinstance(choices, int) and not isinstance(choices, bool) and choices > 0 else 1
        total: int = prompt + (mt if mt is not None else self.default_completion) * choices
        return total

    def price(self, provider: str | None, model: str | None) -> tuple[float, float] | None:
        """(dollars per input token, dollars per output token) of ``model`` at ``provider``: the provider's
        ``model_prices`` over the shipped catalogue (:func:`helixagent.routing.costs.price`), else
        ``rate_limits.default_price_per_mtok`` under ``unknown_price: default``; None when unknown."""
        key = (provider or "", model or "")
        if key in self._prices:
            return self._prices[key]
        p: tuple[float, float] | None = None
        prov = self.gw.providers.get(provider) if self.gw is not None and provider else None
        if prov is not None and model:
            p = costs.price(prov.cfg, model)
        if p is None:
            p = self.unknown_price
        if len(self._prices) > 100_000:
            self._prices.clear()
        self._prices[key] = p
        return p

    def estimate_price(self, req: Any) -> tuple[float, float] | None:
        """The dearest price among the providers that may serve the request (a conservative reservation);
        None when one of them has no known price (see ``rate_limits.unknown_price``)."""
        key = (req.provider, req.model)
        if key in self._est_prices:
            return self._est_prices[key]
        pin, pout = 0.0, 0.0
        out: tuple[float, float] | None
        try:
            assert self.gw is not None
            cands = self.gw.router.candidates(req.model, req.provider)
        except GatewayError:
            cands = []  # routing will answer the unknown model with its own error
        out = (0.0, 0.0)
        for c in cands:
            p = self.price(c.provider.name, c.model)
            if p is None:
                out = None
                break
            pin, pout = max(pin, p[0]), max(pout, p[1])
            out = (pin, pout)
        if len(self._est_prices) > 100_000:
            self._est_prices.clear()
        self._est_prices[key] = out
        return out

    def real_tokens(self, ctx: RequestContext) -> tuple[int, int]:
        """(prompt, completion) tokens the upstream really spent on this request."""
        if ctx.cache_status == "HIT":
            return 0, 0
        u = ctx.usage
        if u is not None:
            p, c = u.prompt_tokens, u.completion_tokens
            if not p and not c and u.total_tokens:
                p = u.total_tokens
            return p, c
        resp = ctx.response
        if resp is not None and ctx.endpoint != "embeddings":  # a stream that broke: count what arrived
            body = getattr(resp, "body", None) or {}
            text = ""
            for ch in body.get("choices") or ():
                text += ((ch.get("message") or {}).get("content") or "")
            return ctx.estimated_tokens, estimate_text(text)
        return 0, 0



def make_backend(cfg: Any) -> Any:
    rl = cfg.rate_limits
    if rl.backend == "redis":
        return RedisBackend(rl.redis_url, timeout=rl.redis_timeout, pool_size=rl.redis_pool_size,
                            pool_timeout=rl.redis_pool_timeout)
    return MemoryBackend()


def configured_budgets(rl: Any) -> list[tuple[str, str]]:
    """The (scope, window) budgets named in the configuration (per-key overrides add theirs when used)."""
    out: list[tuple[str, str]] = []
    if rl.user is not None and rl.user.tokens_per_day is not None:
        out.append(("user", "day"))
    if rl.application is not None and rl.application.tokens_per_month is not None:
        out.append(("application", "month"))
    cost = rl.cost
    if cost is not None:
        for scope in ("api_key", "user", "application"):
            c = getattr(cost, scope, None)
            if c is not None:
                if c.per_day is not None:
                    out.append((scope, "day"))
                if c.per_month is not None:
                    out.append((scope, "month"))
    return list(dict.fromkeys(out))
