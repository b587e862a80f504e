"""Per-provider health: a circuit breaker, latency statistics (EWMA + recent p95) and an error-rate EWMA.

State lives in this process; with ``routing.shared_health`` on (the default whenever ``redis.url`` is set)
``shared_health.SharedHealth`` is this module's ``listener``: it writes breaker transitions and Retry-After
cooldowns to Redis, applies the other instances' (pub/sub and a periodic sync), coordinates the half-open
probe (a breaker whose cooldown ended is ``held`` until this instance wins the fleet's probe slot) and
merges the fleet's error-rate and latency EWMAs into ``fleet_*``.  The request path never waits on Redis.

Breaker states::

    closed ──(failure_threshold consecutive failures, or error rate >= error_rate_threshold
    ▲         over `window` with at least min_requests requests)──► open
    │                                                                 │ cooldown elapsed
    │                                                                 ▼
    └──(half_open_probes probe requests succeed)─────────────────── half-open ──(a probe fails)──► open

While open the provider is skipped; half-open lets at most ``half_open_probes`` requests through at a
time.  Only upstream failures count (timeouts, connection errors, 5xx, refused credentials, streams that
break before their first chunk); an answer to a bad request (400-class) proves the provider is up and
counts as a success; a 429 is counted separately and gives no verdict (the provider is up, only
throttling).  A request the gateway could not map (a 400 before any upstream call) and a gateway bug
give no verdict at all.

Streams have a second breaker of their own (``ProviderHealth.stream``, same thresholds): a stream cut
*after* its first chunk counts there only, and a completed stream counts there as a success.  While
the stream breaker is open the provider is skipped for streamed requests only; non-streamed requests
are judged by the main breaker alone, which mid-stream cuts never touch (a path that serves whole
answers fine is not shut out because its streams break).
"""
from __future__ import annotations

import time
from typing import Any, Protocol

from ..config import BreakerConfig

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_AVAIL = {CLOSED: 1.0, HALF_OPEN: 0.5, OPEN: 0.0}

# acquire() results
DENIED, NORMAL, PROBE = 0, 1, 2

_BUCKETS = 10          # the error-rate window is kept as 10 time buckets
_RING = 64             # latency samples kept for the p95
_LAT_ALPHA = 0.2       # EWMA weights
_ERR_ALPHA = 0.1


class LatencyStats:
    """EWMA and p95 over the last 64 samples (seconds).  The p95 is recomputed lazily."""

    __slots__ = ("ewma", "ring", "pos", "count", "_p95", "_dirty")

    def __init__(self) -> None:
        self.ewma: float | None = None
        self.ring = [0.0] * _RING
        self.pos = 0
        self.count = 0
        self._p95: float | None = None
        self._dirty = False

    def add(self, v: float) -> None:
        e = self.ewma
        self.ewma = v if e is None else e + _LAT_ALPHA * (v - e)
        self.ring[self.pos] = v
        self.pos = (self.pos + 1) % _RING
        self.count += 1
        self._dirty = True

    def p95(self) -> float | None:
        if self._dirty:
            n = min(self.count, _RING)
            s = sorted(self.ring[:n])
            self._p95 = s[min(n - 1, int(n * 0.95))]
            self._dirty = False
        return self._p95


class Listener(Protocol):
    """What the breakers and throttles report to (``shared_health.SharedHealth``); called on transitions
    only, never on the happy path, and never waits (writes to Redis are background tasks)."""

    def opened(self, b: "ProviderHealth") -> None: ...
    def closed(self, b: "ProviderHealth") -> None: ...
    def want_probe(self, b: "ProviderHealth") -> None: ...
    def cooled(self, t: "Throttle", wait: float) -> None: ...


class ProviderHealth:
    __slots__ = ("name", "cfg", "clock", "state", "consecutive", "opened_at", "probes", "probe_ok",
                 "width", "b_req", "b_fail", "b_stamp", "err_ewma", "full", "ttfb", "successes",
                 "failures", "opens", "last_error", "rate_limited", "stream", "kind", "listener", "held",
                 "remote_opens", "fleet_n", "fleet_err", "fleet_lat", "fleet_ttfb")

    def __init__(self, name: str, cfg: BreakerConfig, clock: Any = time.monotonic, _sub: bool = False):
        self.name = name
        self.cfg = cfg
        self.clock = clock
        self.state = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.probes = 0          # probes in flight (half-open)
        self.probe_ok = 0        # successful probes since half-open
        self.width = max(cfg.window / _BUCKETS, 1e-3)
        self.b_req = [0] * _BUCKETS
        self.b_fail = [0] * _BUCKETS
        self.b_stamp = [-1] * _BUCKETS
        self.err_ewma = 0.0
        self.full = LatencyStats()   # whole non-streamed answers
        self.ttfb = LatencyStats()   # time to the first stream chunk
        self.successes = 0
        self.failures = 0
        self.opens = 0
        self.last_error: str | None = None
        self.rate_limited = 0
        # streams judged after their first chunk (None on the stream breaker itself)
        self.stream: ProviderHealth | None = None if _sub else ProviderHealth(name, cfg, clock, True)
        self.kind = "stream" if _sub else "breaker"
        # shared health (shared_health.py): the listener; ``held``: open and, once the cooldown is over,
        # not probed from here until this instance holds the fleet's probe slot
        self.listener: Listener | None = None
        self.held = False
        self.remote_opens = 0    # opens learnt from other instances
        self.fleet_n = 0         # instances whose EWMAs were merged into fleet_* (0: local values only)
        self.fleet_err: float | None = None
        self.fleet_lat: float | None = None
        self.fleet_ttfb: float | None = None

    # -- admission -----------------------------------------------------------------------------
    def retune(self, cfg: BreakerConfig) -> None:
        """New breaker settings (a config reload); the window's buckets restart when its width changes."""
        width = max(cfg.window / _BUCKETS, 1e-3)
        if width != self.width:
            self.b_stamp = [-1] * _BUCKETS
            self.b_req = [0] * _BUCKETS
            self.b_fail = [0] * _BUCKETS
            self.width = width
        self.cfg = cfg

    def available(self, now: float) -> bool:
        """Whether a request could be sent now (no side effect)."""
        st = self.state
        if st is CLOSED:
            return True
        if st is OPEN:
            if now - self.opened_at < self.cfg.cooldown:
                return False
            if self.held:
                self.listener.want_probe(self)  # type: ignore[union-attr]  # asks for the slot, never waits
                return False
            return True
        return self.probes < self.cfg.half_open_probes

    def acquire(self, now: float) -> int:
        """Admit one attempt: NORMAL, PROBE (half-open; must be reported) or DENIED."""
        st = self.state
        if st is CLOSED:
            return NORMAL
        if st is OPEN:
            if now - self.opened_at < self.cfg.cooldown:
                return DENIED
            if self.held:
                self.listener.want_probe(self)  # type: ignore[union-attr]
                return DENIED
            self.state = HALF_OPEN
            self.probes = 0
            self.probe_ok = 0
        if self.probes < self.cfg.half_open_probes:
            self.probes += 1
            return PROBE
        return DENIED

    # -- outcomes ------------------------------------------------------------------------------
    def _bucket(self, now: float) -> int:
        b = int(now / self.width)
        j = b % _BUCKETS
        if self.b_stamp[j] != b:
            self.b_stamp[j] = b
            self.b_req[j] = 0
            self.b_fail[j] = 0
        return j

    def window_counts(self, now: float | None = None) -> tuple[int, int]:
        b = int((self.clock() if now is None else now) / self.width)
        req = fail = 0
        for j in range(_BUCKETS):
            if b - self.b_stamp[j] < _BUCKETS:
                req += self.b_req[j]
                fail += self.b_fail[j]
        return req, fail

    def success(self, latency: float | None, stream: bool, probe: int) -> None:
        now = self.clock()
        self.b_req[self._bucket(now)] += 1
        self.consecutive = 0
        self.successes += 1
        self.err_ewma -= _ERR_ALPHA * self.err_ewma
        if latency is not None:
            (self.ttfb if stream else self.full).add(latency)
        if probe == PROBE:
            self.probes = max(0, self.probes - 1)
            if self.state is HALF_OPEN:
                self.probe_ok += 1
                if self.probe_ok >= self.cfg.half_open_probes:
                    self._close()

    def failure(self, probe: int, kind: str | None = None) -> None:
        now = self.clock()
        j = self._bucket(now)
        self.b_req[j] += 1
        self.b_fail[j] += 1
        self.consecutive += 1
        self.failures += 1
        self.last_error = kind
        self.err_ewma += _ERR_ALPHA * (1.0 - self.err_ewma)
        if probe == PROBE:
            self.probes = max(0, self.probes - 1)
        st = self.state
        if st is HALF_OPEN:
            self._trip(now)
        elif st is CLOSED:
            cfg = self.cfg
            if self.consecutive >= cfg.failure_threshold:
                self._trip(now)
            else:
                req, fail = self.window_counts(now)
                if req >= cfg.min_requests and fail >= cfg.error_rate_threshold * req:
                    self._trip(now)

    def throttled(self, probe: int, kind: str | None = "rate_limited") -> None:
        """A 429: the provider is up but throttling us.  Counted, but no breaker verdict (a burst of
        rate limits must not shut a provider out for a whole cooldown); Retry-After governs instead."""
        self.rate_limited += 1
        self.last_error = kind
        if probe == PROBE:
            self.probes = max(0, self.probes - 1)

    def cancelled(self, probe: int) -> None:
        """The attempt was abandoned (lost a hedge race, client went away): no verdict."""
        if probe == PROBE:
            self.probes = max(0, self.probes - 1)

    def _trip(self, now: float) -> None:
        self.set_open(now)
        self.opens += 1
        if self.listener is not None:
            self.listener.opened(self)

    def _close(self) -> None:
        self.set_closed()
        if self.listener is not None:
            self.listener.closed(self)

    # -- state changes without a report (also applied from other instances) ---------------------
    def set_open(self, opened_at: float, held: bool = False) -> None:
        self.state = OPEN
        self.opened_at = opened_at
        self.probes = 0
        self.probe_ok = 0
        self.held = held

    def set_closed(self) -> None:
        self.state = CLOSED
        self.held = False
        self.consecutive = 0
        self.b_stamp = [-1] * _BUCKETS
        self.b_req = [0] * _BUCKETS
        self.b_fail = [0] * _BUCKETS

    def latency(self, stream: bool) -> float:
        """The latency the ``latency`` strategy sorts by: the fleet's EWMA when shared, else this
        process's (time to the first chunk for streams, whole answers otherwise; 0 when unknown)."""
        if stream:
            v = self.fleet_ttfb if self.fleet_ttfb is not None else self.ttfb.ewma
            if v:
                return v
        v = self.fleet_lat if self.fleet_lat is not None else self.full.ewma
        return v or 0.0

    def error_ewma(self) -> float:
        return self.err_ewma if self.fleet_err is None else self.fleet_err

    # -- reporting -----------------------------------------------------------------------------
    def effective_state(self, now: float | None = None) -> str:
        st = self.state
        if st is OPEN and (self.clock() if now is None else now) - self.opened_at >= self.cfg.cooldown:
            return HALF_OPEN  # next request is let through as a probe
        return st

    def availability(self) -> float:
        return _AVAIL[self.effective_state()]


def _score_latency(h: ProviderHealth) -> float | None:
    """Whole-answer latency EWMA, else time to first chunk (the fleet's when shared)."""
    full = h.fleet_lat if h.fleet_lat is not None else h.full.ewma
    if full is not None:
        return full
    return h.fleet_ttfb if h.fleet_ttfb is not None else h.ttfb.ewma


class Throttle:
    """Cross-request rate-limit cooldown of one (provider, upstream model).

    ``until`` (monotonic seconds) is when the upstream's Retry-After expires; the router moves the pair
    behind every other candidate until then (one attribute read per candidate on the happy path).
    ``streak`` counts consecutive 429s without a Retry-After; reset by a success."""

    __slots__ = ("provider", "model", "until", "status", "streak", "benched", "listener")

    def __init__(self, provider: str, model: str, listener: Listener | None = None):
        self.listener = listener  # shared health: told of every cooldown started here
        self.provider = provider
        self.model = model
        self.until = 0.0
        self.status = 429
        self.streak = 0
        self.benched = 0       # times a cooldown was started (reported in /health)

    def hit(self, now: float, status: int, retry_after: float | None, cap: float, default: float,
            after: int) -> None:
        """A 429 (or a 503/529 with Retry-After) from this pair: start a cooldown when warranted."""
        if cap <= 0:
            return
        if retry_after is None:
            if status != 429:
                return  # an overload without Retry-After is the breaker's business
            self.streak += 1
            if self.streak < after:
                return
            wait = default
        else:
            wait = retry_after
        wait = min(wait, cap)
        if wait <= 0:
            return
        self.until = now + wait  # the newest answer is the best information
        self.status = status
        self.benched += 1
        if self.listener is not None:
            self.listener.cooled(self, wait)

    def remaining(self, now: float) -> float:
        return self.until - now


class Health:
    """The ``health`` service: breaker state and health score per provider."""

    def __init__(self, cfg: BreakerConfig, names: Any = (), clock: Any = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.providers: dict[str, ProviderHealth] = {}
        self.throttles: dict[tuple[str, str], Throttle] = {}
        self.shared: Any = None  # the SharedHealth when on (shared_health.py); /health describes it
        self.listener: Listener | None = None
        for n in names:
            self.get(n)

    def reconfigure(self, cfg: BreakerConfig, names: Any = ()) -> None:
        """New breaker settings for every provider; states, counters and latencies are kept (a changed
        ``window`` restarts the error-rate window).  Providers new in ``names`` get a fresh state."""
        old = self.cfg
        self.cfg = cfg
        if cfg != old:
            for h in self.providers.values():
                for x in (h, h.stream):
                    if x is not None:
                        x.retune(cfg)
        for n in names:
            self.get(n)

    def get(self, name: str) -> ProviderHealth:
        h = self.providers.get(name)
        if h is None:
            h = self.providers[name] = ProviderHealth(name, self.cfg, self.clock)
            if self.listener is not None:
                self.attach(self.listener)
        return h

    def attach(self, listener: Listener | None) -> None:
        """Report every breaker's and throttle's transitions to ``listener`` (None: detach)."""
        self.listener = listener
        for h in self.providers.values():
            h.listener = h.stream.listener = listener  # type: ignore[union-attr]
            if listener is None:
                h.held = h.stream.held = False  # type: ignore[union-attr]
        for t in self.throttles.values():
            t.listener = listener

    def throttle(self, name: str, model: str) -> Throttle:
        """The shared cooldown state of (provider, upstream model); candidates keep a reference."""
        key = (name, model)
        t = self.throttles.get(key)
        if t is None:
            t = self.throttles[key] = Throttle(name, model, self.listener)
        return t

    def cooling(self, name: str, now: float | None = None) -> dict[str, float]:
        """{upstream model: seconds left} for this provider's pairs in a rate-limit cooldown."""
        now = self.clock() if now is None else now
        return {t.model: round(t.until - now, 3) for t in self.throttles.values()
                if t.provider == name and t.until > now}

    def availability(self, name: str) -> float:
        """1 closed, 0.5 half-open, 0 open (for helixagent_provider_availability{provider})."""
        h = self.providers.get(name)
        return 1.0 if h is None else h.availability()

    def state(self, name: str) -> str:
        h = self.providers.get(name)
        return CLOSED if h is None else h.effective_state()

    def breaker_state(self, name: str) -> str:
        """:meth:`state`, by the name the observability module reads (helixagent_provider_breaker_state)."""
        return self.state(name)

    def score(self, name: str) -> float:
        """0..1: availability x (1 - error-rate EWMA) x latency factor, where the latency factor is the
        fastest provider's latency EWMA divided by this one's (1.0 for the fastest or when unknown)."""
        h = self.providers.get(name)
        if h is None:
            return 1.0
        lat = _score_latency(h)
        factor = 1.0
        if lat:
            best = min(_score_latency(x) or lat for x in self.providers.values())
            factor = min(1.0, best / lat) if best > 0 else 1.0
        return round(h.availability() * (1.0 - h.error_ewma()) * factor, 4)

    def describe(self, name: str) -> dict[str, Any]:
        h = self.providers.get(name)
        if h is None:
            out0: dict[str, Any] = {"breaker": CLOSED, "availability": 1.0, "score": 1.0}
            cooling = self.cooling(name)
            if cooling:
                out0["rate_limit_cooldown_s"] = cooling
            return out0
        now = self.clock()
        req, fail = h.window_counts(now)
        st = h.effective_state(now)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 3)

        sh = h.stream
        assert sh is not None
        s_req, s_fail = sh.window_counts(now)
        s_st = sh.effective_state(now)
        stream: dict[str, Any] = {
            "breaker": s_st, "availability": _AVAIL[s_st], "error_rate": round(s_fail / s_req, 4) if s_req else 0.0,
            "error_rate_ewma": round(sh.err_ewma, 4), "requests_in_window": s_req,
            "consecutive_failures": sh.consecutive, "completed": sh.successes, "cut": sh.failures,
            "breaker_opens": sh.opens, "last_error": sh.last_error}
        if sh.state is OPEN:
            stream["cooldown_remaining_s"] = round(max(0.0, sh.cfg.cooldown - (now - sh.opened_at)), 3)
        out: dict[str, Any] = {
            "breaker": st, "availability": _AVAIL[st], "score": self.score(name), "stream": stream,
            "error_rate": round(fail / req, 4) if req else 0.0, "error_rate_ewma": round(h.err_ewma, 4),
            "requests_in_window": req, "consecutive_failures": h.consecutive,
            "latency_ewma_ms": ms(h.full.ewma), "latency_p95_ms": ms(h.full.p95()) if h.full.count else None,
            "ttfb_ewma_ms": ms(h.ttfb.ewma), "ttfb_p95_ms": ms(h.ttfb.p95()) if h.ttfb.count else None,
            "successes": h.successes, "failures": h.failures, "rate_limited": h.rate_limited,
            "breaker_opens": h.opens,
            "last_error": h.last_error,
        }
        cooling = self.cooling(name, now)
        if cooling:
            out["rate_limit_cooldown_s"] = cooling  # {upstream model: seconds left}
        if h.state is OPEN:
            out["cooldown_remaining_s"] = round(max(0.0, h.cfg.cooldown - (now - h.opened_at)), 3)
        if self.shared is not None:
            out["shared"] = self.shared.describe(h)
            stream["shared"] = self.shared.describe(sh)
        return out
