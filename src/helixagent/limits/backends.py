"""Limit backends: in process memory (one instance) and Redis (several instances, one Lua call per check).

Both implement the same three algorithms, chosen per limit:

* ``GCRA`` (per-IP requests): the generic cell rate algorithm, i.e. a token bucket of ``burst`` requests
  refilled at ``limit`` per minute, kept as a single "theoretical arrival time" per key.
* ``SLIDING`` (per-minute request and token limits of keys and users): a sliding-window counter -- two
  fixed one-minute windows, the previous one weighted by how much of it still overlaps the last 60 s.
  O(1) state, exact inside a window, and no 2x burst at a window edge as a fixed window would allow.
* ``DAY`` / ``MONTH`` (token and cost budgets): fixed calendar windows in UTC (budgets reset at midnight
  UTC and on the first of the month), which is what a "daily budget" means to the people paying it.

``reserve`` checks every applicable limit and consumes from all of them only if all fit (all-or-nothing);
``settle`` later adds (or refunds) the difference between the reservation and the real usage to the same
window the reservation went to.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from .. import redis_client

log = logging.getLogger("helixagent.limits")

GCRA, SLIDING, DAY, MONTH = 1, 2, 3, 4
MINUTE_MS = 60_000
DAY_MS = 86_400_000


class BackendUnavailable(Exception):
    pass


class Reservation:
    """Outcome of one check-and-consume over a list of limits."""
    __slots__ = ("ok", "failed", "retry_after", "remaining", "reset", "handles")

    def __init__(self, ok: bool, failed: int, retry_after: float, remaining: list[int], reset: list[float],
                 handles: list[Any]):
        self.ok = ok
        self.failed = failed            # index of the first limit that did not fit (-1 if ok)
        self.retry_after = retry_after  # seconds until the failed limit would admit this request
        self.remaining = remaining      # per limit, after this request
        self.reset = reset              # per limit, seconds until the current window resets
        self.handles = handles          # per limit, where the reservation went (for settle)


def next_month_start_ms(now_ms: float) -> tuple[int, float]:
    d = datetime.fromtimestamp(now_ms / 1000.0, tz=timezone.utc)
    y, m = d.year, d.month
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return y * 100 + m, datetime(ny, nm, 1, tzinfo=timezone.utc).timestamp() * 1000.0


# --------------------------------------------------------------------------------------------------------
class MemoryBackend:
    """asyncio-safe because reserve/settle never await: each runs to completion on the event loop."""

    sync = True
    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.cluster = False
        self.state: dict[Any, list[float]] = {}
        self._ops = 0
        self._month_cache: tuple[float, float, int] = (0.0, -1.0, 0)  # (start, end, month id)

    def _month(self, now: float) -> tuple[int, float]:
        start, end, mid = self._month_cache
        if not (start <= now < end):
            mid, end = next_month_start_ms(now)
            d = datetime.fromtimestamp(now / 1000.0, tz=timezone.utc)
            start = datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp() * 1000.0
            self._month_cache = (start, end, mid)
        return mid, end

    def reserve(self, limits: list[Any], costs: list[int]) -> Reservation:
        now = self.clock() * 1000.0
        st = self.state
        n = len(limits)
        remaining = [0] * n
        reset = [0.0] * n
        handles: list[Any] = [None] * n
        new: list[Any] = [None] * n
        failed = -1
        retry = 0.0
        for i in range(n):
            lim = limits[i]
            algo = lim.algo
            limit = lim.limit
            cost = costs[i]
            key = lim.key
            if algo == SLIDING:
                idx = int(now // MINUTE_MS)
                s = st.get(key)
                if s is None:
                    curr = prev = 0.0
                elif s[0] == idx:
                    curr, prev = s[1], s[2]
                elif s[0] == idx - 1:
                    curr, prev = 0.0, s[1]
                else:
                    curr = prev = 0.0
                frac = (now - idx * MINUTE_MS) / MINUTE_MS
                est = prev * (1.0 - frac) + curr
                fits = est + cost <= limit
                remaining[i] = max(0, int(limit - est - (cost if fits else 0)))
                reset[i] = ((idx + 1) * MINUTE_MS - now) / 1000.0
                handles[i] = (key, idx)
                if fits:
                    new[i] = [idx, curr + cost, prev]
                else:
                    r = _sliding_retry(now, idx, curr, prev, cost, limit)
                    if failed < 0:
                        failed, retry = i, r
            elif algo == GCRA:
                s = st.get(key)
                if limit <= 0:
                    fits = False
                    r = 60.0
                    tat = now
                    T = float(MINUTE_MS)
                    b = 1
                else:
                    T = MINUTE_MS / limit
                    b = lim.burst
                    tat = s[0] if s is not None and s[0] > now else now
                    new_tat = tat + cost * T
                    allow_at = new_tat - b * T
                    fits = now >= allow_at
                    r = (allow_at - now) / 1000.0
                if fits:
                    remaining[i] = int((now - allow_at) // T)
                    reset[i] = (new_tat - now) / 1000.0
                    new[i] = [new_tat]
                else:
                    remaining[i] = 0
                    reset[i] = (tat - now) / 1000.0
                    if failed < 0:
                        failed, retry = i, r
            else:
                if algo == DAY:
                    wid = int(now // DAY_MS)
                    end: float = float((wid + 1) * DAY_MS)
                else:
                    wid, end = self._month(now)
                s = st.get(key)
                used = s[1] if s is not None and s[0] == wid else 0.0
                fits = used + cost <= limit
                remaining[i] = max(0, int(limit - used - (cost if fits else 0)))
                reset[i] = (end - now) / 1000.0
                handles[i] = (key, wid)
                if fits:
                    new[i] = [wid, used + cost]
                elif failed < 0:
                    failed, retry = i, reset[i]
        if failed >= 0:
            return Reservation(False, failed, retry, remaining, reset, handles)
        for i in range(n):
            st[limits[i].key] = new[i]
        self._ops += 1
        if self._ops >= 50_000:
            self._sweep(now)
        return Reservation(True, -1, 0.0, remaining, reset, handles)

    def used(self, limits: list[Any]) -> list[float]:
        """What each day/month limit has used in its current window (for budget_remaining)."""
        now = self.clock() * 1000.0
        day = int(now // DAY_MS)
        month, _ = self._month(now)
        st = self.state
        out = []
        for lim in limits:
            s = st.get(lim.key)
            out.append(s[1] if s is not None and len(s) == 2 and s[0] == (day if lim.algo == DAY else month) else 0.0)
        return out

    def settle(self, handles: list[Any], deltas: list[int], ttls: list[int] | None = None) -> None:
        st = self.state
        for h, d in zip(handles, deltas, strict=True):
            if not d or h is None:
                continue
            key, wid = h
            s = st.get(key)
            if s is None:
                continue
            if s[0] == wid:
                s[1] = max(0.0, s[1] + d)
            elif len(s) == 3 and s[0] == wid + 1:  # a sliding window moved on: correct the previous minute
                s[2] = max(0.0, s[2] + d)
            # otherwise the window has passed: nothing left to correct

    def _sweep(self, now: float) -> None:
        """Drop state no longer able to affect a decision (amortised O(1) per request)."""
        self._ops = 0
        idx = int(now // MINUTE_MS)
        day = int(now // DAY_MS)
        month, _ = self._month(now)
        dead = []
        for k, s in self.state.items():
            if len(s) == 1:
                if s[0] <= now:
                    dead.append(k)
            elif len(s) == 3:
                if s[0] < idx - 1:
                    dead.append(k)
            elif s[0] not in (day, month):
                dead.append(k)
        for k in dead:
            del self.state[k]

    def key_prefix(self, prefix: str) -> str:
        return f"{prefix}:rl"

    async def close(self) -> None:
        pass


def _sliding_retry(now: float, idx: int, curr: float, prev: float, cost: float, limit: float) -> float:
    if cost > limit:
        return 60.0
    start = idx * MINUTE_MS
    if curr + cost <= limit and prev > 0:
        f = 1.0 - (limit - curr - cost) / prev
        return max(0.001, (start + f * MINUTE_MS - now) / 1000.0)
    f2 = max(0.0, 1.0 - (limit - cost) / curr) if curr > 0 else 0.0
    return max(0.001, (start + MINUTE_MS + f2 * MINUTE_MS - now) / 1000.0)


# --------------------------------------------------------------------------------------------------------
# One script call checks every limit of a request and consumes from all of them only if all fit.
# KEYS[i]: the limit's base key; ARGV[4i-3..4i]: algorithm, limit, cost, burst.  Time is Redis' own
# (TIME), so instances with skewed clocks agree.  Returns {ok, failed, retry_ms, (remaining, reset_ms,
# handle) per limit}.
RESERVE_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local M = 60000
local D = 86400000
local function civil(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
local n = #KEYS
local out = {1, 0, 0}
local writes = {}
local failed = 0
local retry = 0
for i = 1, n do
  local a = (i - 1) * 4
  local algo = tonumber(ARGV[a + 1])
  local limit = tonumber(ARGV[a + 2])
  local cost = tonumber(ARGV[a + 3])
  local burst = tonumber(ARGV[a + 4])
  local key = KEYS[i]
  local remaining, reset, handle = 0, 0, ''
  if algo == 2 then
    local idx = math.floor(now / M)
    local ck = key .. ':' .. idx
    local curr = tonumber(redis.call('GET', ck) or '0')
    local prev = tonumber(redis.call('GET', key .. ':' .. (idx - 1)) or '0')
    local frac = (now - idx * M) / M
    local est = prev * (1 - frac) + curr
    local fits = est + cost <= limit
    remaining = math.floor(limit - est - (fits and cost or 0))
    reset = (idx + 1) * M - now
    handle = ck
    if fits then
      writes[#writes + 1] = {ck, cost, 2 * M + 5000}
    elseif failed == 0 then
      failed = i
      local start = idx * M
      if cost > limit then retry = M
      elseif curr + cost <= limit and prev > 0 then
        retry = start + (1 - (limit - curr - cost) / prev) * M - now
      else
        local f2 = 0
        if curr > 0 then f2 = math.max(0, 1 - (limit - cost) / curr) end
        retry = start + M + f2 * M - now
      end
    end
  elseif algo == 1 then
    local raw = redis.call('GET', key)
    local tat = now
    if raw then tat = math.max(tonumber(raw), now) end
    if limit <= 0 then
      if failed == 0 then failed = i; retry = M end
    else
      local T = M / limit
      local new_tat = tat + cost * T
      local allow_at = new_tat - burst * T
      if now >= allow_at then
        remaining = math.floor((now - allow_at) / T)
        reset = new_tat - now
        writes[#writes + 1] = {key, false, math.ceil(new_tat - now) + 1000, string.format('%.3f', new_tat)}
      else
        reset = tat - now
        if failed == 0 then failed = i; retry = allow_at - now end
      end
    end
  else
    local wk, finish
    if algo == 3 then
      local idx = math.floor(now / D)
      wk = key .. ':d' .. idx
      finish = (idx + 1) * D
    else
      local y, m = civil(math.floor(now / D))
      wk = key .. ':m' .. (y * 100 + m)
      local ny, nm = y, m + 1
      if nm == 13 then ny = y + 1; nm = 1 end
      finish = days_from_civil(ny, nm, 1) * D
    end
    local used = tonumber(redis.call('GET', wk) or '0')
    local fits = used + cost <= limit
    remaining = math.floor(limit - used - (fits and cost or 0))
    reset = finish - now
    handle = wk
    if fits then
      writes[#writes + 1] = {wk, cost, finish - now + 3600000}
    elseif failed == 0 then
      failed = i; retry = finish - now
    end
  end
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = math.floor(reset)
  out[#out + 1] = handle
end
if failed > 0 then
  out[1] = 0
  out[2] = failed
  out[3] = math.ceil(retry)
  return out
end
for _, w in ipairs(writes) do
  if w[2] == false then
    redis.call('SET', w[1], w[4], 'PX', w[3])
  else
    redis.call('INCRBY', w[1], w[2])
    redis.call('PEXPIRE', w[1], w[3])
  end
end
return out
"""

# KEYS[i]: window key from a reservation; ARGV[2i-1]: delta (real - reserved), ARGV[2i]: ttl ms.
SETTLE_LUA = r"""
for i = 1, #KEYS do
  local d = tonumber(ARGV[2 * i - 1])
  if d ~= 0 then
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local v = redis.call('INCRBY', KEYS[i], d)
      if v < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
    elseif d > 0 then
      redis.call('SET', KEYS[i], d, 'PX', tonumber(ARGV[2 * i]))
    end
  end
end
return 1
"""


class RedisBackend:
    """Shared limits in Redis.  An unreachable Redis raises :class:`BackendUnavailable` fast (short socket
    timeouts; after a failure, Redis is not retried for ``retry_interval`` seconds) and the caller applies
    ``rate_limits.on_backend_error``.  The outage is logged once, and its end once.

    More concurrent requests than ``pool_size`` connections is not an outage: a request waits for a free
    connection (at most ``pool_timeout`` seconds; past it :class:`~helixagent.redis_client.PoolExhausted`
    propagates and the stage sheds that one request with a 503, the backend stays up).  Only a failed
    Redis (:data:`~helixagent.redis_client.OUTAGE`) is an outage; any other error is a bug and propagates."""

    sync = False
    name = "redis"

    def __init__(self, url: str, timeout: float = 0.25, retry_interval: float = 1.0, pool_size: int = 100,
                 pool_timeout: float = 5.0):
        self.redis = redis_client.make_client(url, pool_size=pool_size, pool_timeout=pool_timeout, timeout=timeout,
                                              connect_timeout=timeout)
        self.cluster = redis_client.is_cluster(self.redis)
        self.pool = getattr(self.redis, "connection_pool", self.redis)  # Cluster: the client holds the bound
        self._reserve = self.redis.register_script(RESERVE_LUA)
        self._settle = self.redis.register_script(SETTLE_LUA)
        # standalone and Sentinel: the script calls of one loop iteration share one round trip
        # (redis_batch); Cluster: redis-py routes each call to its slot's node
        self.coalescer: Any = None
        if not self.cluster:
            from .redis_batch import Coalescer, Script
            self._reserve_script = Script(RESERVE_LUA, self._reserve.sha)
            self._settle_script = Script(SETTLE_LUA, self._settle.sha)
            self.coalescer = Coalescer(self.pool, [self._reserve_script, self._settle_script])
        self.retry_interval = retry_interval
        self.down_until = 0.0
        self.in_outage = False
        self.on_error: Callable[[Exception | None], None] = lambda exc: None
        self.on_recover: Callable[[], None] = lambda: None

    def key_prefix(self, prefix: str) -> str:
        """Where this backend's limit keys live (:class:`~helixagent.limits.Limiter` builds every key of
        a request under it, and the reserve script touches all of them at once).

        Standalone Redis and Sentinel: ``<prefix>:rl`` -- the names of earlier releases, so counters
        and day/month budgets survive an upgrade.  Cluster: ``{<prefix>:rl}`` -- one hash tag for every
        limit key of a prefix, so the all-or-nothing reserve script (IP, key, user and application
        limits of one request) and its settle touch one slot.  The price: one prefix's limiter runs on one
        cluster node (measured in docs/keys-and-limits.md); another prefix lands on another slot."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"rate_limits.key_prefix must hold no braces: {prefix!r}")
        return f"{{{prefix}:rl}}" if self.cluster else f"{prefix}:rl"

    def _failed(self, exc: Exception) -> BackendUnavailable:
        self.down_until = time.monotonic() + self.retry_interval
        if not self.in_outage:
            self.in_outage = True
            self.on_error(exc)
        return BackendUnavailable(f"{type(exc).__name__}: {exc}")

    def _ok(self) -> None:
        if self.in_outage:
            self.in_outage = False
            self.on_recover()

    async def reserve(self, limits: list[Any], costs: list[int]) -> Reservation:
        if self.in_outage and time.monotonic() < self.down_until:
            raise BackendUnavailable("redis marked down")
        args: list[Any] = []
        for lim, c in zip(limits, costs, strict=True):
            args += (lim.algo, lim.limit, c, lim.burst)
        keys = [lim.key for lim in limits]
        try:
            if self.coalescer is not None:
                res = await self.coalescer.call(self._reserve_script, keys, args)
            else:
                res = await self._reserve(keys=keys, args=args)
        except redis_client.OUTAGE as exc:
            raise self._failed(exc) from None
        self._ok()
        n = len(limits)
        remaining = [int(res[3 + 3 * i]) for i in range(n)]
        reset = [int(res[4 + 3 * i]) / 1000.0 for i in range(n)]
        handles = [res[5 + 3 * i] or None for i in range(n)]
        ok = int(res[0]) == 1
        return Reservation(ok, -1 if ok else int(res[1]) - 1, int(res[2]) / 1000.0, remaining, reset, handles)

    async def settle(self, handles: list[Any], deltas: list[int], ttls: list[int] | None = None) -> None:
        keys: list[Any] = []
        args: list[Any] = []
        for i, (h, d) in enumerate(zip(handles, deltas, strict=True)):
            if h is None or not d:
                continue
            keys.append(h)
            args += (int(d), ttls[i] if ttls else 2 * MINUTE_MS)
        if not keys:
            return
        if self.in_outage and time.monotonic() < self.down_until:
            raise BackendUnavailable("redis marked down")
        try:
            if self.coalescer is not None:
                await self.coalescer.call(self._settle_script, keys, args)
            else:
                await self._settle(keys=keys, args=args)
        except redis_client.OUTAGE as exc:
            raise self._failed(exc) from None
        self._ok()

    async def used(self, limits: list[Any]) -> list[float]:
        """What each day/month limit has used in its current window, read with MGET (500 keys a call).
        The window is computed with this host's clock (Redis' own decides the reservations: they differ
        only in the seconds around midnight UTC)."""
        if not limits:
            return []
        if self.in_outage and time.monotonic() < self.down_until:
            raise BackendUnavailable("redis marked down")
        now = time.time() * 1000.0
        day = f":d{int(now // DAY_MS)}"
        month = f":m{next_month_start_ms(now)[0]}"
        keys = [lim.key + (day if lim.algo == DAY else month) for lim in limits]
        out: list[float] = []
        try:
            for i in range(0, len(keys), 500):
                vals = await self.redis.mget(keys[i:i + 500])
                out.extend(float(v) if v is not None else 0.0 for v in vals)
        except redis_client.OUTAGE as exc:
            raise self._failed(exc) from None
        self._ok()
        return out

    async def close(self) -> None:
        await self.redis.aclose()
