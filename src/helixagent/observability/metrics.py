"""Prometheus metrics.

Every label value comes from the configuration or from a fixed set in this module, never from raw client
input, so no client can explode the number of series:

* ``provider`` -- a configured provider name, ``none`` (no provider was reached) or ``other``;
* ``model``    -- a model named in the configuration (a provider's ``models``/``model_prices``, an alias
  target, a routing rule), ``none`` or ``other`` for anything else;
* ``endpoint`` -- a registered API route path (``/v1/chat/completions``, ...) or ``other``;
* ``status``   -- an exact HTTP status from :data:`STATUS_CODES`, else its class (``4xx``).

The per-request cost is a few dictionary look-ups and the value increments: the label children of each
(provider, model, endpoint, status) combination are resolved once and cached in :class:`Series`
(which lives in :mod:`.series` with the label values and histogram bounds).

Several worker processes: ``helixagent serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start; prometheus_client then keeps every value in per-process memory-mapped files and a scrape, whichever
worker answers it, adds up the files of all workers (``MultiProcessCollector``).
"""
from __future__ import annotations

import logging
import os
import re
import threading
from bisect import bisect_left
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..gateway_types import GatewayLike
from .multiproc import multiprocess_active, multiprocess_dir, scrape_multiprocess
from .series import _DURATION_UB, _STATUS, _TTFT_UB, _UPSTREAM_UB, Series, _inc_hist
from .series import DURATION_BUCKETS as DURATION_BUCKETS
from .series import STATUS_CODES as STATUS_CODES
from .series import TTFT_BUCKETS as TTFT_BUCKETS
from .series import UPSTREAM_BUCKETS as UPSTREAM_BUCKETS
from .series import known_models as known_models
from .series import status_label as status_label

log = logging.getLogger("helixagent.metrics")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# Error kinds / cache results are produced by gateway code, not clients; still, cap the distinct values.
_MAX_KINDS = 48
_KIND_OK = re.compile(r"^[a-z0-9_]{1,40}$")

QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUE_PRIORITIES = ("high", "normal", "low")
QUEUE_REJECTIONS = ("timeout", "full")

FLUSH_SECONDS = 0.5

BUDGET_SCOPES = ("api_key", "user", "application", "global")
BUDGET_WINDOWS = ("day", "month", "all")

BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "halfopen": 1, "open": 2}


class Metrics:
    def __init__(self, gw: GatewayLike):
        cfg = gw.cfg
        self.gw = gw
        self.multiprocess = multiprocess_active()
        self.dir = multiprocess_dir() if self.multiprocess else None
        prometheus_client.disable_created_metrics()  # no *_created series: less noise, cheaper scrapes
        self.registry = reg = CollectorRegistry(auto_describe=False)
        L = ("provider", "model", "endpoint", "status")
        PM = ("provider", "model")
        self.requests = Counter("helixagent_requests", "Requests answered, by outcome", L, registry=reg)
        self.duration = Histogram("helixagent_request_duration_seconds",
                                  "Request duration from arrival to the end of the answer (the stream's end)",
                                  L, buckets=DURATION_BUCKETS, registry=reg)
        self.tokens = Counter("helixagent_tokens_used", "Tokens used, as reported by the provider",
                              L + ("type",), registry=reg)
        # The seed's `curl .../metrics | grep token_usage`: the same tokens by provider and model only.
        self.token_usage = Counter("helixagent_token_usage", "Tokens used by provider and model (prompt, "
                                   "completion), as reported by the provider", PM + ("type",), registry=reg)
        self.errors = Counter("helixagent_errors", "Requests that ended in an error", L + ("kind",), registry=reg)
        self.availability = Gauge("helixagent_provider_availability",
                                  "1 when the provider is available, 0 when not (fraction when the health "
                                  "service reports one); lowest value among live workers",
                                  ("provider",), registry=reg, multiprocess_mode="livemin")
        self.breaker = Gauge("helixagent_provider_breaker_state",
                             "Circuit breaker state: 0 closed, 1 half-open, 2 open (worst among live workers)",
                             ("provider",), registry=reg, multiprocess_mode="livemax")
        self.cooldown = Gauge("helixagent_provider_rate_limit_cooldown_seconds",
                              "Seconds left of an upstream Retry-After during which the router does not call "
                              "this provider/model first (0 when none; longest among live workers)",
                              PM, registry=reg, multiprocess_mode="livemax")
        self._cooling: set[tuple[str, str]] = set()
        self.ttft = Histogram("helixagent_time_to_first_token_seconds",
                              "Time from arrival to the first streamed token", PM + ("endpoint",),
                              buckets=TTFT_BUCKETS, registry=reg)
        self.upstream = Histogram("helixagent_upstream_latency_seconds",
                                  "Upstream call latency (to the full answer, or to the first byte of a stream)",
                                  PM, buckets=UPSTREAM_BUCKETS, registry=reg)
        self.inflight = Gauge("helixagent_requests_in_flight", "Requests being served now", registry=reg,
                              multiprocess_mode="livesum")
        self.cost = Counter("helixagent_cost_dollars", "Cost of answered requests in US dollars", PM, registry=reg)
        self.cache = Counter("helixagent_cache_requests", "Response cache look-ups by result",
                             ("endpoint", "result"), registry=reg)
        self.rejections = Counter("helixagent_rate_limit_rejections",
                                  "Requests rejected by HelixAgent's own rate limits and budgets",
                                  ("endpoint", "reason"), registry=reg)
        self.fallbacks = Counter("helixagent_fallbacks", "Fallbacks to another provider", L, registry=reg)
        self.retries = Counter("helixagent_retries", "Retries of an upstream call", L, registry=reg)
        self.budget = Gauge("helixagent_budget_remaining_ratio",
                            "Lowest remaining fraction of a day/month token or cost budget among recently "
                            "active principals, per scope and window (lowest among live workers)",
                            ("scope", "window"), registry=reg, multiprocess_mode="livemin")
        self._budget_set: set[tuple[str, str]] = set()
        # -- other services' counters, pushed as deltas at refresh time (each worker adds its own) --------
        self.cache_evictions = Counter("helixagent_cache_evictions",
                                       "Cache entries dropped to honour cache.max_size / max_bytes", registry=reg)
        self.cache_expirations = Counter("helixagent_cache_expirations",
                                         "Cache entries found expired (memory backend)", registry=reg)
        self.cache_stores = Counter("helixagent_cache_stores", "Cache entries written", registry=reg)
        self.cache_coalesced = Counter("helixagent_cache_coalesced",
                                       "Requests answered by joining an identical in-flight request", registry=reg)
        self.cache_errors = Counter("helixagent_cache_errors",
                                    "Cache backend failures (Redis unreachable or timed out, undecodable values)",
                                    registry=reg)
        self.cache_entries = Gauge("helixagent_cache_entries", "Entries in the memory cache (sum over workers)",
                                   registry=reg, multiprocess_mode="livesum")
        self.cache_bytes = Gauge("helixagent_cache_bytes", "Value bytes in the memory cache (sum over workers)",
                                 registry=reg, multiprocess_mode="livesum")
        self.cache_up = Gauge("helixagent_cache_backend_up",
                              "1 when the cache backend is reachable, 0 during an outage (lowest among workers)",
                              registry=reg, multiprocess_mode="livemin")
        self.limits_errors = Counter("helixagent_rate_limit_backend_errors",
                                     "Requests (and settlements) decided without the rate limit backend, by "
                                     "rate_limits.on_backend_error", registry=reg)
        self.limits_outages = Counter("helixagent_rate_limit_backend_outages",
                                      "Times the rate limit backend (Redis) became unreachable", registry=reg)
        self.limits_up = Gauge("helixagent_rate_limit_backend_up",
                               "1 when the rate limit backend is reachable, 0 during an outage (lowest among "
                               "workers)", registry=reg, multiprocess_mode="livemin")
        self.config_reloads = Counter("helixagent_config_reloads",
                                      "Config reloads (SIGHUP, POST /admin/reload) by result: success (applied) "
                                      "or failure (the file was invalid; the old config is kept)", ("result",),
                                      registry=reg)
        for r in ("success", "failure"):
            self.config_reloads.labels(r)
        self.config_generation = Gauge("helixagent_config_generation",
                                       "Generation of the applied config: 1 at start, +1 per applied reload "
                                       "(lowest among workers)", registry=reg, multiprocess_mode="livemin")
        self.config_generation.set(1)
        self.shared_health_up = Gauge("helixagent_shared_health_up",
                                      "1 while breaker state and cooldowns are shared with the other instances "
                                      "through Redis, 0 while degraded to local-only health (lowest among "
                                      "workers; 1 when routing.shared_health is off)", registry=reg,
                                      multiprocess_mode="livemin")
        self.shared_health_outages = Counter("helixagent_shared_health_outages",
                                             "Times shared health became degraded (Redis unreachable)",
                                             registry=reg)
        self._pushed: dict[Any, float] = {}
        self._svc_lock = threading.Lock()
        # -- provider queues (routing/queue.py): waits observed as they end, depths at refresh time -------
        QP = ("provider", "priority")
        self.queue_depth = Gauge("helixagent_queue_depth", "Requests waiting for a provider's concurrency slot, by "
                                 "priority (sum over workers)", QP, registry=reg, multiprocess_mode="livesum")
        self.queue_in_use = Gauge("helixagent_queue_slots_in_use", "Concurrency slots of a capped provider held "
                                  "now (sum over workers)", ("provider",), registry=reg, multiprocess_mode="livesum")
        self.queue_capacity = Gauge("helixagent_queue_capacity", "Concurrency slots of a capped provider (sum over "
                                    "workers; each worker has its own)", ("provider",), registry=reg,
                                    multiprocess_mode="livesum")
        self.queue_wait = Histogram("helixagent_queue_wait_seconds", "Time a request waited for a provider's "
                                    "concurrency slot (0 when one was free; a timeout counts its whole wait)", QP,
                                    buckets=QUEUE_BUCKETS, registry=reg)
        self.queue_rejections = Counter("helixagent_queue_rejections", "Requests that got no slot of a provider: "
                                        "timeout (queue_timeout_ms passed) or full (routing.queue.max_waiting)",
                                        QP + ("reason",), registry=reg)
        self._queue_children: dict[tuple[str, str, str], Any] = {}
        self._instant_seen: dict[tuple[str, int], int] = {}  # (provider, rank) -> Queues.instant count flushed
        queues = getattr(gw.router, "queues", None)
        if queues is not None:
            queues.set_observer(self.queue_event)
            for name, counts in queues.instant.items():  # counted before these metrics existed: not theirs
                for rank, n in enumerate(counts):
                    self._instant_seen[(name, rank)] = n

        # -- label vocabularies from the configuration --------------------------------------------------
        self.provider_names: dict[str, str] = {n: n for n in gw.providers}
        for prov in gw.providers.values():  # mock stand-ins answer as "mock"
            self.provider_names.setdefault(prov.name, prov.name)
        for p in cfg.providers:
            self.provider_names.setdefault(p.name, p.name)
        self.model_names: dict[str, str] | None = None  # frozen on first use (after all features installed)
        self._endpoints: dict[str, str] | None = None
        self._series: dict[tuple[str, str, str, str], Series] = {}
        self._kinds: dict[str, str] = {}
        self._cache_children: dict[tuple[str, str], Any] = {}
        self._rejection_children: dict[tuple[str, str], Any] = {}
        self._ttft_children: dict[tuple[str, str, str], Any] = {}
        self._upstream_children: dict[tuple[str, str], Any] = {}
        self._cost_children: dict[tuple[str, str], Any] = {}
        self._pc: dict[Any, float] = {}
        self._ph: dict[Any, list[Any]] = {}
        self._dirty: list[Series] = []  # series with pending amounts
        # (provider, upstream model, path, status) as the request has them -> its Series (see record())
        self._raw: dict[tuple[Any, Any, Any, Any], Series] = {}
        self._lock = threading.Lock()
        self._inflight_n = 0
        self._inflight_set = 0

    # -- label normalisation -------------------------------------------------------------------------
    def endpoint_label(self, path: str) -> str:
        eps = self._endpoints
        if eps is None:  # routes are all registered once the gateway is built; freeze them on first use
            eps = self._endpoints = {p: p for (m, p) in self.gw.routes if m == "POST"}
        return eps.get(path, "other")

    def provider_label(self, name: str | None) -> str:
        if name is None:
            return "none"
        return self.provider_names.get(name, "other")

    def model_label(self, name: str | None) -> str:
        if name is None:
            return "none"
        names = self.model_names
        if names is None:
            names = self.model_names = {m: m for m in known_models(self.gw)}
        return names.get(name, "other")

    def kind_label(self, kind: str | None) -> str:
        if not kind:
            return "unknown"
        k = self._kinds.get(kind)
        if k is None:
            k = kind if (_KIND_OK.match(kind) and len(self._kinds) < _MAX_KINDS) else "other"
            if len(self._kinds) < 4 * _MAX_KINDS:
                self._kinds[kind] = k
        return k

    def series(self, provider: str, model: str, endpoint: str, status: str) -> Series:
        key = (provider, model, endpoint, status)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = Series(self, key)
        return s

    # -- the per-request update ----------------------------------------------------------------------
    # Requests only add to plain Python numbers (a Series' pending amounts; ``_pc``: counter child -> pending
    # amount and ``_ph``: histogram child -> [sum, bucket counts] for the rest); :meth:`flush` hands them to
    # prometheus_client every FLUSH_SECONDS and before every scrape of this process.  A value update through
    # prometheus_client costs 0.4 us (1 us in multi-process mode, an mmap write under a lock) and a request
    # makes ~10.
    _RAW_MAX = 4096  # raw label tuples remembered by record(); past it, labels are resolved every time

    def record(self, ctx: Any, latency: float) -> str:
        """:meth:`observe` with the labels resolved from the request's own values, through a cache of them
        (emptied when a reload changes the label values); returns the provider label."""
        key = (ctx.provider, ctx.upstream_model, ctx.path, ctx.status)
        s = self._raw.get(key)
        if s is None:
            s = self.series(self.provider_label(ctx.provider), self.model_label(ctx.upstream_model),
                            self.endpoint_label(ctx.path), _STATUS.get(ctx.status) or "other")
            if len(self._raw) < self._RAW_MAX:
                self._raw[key] = s
        self._add(s, ctx, latency)
        return s.labels[0]

    def observe(self, ctx: Any, provider: str, model: str, endpoint: str) -> None:
        status = _STATUS.get(ctx.status) or "other"
        s = self._series.get((provider, model, endpoint, status))
        if s is None:
            s = self.series(provider, model, endpoint, status)
        self._add(s, ctx, ctx.latency)

    def _add(self, s: Series, ctx: Any, latency: float) -> None:
        with self._lock:
            s.n += 1
            s.dsum += latency
            s.dcounts[bisect_left(_DURATION_UB, latency)] += 1
            u = ctx.usage
            if u is not None:
                n = u.prompt_tokens
                k = u.completion_tokens
                if n or k:
                    s.tp += n
                    s.tc += k
            cost = ctx.cost
            if cost:
                prev = s.csum
                s.csum = cost if prev is None else prev + cost
            v = ctx.upstream_latency
            if v is not None:
                h = s.ucounts
                if h is None:
                    h = s.ucounts = [0] * len(_UPSTREAM_UB)
                s.usum += v
                h[bisect_left(_UPSTREAM_UB, v)] += 1
            v = ctx.first_token_at
            if v is not None:
                h = s.tcounts
                if h is None:
                    h = s.tcounts = [0] * len(_TTFT_UB)
                v -= ctx.started
                s.tsum += v
                h[bisect_left(_TTFT_UB, v)] += 1
            n = ctx.fallbacks
            if n:
                s.fb += n
            n = ctx.retries
            if n:
                s.rt += n
            if not s.dirty:
                s.dirty = True
                self._dirty.append(s)
            cs = ctx.cache_status
            err = ctx.error
            if cs is None and err is None:
                return
            pc = self._pc
            if cs is not None:
                endpoint = s.labels[2]
                c = self._cache_children.get((endpoint, cs))
                if c is None:
                    c = self._cache_child(endpoint, cs)
                pc[c] = pc.get(c, 0) + 1
            if err is not None:
                c = s.error(self.kind_label(err.kind))
                pc[c] = pc.get(c, 0) + 1
                if err.status == 429:
                    code = err.code or ""
                    if not code.startswith("upstream"):
                        reason = "budget" if ("budget" in code or "budget" in (err.kind or "")) else "rate_limit"
                        c = self._child(self._rejection_children, self.rejections, (s.labels[2], reason))
                        pc[c] = pc.get(c, 0) + 1

    def _flush_series(self, taken: list[tuple[Series, tuple[Any, ...]]]) -> None:
        """Hand the series' pending amounts to their children (creating those a request needed)."""
        for s, (n, dsum, dcounts, tp, tc, csum, usum, ucounts, tsum, tcounts, fb, rt) in taken:
            p, mo, e, st = s.labels
            if n:
                s.requests.inc(n)
                _inc_hist(s.duration, dsum, dcounts)
            if tp or tc:
                if s.tok_prompt is None:
                    s.tok_prompt = self.tokens.labels(p, mo, e, st, "prompt")
                    s.tok_completion = self.tokens.labels(p, mo, e, st, "completion")
                if s.use_prompt is None:
                    s.use_prompt = self.token_usage.labels(p, mo, "prompt")
                    s.use_completion = self.token_usage.labels(p, mo, "completion")
                if tp:
                    s.tok_prompt.inc(tp)
                    s.use_prompt.inc(tp)
                if tc:
                    assert s.tok_completion is not None
                    s.tok_completion.inc(tc)
                    s.use_completion.inc(tc)
            if csum is not None:
                if s.cost is None:
                    s.cost = self._child(self._cost_children, self.cost, (p, mo))
                if csum:
                    s.cost.inc(csum)
            if ucounts is not None:
                if s.upstream is None:
                    s.upstream = self._child(self._upstream_children, self.upstream, (p, mo))
                _inc_hist(s.upstream, usum, ucounts)
            if tcounts is not None:
                if s.ttft is None:
                    s.ttft = self._child(self._ttft_children, self.ttft, (p, mo, e))
                _inc_hist(s.ttft, tsum, tcounts)
            if fb:
                if s.fallbacks is None:
                    s.fallbacks = self.fallbacks.labels(*s.labels)
                s.fallbacks.inc(fb)
            if rt:
                if s.retries is None:
                    s.retries = self.retries.labels(*s.labels)
                s.retries.inc(rt)

    @staticmethod
    def _hist(ph: dict[Any, list[Any]], child: Any, v: float) -> None:
        h = ph.get(child)
        if h is None:
            h = ph[child] = [0.0, [0] * len(child._upper_bounds)]
        h[0] += v
        h[1][bisect_left(child._upper_bounds, v)] += 1

    def queue_event(self, provider: str, priority: str, waited: float, outcome: str) -> None:
        """A wait for a provider slot ended (routing/queue.py): served, timeout or full."""
        p = self.provider_label(provider)
        with self._lock:
            if outcome != "full":
                self._hist(self._ph, self._child(self._queue_children, self.queue_wait, (p, priority)), waited)
            if outcome != "served":
                c = self._child(self._queue_children, self.queue_rejections, (p, priority, outcome))
                self._pc[c] = self._pc.get(c, 0) + 1

    def inflight_add(self, n: int) -> None:
        self._inflight_n += n  # only the event loop thread writes it

    def _queue_instant(self) -> None:
        """The waits of 0 s (a slot was free) the provider queues counted since the last flush, as
        observations of 0 in ``helixagent_queue_wait_seconds`` (what :meth:`queue_event` would have added one
        by one).  Called with ``_lock`` held."""
        queues = getattr(self.gw.router, "queues", None)
        if queues is None:
            return
        seen = self._instant_seen
        for name, counts in queues.instant.copy().items():  # copy: a reload may add a name meanwhile
            for rank, n in enumerate(counts):
                last = seen.get((name, rank), 0)
                if n != last:
                    seen[(name, rank)] = n
                    child = self._child(self._queue_children, self.queue_wait,
                                        (self.provider_label(name), QUEUE_PRIORITIES[rank]))
                    h = self._ph.get(child)
                    if h is None:
                        h = self._ph[child] = [0.0, [0] * len(child._upper_bounds)]
                    h[1][bisect_left(child._upper_bounds, 0.0)] += n - last

    def flush(self) -> None:
        """Hand the pending amounts to prometheus_client (the per-process files in multi-process mode)."""
        with self._lock:
            self._queue_instant()
            pc, self._pc = self._pc, {}
            ph, self._ph = self._ph, {}
            dirty, self._dirty = self._dirty, []
            taken = [(s, s.take()) for s in dirty]
            inflight = self._inflight_n
        if inflight != self._inflight_set:
            self.inflight.set(inflight)
            self._inflight_set = inflight
        self._flush_series(taken)
        for child, v in pc.items():
            if v:
                child.inc(v)
        for child, (total, counts) in ph.items():
            _inc_hist(child, total, counts)

    def _cache_child(self, endpoint: str, status: str) -> Any:
        low = status.lower()
        result = "hit" if "hit" in low else "miss" if "miss" in low else self.kind_label(low)
        c = self._child(self._cache_children, self.cache, (endpoint, result))
        if len(self._cache_children) < 256:
            self._cache_children[(endpoint, status)] = c
        return c

    @staticmethod
    def _child(cache: dict[Any, Any], metric: Any, key: tuple[str, ...]) -> Any:
        c = cache.get(key)
        if c is None:
            c = cache[key] = metric.labels(*key)
        return c

    def reconfigure(self, gw: GatewayLike) -> None:
        """A config reload: new provider names and models become label values (old ones stay valid)."""
        self._raw = {}  # a name that was "other" may be a label value now
        for n, prov in gw.providers.items():
            self.provider_names.setdefault(n, n)
            self.provider_names.setdefault(prov.name, prov.name)
        for p in gw.cfg.providers:
            self.provider_names.setdefault(p.name, p.name)
        if self.model_names is not None:
            names = dict(self.model_names)
            names.update((m, m) for m in known_models(gw))
            self.model_names = names

    def config_reloaded(self, ok: bool, generation: int) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
        self.config_generation.set(generation)

    # -- gauges refreshed periodically and at scrape time --------------------------------------------------
    def refresh(self) -> None:
        gw = self.gw
        health = gw.services.get("health")
        avail = getattr(health, "availability", None) if health is not None else None
        bstate = getattr(health, "breaker_state", None) if health is not None else None
        cooling = getattr(health, "cooling", None) if health is not None else None
        cooled = self._cooling
        now_cooling: set[tuple[str, str]] = set()
        for name, p in gw.providers.items():
            enabled = bool(getattr(p.cfg, "enabled", True))
            value = 1.0 if enabled else 0.0
            if enabled and avail is not None:
                try:
                    value = float(avail(name))
                except Exception:
                    log.debug("health.availability(%s) failed", name, exc_info=True)
            self.availability.labels(name).set(value)
            state = 0 if enabled else 2
            if bstate is not None:
                try:
                    st = bstate(name)
                    state = BREAKER_STATES.get(str(st).lower(), state) if not isinstance(st, int) else st
                except Exception:
                    log.debug("health.breaker_state(%s) failed", name, exc_info=True)
            self.breaker.labels(name).set(state)
            if cooling is not None:
                try:
                    for model, left in dict(cooling(name)).items():
                        now_cooling.add((name, model))
                        self.cooldown.labels(name, model).set(max(0.0, float(left)))
                except Exception:
                    log.debug("health.cooling(%s) failed", name, exc_info=True)
        for key in cooled - now_cooling:  # over: back to 0 (the series stays, bounded by models served)
            self.cooldown.labels(*key).set(0.0)
        cooled |= now_cooling
        limits = gw.services.get("limits")
        remaining = getattr(limits, "budget_remaining", None) if limits is not None else None
        if remaining is not None:
            try:
                seen = set()
                for key, frac in dict(remaining()).items():
                    scope, window = key if isinstance(key, tuple) else (key, "all")
                    if scope in BUDGET_SCOPES and window in BUDGET_WINDOWS:
                        self.budget.labels(scope, window).set(float(frac))
                        seen.add((scope, window))
                for gone in self._budget_set - seen:  # no longer reported: nothing is near exhaustion
                    self.budget.labels(*gone).set(1.0)
                self._budget_set |= seen
            except Exception:
                log.debug("limits.budget_remaining() failed", exc_info=True)
        with self._svc_lock:
            self._push_services(gw.services.get("cache"), limits)
        queues = getattr(gw.router, "queues", None)
        for q in queues.by_name.values() if queues is not None else ():
            qp = self.provider_label(q.name)
            for prio, n in zip(QUEUE_PRIORITIES, q.depth, strict=True):
                self.queue_depth.labels(qp, prio).set(n)
                for reason in QUEUE_REJECTIONS:  # every series exists from the start (0 until it happens)
                    self._child(self._queue_children, self.queue_rejections, (qp, prio, reason))
            self.queue_in_use.labels(qp).set(q.active)
            self.queue_capacity.labels(qp).set(q.cap or sum(q.model_caps.values()))

    def _push(self, child: Any, total: Any) -> None:
        """Add to ``child`` what the service's running total gained since the last push."""
        try:
            v = float(total)
        except (TypeError, ValueError):
            return
        last = self._pushed.get(child)
        if last is None or v < last:  # first sight, or the service was rebuilt: count from here
            last = 0.0 if last is None else v
        if v > last:
            child.inc(v - last)
        self._pushed[child] = v

    def _push_services(self, cache: Any, limits: Any) -> None:
        st = getattr(cache, "stats", None) if cache is not None else None
        if st is not None:
            self._push(self.cache_evictions, st.evictions)
            self._push(self.cache_expirations, st.expirations)
            self._push(self.cache_stores, st.stores)
            self._push(self.cache_coalesced, st.coalesced)
            self._push(self.cache_errors, st.errors)
            backend = getattr(cache, "backend", None)
            if hasattr(backend, "data"):  # the memory LRU: its size (Redis keeps its own)
                self.cache_entries.set(st.entries)
                self.cache_bytes.set(st.bytes)
            self.cache_up.set(0 if getattr(backend, "down", False) else 1)
        if limits is not None and hasattr(limits, "backend_errors"):
            self._push(self.limits_errors, limits.backend_errors)
            self._push(self.limits_outages, getattr(limits, "outages", 0))
            self.limits_up.set(1 if getattr(limits, "backend_up", True) else 0)
        shared = self.gw.services.get("shared_health")
        if shared is not None:
            self.shared_health_up.set(1 if shared.ok else 0)
            self._push(self.shared_health_outages, shared.outages)
        else:
            self.shared_health_up.set(1)

    def exposition(self) -> bytes:
        """The Prometheus text for a scrape (all workers' values in multi-process mode: this worker's are
        exact, the others' at most FLUSH_SECONDS old)."""
        self.flush()
        self.refresh()
        if self.multiprocess and self.dir:
            return scrape_multiprocess(self.dir)
        return generate_latest(self.registry)

    def mark_dead(self) -> None:
        self.flush()
        if self.multiprocess and self.dir:
            from prometheus_client import multiprocess
            try:
                multiprocess.mark_process_dead(os.getpid(), self.dir)
            except OSError:
                pass
