"""The routing plan for one public model name: the candidates (the providers serving the model, an
alias's targets, or the pinned provider, then each provider's ``fallback_to`` chain breadth-first), the
route that applies and each candidate's price and static cost-per-token verdict (router.py caches it)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import HedgingConfig
from ..errors import GatewayError, not_found
from ..providers import Provider
from . import costs
from .health import ProviderHealth, Throttle
from .queue import ProviderQueue

if TYPE_CHECKING:
    from .router import Router


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


def default_model(self: Router, p: Provider) -> str:
    ms = p.models()
    if not ms:
        raise GatewayError(400, f"provider {p.name!r} has no models configured; name a model", param="model",
                           code="model_required")
    return ms[0]


def route_for(self: Router, model: str) -> Route:
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


def select(self: Router, model: str, pinned: str | None) -> list[Candidate]:
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


def build_plan(self: Router, model: str, pinned: str | None) -> Plan:
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
