"""The label values of the per-request metrics and their :class:`Series`.

The exact HTTP statuses kept as a label value (:data:`STATUS_CODES`, others become their class), the
bucket bounds of the per-request histograms, the models that may be a label value
(:func:`known_models`), and :class:`Series`: the cached label children of one (provider, model, endpoint,
status) combination with the amounts its requests added since the last flush.  :class:`Metrics
<helixagent.observability.metrics.Metrics>` resolves and flushes them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import Counter

from ..gateway_types import GatewayLike

if TYPE_CHECKING:
    from .metrics import Metrics

# HTTP statuses kept exactly as a label value; any other becomes its class ("4xx").
STATUS_CODES = (200, 201, 204, 400, 401, 402, 403, 404, 405, 408, 409, 413, 415, 422, 429, 499,
                500, 501, 502, 503, 504, 529)
_STATUS: dict[int, str] = {}
for _c in range(100, 600):
    _STATUS[_c] = str(_c) if _c in STATUS_CODES else f"{_c // 100}xx"

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
UPSTREAM_BUCKETS = DURATION_BUCKETS


def status_label(code: int) -> str:
    return _STATUS.get(code) or "other"


def _bounds(buckets: tuple[float, ...]) -> tuple[float, ...]:
    """A histogram's bucket upper bounds as prometheus_client keeps them (+Inf last)."""
    return tuple(float(b) for b in buckets) + (float("inf"),)


_DURATION_UB = _bounds(DURATION_BUCKETS)
_UPSTREAM_UB = _bounds(UPSTREAM_BUCKETS)
_TTFT_UB = _bounds(TTFT_BUCKETS)


class Series:
    """The label children of one (provider, model, endpoint, status) combination, resolved on first use
    (so that a series appears only once it has something to say: no ``errors_total{status="200"} 0``), and
    the amounts its requests added since the last :meth:`Metrics.flush` (plain numbers: a request only adds
    to them; the flush hands them to the children, creating those a request needed)."""

    __slots__ = ("m", "labels", "requests", "duration", "tok_prompt", "tok_completion", "use_prompt",
                 "use_completion", "cost", "ttft", "upstream", "fallbacks", "retries", "errors",
                 "dirty", "n", "dsum", "dcounts", "tp", "tc", "csum", "usum", "ucounts", "tsum", "tcounts",
                 "fb", "rt")

    def __init__(self, m: "Metrics", labels: tuple[str, str, str, str]):
        p, mo, e, s = labels
        self.m = m
        self.labels = labels
        self.requests = m.requests.labels(*labels)
        self.duration = m.duration.labels(*labels)
        self.tok_prompt = m.tokens.labels(p, mo, e, s, "prompt") if s == "200" else None
        self.tok_completion = m.tokens.labels(p, mo, e, s, "completion") if s == "200" else None
        self.use_prompt: Any = None  # helixagent_token_usage_total{provider, model, type}, on first use
        self.use_completion: Any = None
        self.cost: Any = None
        self.ttft: Any = None
        self.upstream: Any = None
        self.fallbacks: Counter | None = None
        self.retries: Counter | None = None
        self.errors: dict[str, Any] = {}
        # -- pending since the last flush (written under Metrics._lock) --
        self.dirty = False  # in Metrics._dirty
        self.n = 0  # requests
        self.dsum = 0.0  # duration: sum and bucket counts
        self.dcounts = [0] * len(_DURATION_UB)
        self.tp = 0  # tokens: prompt, completion
        self.tc = 0
        self.csum: float | None = None  # cost (None: no request had one)
        self.usum = 0.0  # upstream latency (counts None: no request had one)
        self.ucounts: list[int] | None = None
        self.tsum = 0.0  # time to first token
        self.tcounts: list[int] | None = None
        self.fb = 0  # fallbacks, retries
        self.rt = 0

    def error(self, kind: str) -> Any:
        child = self.errors.get(kind)
        if child is None:
            child = self.errors[kind] = self.m.errors.labels(*self.labels, kind)
        return child

    def take(self) -> tuple[Any, ...]:
        """The pending amounts, and zero them (called with Metrics._lock held)."""
        out = (self.n, self.dsum, self.dcounts, self.tp, self.tc, self.csum, self.usum, self.ucounts, self.tsum,
               self.tcounts, self.fb, self.rt)
        self.dirty = False
        self.n = self.tp = self.tc = self.fb = self.rt = 0
        self.dsum = self.usum = self.tsum = 0.0
        self.dcounts = [0] * len(_DURATION_UB)
        self.csum = None
        self.ucounts = self.tcounts = None
        return out


def _inc_hist(child: Any, total: float, counts: list[int]) -> None:
    """Add observations to a histogram child: their sum, and how many fell in each bucket."""
    child._sum.inc(total)
    buckets = child._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


def known_models(gw: GatewayLike) -> set[str]:
    cfg = gw.cfg
    out: set[str] = set()
    for p in cfg.providers:
        out.update(p.models)
        out.update(p.model_prices)
    for prov in gw.providers.values():
        try:
            out.update(prov.models())
        except Exception:  # noqa: BLE001 - DUBIOUS: a bug in models() silently shrinks the model label set
            pass
    for targets in cfg.routing.aliases.values():
        out.update(t.model for t in targets)
    for r in cfg.routing.routes:
        out.update(r.models)
    cat = gw.services.get("catalogue") or gw.services.get("catalog")
    names = getattr(cat, "model_names", None)
    if names is not None:
        try:
            out.update(_strs(names()))
        except Exception:  # noqa: BLE001 - DUBIOUS: a bug in model_names() silently shrinks the label set
            pass
    return out


def _strs(it: Iterable[Any]) -> list[str]:
    return [x for x in it if isinstance(x, str)]
