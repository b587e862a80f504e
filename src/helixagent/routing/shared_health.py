"""Breaker state, Retry-After cooldowns and health scores shared by every gateway instance through Redis.

Each process keeps its own ``health.Health`` (the request path reads only that); this module is its
``listener`` and keeps it in step with the fleet:

* **Transitions are written and published.**  A breaker that opens here sets
  ``<prefix>:{health:<provider>}:breaker`` (``:stream_breaker`` for the stream breaker) with a TTL of the
  cooldown and publishes ``open`` on ``<prefix>:health:events``; a breaker that closes (its probes
  succeeded) deletes it and publishes ``closed``; a Retry-After cooldown started here is written to the
  hash ``<prefix>:{health:<provider>}:cool`` (model -> Redis-clock deadline) and published ``cool``.
  Every other instance applies the message to its local state at once.
* **The half-open probe is coordinated.**  While shared health is up, an open breaker is ``held``: when
  its cooldown is over this instance does not probe on its own; the first request that would have
  probed starts (in the background, never waiting on it) a try for the fleet's probe slot
  ``<prefix>:{health:<provider>}:probe`` (SET NX, TTL = the cooldown, at least the provider's attempt
  timeout + 1 s) and is itself routed elsewhere.
  The winner probes (``half_open_probes`` requests); the others keep skipping the provider until the
  winner publishes ``closed`` (closing them too) or ``open`` (a failed probe: another cooldown for all),
  or the slot's TTL runs out (the prober died: the next try takes it).
* **A periodic sync** (``sync_interval``) publishes this instance's error-rate and latency EWMAs to
  ``<prefix>:{health:<provider>}:stats`` and reads the fleet's back (request-weighted means over the
  instances that served the provider recently: ``ProviderHealth.fleet_*``, used by the score and the
  ``latency`` strategy), and re-reads the open breakers and cooldowns (messages missed while the
  subscription was reconnecting; an instance that starts later loads the current state this way, before
  it serves).
* Every script touches the keys of one provider only, all with the hash tag ``{health:<provider>}``:
  one slot, so it runs unchanged on Redis Cluster.  Times inside Redis are Redis' own clock (``TIME``);
  between instances only durations (milliseconds left) travel, never a local clock's reading.

**Outage.**  Only what a failed Redis raises (``redis_client.OUTAGE``) and the pool's ``PoolExhausted``
count; then the instance falls back to local-only health (today's per-process behaviour: held breakers
are released, fleet EWMAs dropped), logs one warning, and ``/health`` shows ``shared_health.status:
degraded``.  When Redis answers again it re-subscribes, re-syncs (and re-writes a breaker it opened
meanwhile), logs that it is restored and coordinates again.  A request never waits for Redis.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, Callable, Coroutine

import orjson

from .. import redis_client
from ..redis_client import PoolExhausted
from .health import CLOSED, OPEN, Health, ProviderHealth, Throttle

log = logging.getLogger("helixagent.routing")

FAILED: tuple[type[Exception], ...] = (*redis_client.OUTAGE, PoolExhausted)
_POOL_SIZE = 8

# KEYS: breaker, probe slot.  ARGV: instance id, cooldown ms, channel, message.  Opens the breaker for
# the fleet, frees the probe slot when it was ours (a failed probe), publishes.
_OPEN = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# KEYS: breaker, probe slot.  ARGV: channel, message.
_CLOSE = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
# KEYS: breaker, probe slot.  ARGV: instance id, slot TTL ms.
# -> {0, ms}: still open for ms; {1, 0}: the slot is ours; {2, ms}: another instance probes (slot TTL).
_PROBE = """
local t = redis.call('PTTL', KEYS[1])
if t > 0 then return {0, t} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {1, 0}
end
return {2, redis.call('PTTL', KEYS[2])}
"""
# KEYS: cool hash.  ARGV: model, wait ms, status, channel, message prefix.  Deadline on Redis' clock.
_COOL = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local wait = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], (ms + wait) .. ':' .. ARGV[3])
if redis.call('PTTL', KEYS[1]) < wait then redis.call('PEXPIRE', KEYS[1], wait) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
# KEYS: breaker, stream breaker, cool hash, stats hash.  ARGV: instance id, stats JSON, stale ms,
# stats TTL ms, breaker ms to restore, stream breaker ms to restore ('0': none; after an outage only).
# -> {now ms, breaker pttl, stream pttl, cool fields..., stats fields...}
_SYNC = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if ARGV[5] ~= '0' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[5])
end
if ARGV[6] ~= '0' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[6])
end
redis.call('HSET', KEYS[4], ARGV[1], ms .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
local stats = redis.call('HGETALL', KEYS[4])
local fresh = {}
for i = 1, #stats, 2 do
  local v = stats[i + 1]
  local bar = string.find(v, '|', 1, true)
  if bar and tonumber(string.sub(v, 1, bar - 1)) >= ms - tonumber(ARGV[3]) then
    fresh[#fresh + 1] = stats[i]
    fresh[#fresh + 1] = string.sub(v, bar + 1)
  else
    redis.call('HDEL', KEYS[4], stats[i])
  end
end
local cool = redis.call('HGETALL', KEYS[3])
return {ms, redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]), cool, fresh}
"""


class SharedHealth:
    """The fleet side of one process's :class:`Health` (see the module docstring)."""

    def __init__(self, health: Health, url: str, prefix: str = "helixagent", sync_interval: float = 1.0,
                 timeout: float = 0.5, clock: Any = None, attempt_timeout: Callable[[str], float] | None = None):
        self.health = health
        self.url = url
        self.prefix = prefix
        self.sync_interval = sync_interval
        self.timeout = timeout
        self.clock = clock if clock is not None else health.clock  # the breakers' clock
        # provider name -> its attempt timeout (s; the running config's): the probe slot lasts at least
        # that long, so a slow probe in flight is not joined by a second one when the slot's TTL runs out
        self.attempt_timeout = attempt_timeout or (lambda name: 0.0)
        self.id = secrets.token_hex(6)
        self.channel = f"{prefix}:health:events"
        self.ok = False            # subscribed and the last sync succeeded: coordinating with the fleet
        self.subscribed = False
        self.started = False
        self.outages = 0           # times shared health became degraded
        self.last_sync: float | None = None
        self.last_error: str | None = None
        self.counters = {"published": 0, "applied": 0, "probe_slots_won": 0, "probe_slots_lost": 0}
        self.redis: Any = None
        self.sub: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._pending: set[ProviderHealth] = set()      # a probe-slot try in flight
        self._next_try: dict[ProviderHealth, float] = {}  # not before (another instance holds the slot)
        self._ours: set[ProviderHealth] = set()          # breakers whose probe slot we won
        self._wake = asyncio.Event()
        # the first sync (at start, after an outage) re-writes the breakers this instance opened meanwhile
        self._restore = True
        self._scripts: dict[str, Any] = {}
        self._logged_down = False

    # -- keys -------------------------------------------------------------------------------------
    def key(self, provider: str, what: str) -> str:
        return f"{self.prefix}:{{health:{provider}}}:{what}"

    def _bkeys(self, b: ProviderHealth) -> list[str]:
        if b.kind == "stream":
            return [self.key(b.name, "stream_breaker"), self.key(b.name, "stream_probe")]
        return [self.key(b.name, "breaker"), self.key(b.name, "probe")]

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self, wait: float = 2.0) -> None:
        """Connect, subscribe and load the fleet's state (waits at most ``wait`` s: a Redis that is
        down at start-up leaves this instance on local health until it answers)."""
        self.redis = redis_client.make_client(self.url, pool_size=_POOL_SIZE, pool_timeout=self.timeout,
                                              timeout=self.timeout, connect_timeout=self.timeout)
        self.sub = redis_client.make_client(self.url, pool_size=2, pool_timeout=self.timeout, timeout=None,
                                            connect_timeout=self.timeout, health_check_interval=5)
        for name, src in (("open", _OPEN), ("close", _CLOSE), ("probe", _PROBE), ("cool", _COOL), ("sync", _SYNC)):
            self._scripts[name] = self.redis.register_script(src)
        self.health.shared = self
        self.health.attach(self)
        self.started = True
        ready = asyncio.Event()
        self._loops = [asyncio.ensure_future(self._subscriber(ready)), asyncio.ensure_future(self._syncer(ready))]
        for t in self._loops:
            t.add_done_callback(self._loop_died)
        try:
            await asyncio.wait_for(ready.wait(), wait)
        except asyncio.TimeoutError:
            pass

    async def stop(self) -> None:
        self.started = False
        for t in self._loops:
            t.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)  # their ends are not news
        self.health.attach(None)
        for c in (self.redis, self.sub):
            if c is not None:
                await c.aclose()

    def _loop_died(self, t: asyncio.Task[None]) -> None:
        if t.cancelled() or not self.started:
            return
        exc = t.exception()
        if exc is not None:  # a bug of ours: loud, and the instance falls back to local health
            log.error("shared health: a background loop failed (a gateway bug); routing on local health only",
                      exc_info=exc)
            self._degrade(f"{type(exc).__name__} (bug)")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("shared health: a Redis write failed (a gateway bug)", exc_info=t.exception())

    # -- outage -----------------------------------------------------------------------------------
    def _degrade(self, why: str) -> None:
        self.last_error = why
        if not self.ok:
            if not self._logged_down:  # unreachable from the start: said once too
                self._logged_down = True
                log.warning("shared health: Redis unreachable (%s) at start-up; breakers, cooldowns and health "
                            "scores are local to this instance until it answers", why)
            return
        self.ok = False
        self.outages += 1
        self._restore = True
        self._logged_down = True
        log.warning("shared health: Redis unreachable (%s); breakers, cooldowns and health scores are local to "
                    "this instance until it answers again", why)
        for h in self.health.providers.values():
            for b in (h, h.stream):
                assert b is not None
                b.held = False       # local-only: probe on our own, as a single instance does
                b.fleet_n = 0
                b.fleet_err = b.fleet_lat = b.fleet_ttfb = None
        self._pending.clear()
        self._next_try.clear()

    def _up(self) -> None:
        if self.ok or not self.subscribed:
            return
        self.ok = True
        if self._logged_down:
            self._logged_down = False
            log.warning("shared health: Redis answers again; breaker state is shared with the fleet again")
        self.last_error = None
        for h in self.health.providers.values():
            for b in (h, h.stream):
                assert b is not None
                if b.state is OPEN and b not in self._ours:
                    b.held = True

    # -- Listener (called from the request path: never waits) -------------------------------------
    def opened(self, b: ProviderHealth) -> None:
        self._ours.discard(b)
        self._next_try.pop(b, None)
        b.held = self.ok
        if not self.ok:  # not written while Redis is unreachable: the first sync after it re-writes it
            return
        msg = self._msg("open", b.name, k=b.kind, ms=int(b.cfg.cooldown * 1000))
        self._spawn(self._run("open", self._bkeys(b), [self.id, max(1, int(b.cfg.cooldown * 1000)),
                                                       self.channel, msg]))

    def closed(self, b: ProviderHealth) -> None:
        self._ours.discard(b)
        if not self.ok:
            return
        self._spawn(self._run("close", self._bkeys(b), [self.channel, self._msg("closed", b.name, k=b.kind)]))

    def cooled(self, t: Throttle, wait: float) -> None:
        if not self.ok or t.provider not in self.health.providers:
            return  # while Redis is unreachable, cooldowns stay local
        ms = max(1, int(wait * 1000))
        msg = self._msg("cool", t.provider, m=t.model, ms=ms, s=t.status)
        self._spawn(self._run("cool", [self.key(t.provider, "cool")], [t.model, ms, t.status, self.channel, msg]))

    def want_probe(self, b: ProviderHealth) -> None:
        if not self.ok:
            b.held = False  # local-only: the next request probes
            return
        if b in self._pending or self._next_try.get(b, 0.0) > self.clock():
            return
        self._pending.add(b)
        self._spawn(self._try_probe(b))

    # -- writes -----------------------------------------------------------------------------------
    def _msg(self, t: str, p: str, **kw: Any) -> bytes:
        return orjson.dumps({"t": t, "p": p, "from": self.id, **kw})

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> None:
        try:
            await self._scripts[script](keys=keys, args=args)
            self.counters["published"] += 1
        except FAILED as exc:
            self._degrade(type(exc).__name__)

    def _slot_ms(self, b: ProviderHealth) -> int:
        """The probe slot's TTL: the cooldown, at least the provider's attempt timeout (+1 s), at least 1 s."""
        return int(max(1.0, b.cfg.cooldown, self.attempt_timeout(b.name) + 1.0) * 1000)

    async def _try_probe(self, b: ProviderHealth) -> None:
        try:
            code, ms = await self._scripts["probe"](keys=self._bkeys(b), args=[self.id, self._slot_ms(b)])
        except FAILED as exc:
            self._degrade(type(exc).__name__)
            b.held = False
            return
        finally:
            self._pending.discard(b)
        if b.state is not OPEN or not self.ok:
            return
        now = self.clock()
        if code == 1:
            self.counters["probe_slots_won"] += 1
            self._ours.add(b)
            b.held = False  # the next request here is the fleet's probe
        elif code == 0:
            self._next_try.pop(b, None)
            b.set_open(now - max(0.0, b.cfg.cooldown - ms / 1000.0), held=True)  # re-opened elsewhere
        else:
            self.counters["probe_slots_lost"] += 1
            self._next_try[b] = now + max(ms, 50) / 1000.0

    # -- applying the fleet's state -----------------------------------------------------------------
    def _breaker(self, p: str, kind: Any) -> ProviderHealth | None:
        h = self.health.providers.get(p)
        if h is None:
            return None  # a provider this instance does not have (another config)
        return h.stream if kind == "stream" else h

    def _apply_open(self, b: ProviderHealth, ms: int) -> None:
        now = self.clock()
        opened_at = now - max(0.0, b.cfg.cooldown - ms / 1000.0)
        if b.state is OPEN and abs(opened_at - b.opened_at) < 0.05:
            return
        if b.state is CLOSED:
            b.remote_opens += 1
        self._ours.discard(b)
        self._next_try.pop(b, None)  # a new cooldown: the slot is free again when it ends
        b.set_open(opened_at, held=self.ok)

    def _apply_cool(self, p: str, model: str, ms: int, status: int) -> None:
        if p not in self.health.providers:
            return
        t = self.health.throttle(p, model)
        t.until = self.clock() + ms / 1000.0
        t.status = status

    def handle(self, data: bytes) -> None:
        """One message from another instance (a malformed one is logged and ignored)."""
        try:
            m = orjson.loads(data)
            t, p, sender = str(m["t"]), str(m["p"]), m.get("from")
            ms = int(m["ms"]) if t in ("open", "cool") else 0
            model = str(m["m"]) if t == "cool" else ""
            status = int(m.get("s", 429))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("shared health: ignored a malformed message on %s", self.channel)
            return
        if sender == self.id:
            return
        self.counters["applied"] += 1
        if t == "cool":
            self._apply_cool(p, model, ms, status)
            return
        b = self._breaker(p, m.get("k"))
        if b is None:
            return
        if t == "open":
            self._apply_open(b, ms)
        elif t == "closed":
            self._next_try.pop(b, None)
            if b.state is not CLOSED:
                self._ours.discard(b)
                b.set_closed()

    # -- loops ------------------------------------------------------------------------------------
    async def _subscriber(self, ready: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            ps = self.sub.pubsub(ignore_subscribe_messages=True)
            try:
                await ps.subscribe(self.channel)
                self.subscribed = True
                backoff = 0.1
                self._wake.set()  # sync now: messages may have been missed while not subscribed
                while True:
                    msg = await ps.get_message(timeout=1.0)
                    if msg is None:
                        await ps.ping()
                        continue
                    if msg.get("type") == "message":
                        self.handle(msg["data"])
            except FAILED as exc:
                self.subscribed = False
                self._degrade(type(exc).__name__)
                ready.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    await ps.aclose()
                except FAILED:
                    pass

    async def _syncer(self, ready: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.sync_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if not self.subscribed:
                continue
            try:
                await self.sync()
            except FAILED as exc:
                self._degrade(type(exc).__name__)
            else:
                self._up()
            ready.set()

    async def sync(self) -> None:
        """Publish our EWMAs, read the fleet's, re-read open breakers and cooldowns (one script per
        provider)."""
        restore = self._restore
        names = list(self.health.providers)
        results = await asyncio.gather(*(self._sync_one(n, restore) for n in names))
        self._restore = False
        self.last_sync = self.clock()
        for n, res in zip(names, results, strict=True):
            self._apply_sync(n, res)

    def _stats(self, h: ProviderHealth) -> bytes:
        sh = h.stream
        assert sh is not None
        req, _ = h.window_counts()
        sreq, _ = sh.window_counts()
        return orjson.dumps({"n": req, "e": h.err_ewma, "l": h.full.ewma, "t": h.ttfb.ewma,
                             "sn": sreq, "se": sh.err_ewma})

    def _left_ms(self, b: ProviderHealth) -> int:
        if b.state is not OPEN:
            return 0
        return max(0, int((b.cfg.cooldown - (self.clock() - b.opened_at)) * 1000))

    async def _sync_one(self, name: str, restore: bool) -> Any:
        h = self.health.providers[name]
        sh = h.stream
        assert sh is not None
        stale = int(max(3 * self.sync_interval, 2.0) * 1000)
        return await self._scripts["sync"](
            keys=[self.key(name, "breaker"), self.key(name, "stream_breaker"), self.key(name, "cool"),
                  self.key(name, "stats")],
            args=[self.id, self._stats(h), stale, 2 * stale, self._left_ms(h) if restore else 0,
                  self._left_ms(sh) if restore else 0])

    def _apply_sync(self, name: str, res: Any) -> None:
        now_ms, b_ttl, s_ttl, cool, stats = res
        h = self.health.providers[name]
        sh = h.stream
        assert sh is not None
        for b, ttl in ((h, int(b_ttl)), (sh, int(s_ttl))):
            if ttl > 0:
                self._apply_open(b, ttl)
        for i in range(0, len(cool), 2):
            deadline, _, status = cool[i + 1].decode(errors="replace").partition(":")
            try:
                left, code = int(deadline) - int(now_ms), int(status or 429)
            except ValueError:
                continue  # not written by us
            if left > 0:
                self._apply_cool(name, cool[i].decode(errors="replace"), left, code)
        self._merge(h, sh, stats)

    @staticmethod
    def _merge(h: ProviderHealth, sh: ProviderHealth, stats: list[Any]) -> None:
        """Request-weighted means of the instances' EWMAs (instances with no request in their window
        carry no weight); None when no instance served the provider recently."""
        rows = []
        for i in range(0, len(stats), 2):
            try:
                rows.append(orjson.loads(stats[i + 1]))
            except orjson.JSONDecodeError:
                continue

        def mean(field: str, weight: str) -> tuple[float | None, int]:
            num = den = 0.0
            n = 0
            for r in rows:
                w, v = r.get(weight) or 0, r.get(field)
                if w > 0 and isinstance(v, (int, float)):
                    num += w * v
                    den += w
                    n += 1
            return (num / den if den else None), n

        h.fleet_err, h.fleet_n = mean("e", "n")
        h.fleet_lat, _ = mean("l", "n")
        h.fleet_ttfb, _ = mean("t", "n")
        sh.fleet_err, sh.fleet_n = mean("se", "sn")

    # -- reporting --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``/health``'s ``shared_health``."""
        age = None if self.last_sync is None else round(self.clock() - self.last_sync, 3)
        out: dict[str, Any] = {"enabled": True, "status": "ok" if self.ok else "degraded", "instance": self.id,
                               "subscribed": self.subscribed, "last_sync_age_s": age, "outages": self.outages,
                               **self.counters}
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    def describe(self, b: ProviderHealth) -> dict[str, Any]:
        """A breaker's shared side (``/health`` providers.<name>.shared)."""
        out: dict[str, Any] = {"fleet_instances": b.fleet_n, "remote_opens": b.remote_opens}
        if b.fleet_err is not None:
            out["fleet_error_rate_ewma"] = round(b.fleet_err, 4)
        if b.fleet_lat is not None:
            out["fleet_latency_ewma_ms"] = round(b.fleet_lat * 1000, 3)
        if b.fleet_ttfb is not None:
            out["fleet_ttfb_ewma_ms"] = round(b.fleet_ttfb * 1000, 3)
        if b.state is not CLOSED:
            out["probe_slot"] = ("ours" if b in self._ours else "waiting" if b.held else
                                 "local" if not self.ok else "free")
        return out
