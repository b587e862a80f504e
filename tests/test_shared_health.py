"""Breaker state, Retry-After cooldowns and health EWMAs shared between instances through Redis
(routing/shared_health.py), on the real Redis (HELIX_TEST_REDIS_URL) with a unique key prefix per test.

Here: two or three ``Health`` objects, each with its own ``SharedHealth`` (as separate instances have),
in one event loop.  Gateway processes: tests/test_shared_health_fleet.py."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import redis

from conftest import need_redis
from helixagent.config import BreakerConfig, load_config_dict
from helixagent.routing.health import CLOSED, DENIED, HALF_OPEN, NORMAL, OPEN, PROBE, Health
from helixagent.routing.shared_health import SharedHealth
from support.keys import redis_cleanup, unique_prefix

pytestmark = pytest.mark.redis
P = "p1"


async def until(pred: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


@pytest.fixture
def shared_redis():
    url = need_redis()
    prefix = unique_prefix()
    yield url, prefix
    redis_cleanup(url, prefix)


class Fleet:
    """Instances (Health + SharedHealth) on one Redis and prefix."""

    def __init__(self, url: str, prefix: str, cfg: BreakerConfig, sync_interval: float = 0.2):
        self.url, self.prefix, self.cfg, self.sync_interval = url, prefix, cfg, sync_interval
        self.members: list[tuple[Health, SharedHealth]] = []

    async def start(self) -> tuple[Health, SharedHealth]:
        h = Health(self.cfg, [P, "p2"])
        s = SharedHealth(h, self.url, self.prefix, sync_interval=self.sync_interval)
        await s.start()
        self.members.append((h, s))
        return h, s

    async def stop(self) -> None:
        for _, s in self.members:
            await s.stop()


def trip(h: Health, name: str = P) -> None:
    b = h.get(name)
    for _ in range(b.cfg.failure_threshold):
        b.failure(NORMAL, "server_error")
    assert b.state is OPEN


@pytest.fixture
async def fleet(shared_redis):
    url, prefix = shared_redis
    made: list[Fleet] = []

    def make(**kw: Any) -> Fleet:
        f = Fleet(url, prefix, BreakerConfig(**{"failure_threshold": 3, "cooldown": 0.6, **kw}))
        made.append(f)
        return f

    yield make
    for f in made:
        await f.stop()


async def test_open_on_one_instance_is_skipped_by_the_other(fleet):
    f = fleet()
    (a, sa), (b, sb) = await f.start(), await f.start()
    assert sa.ok and sb.ok
    trip(a)
    assert await until(lambda: b.get(P).state is OPEN)  # by pub/sub, long before the 0.2 s sync
    now = b.clock()
    assert not b.get(P).available(now) and b.get(P).acquire(now) == DENIED
    assert b.get("p2").state is CLOSED  # only that provider
    assert b.describe(P)["breaker"] == OPEN and b.describe(P)["shared"]["remote_opens"] == 1
    assert b.get(P).stream.state is CLOSED  # the stream breaker is its own


async def test_stream_breaker_is_shared_on_its_own(fleet):
    f = fleet()
    (a, _), (b, _) = await f.start(), await f.start()
    sa = a.get(P).stream
    for _ in range(3):
        sa.failure(NORMAL, "stream_cut")
    assert await until(lambda: b.get(P).stream.state is OPEN)
    assert b.get(P).state is CLOSED


async def demand(members: list[Health], seconds: float, verdict: Any = None) -> list[int]:
    """Every instance asks for an attempt every 5 ms (as its requests do); returns which instance got
    each PROBE (reported at once as ``verdict(breaker)``, when given)."""
    got: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i, h in enumerate(members):
            bk = h.get(P)
            now = h.clock()
            if bk.available(now):
                r = bk.acquire(now)
                if r == PROBE:
                    got.append(i)
                    if verdict is not None:
                        verdict(bk)
                elif r == NORMAL:
                    got.append(-1 - i)  # a normal admission: the breaker closed
        await asyncio.sleep(0.005)
    return got


async def test_half_open_probe_is_coordinated_across_instances(fleet):
    f = fleet()
    members = [(await f.start())[0] for _ in range(3)]
    trip(members[0])
    assert await until(lambda: all(h.get(P).state is OPEN for h in members))
    await asyncio.sleep(0.65)  # the cooldown is over everywhere
    # the provider still fails: exactly one instance probes; its failure re-opens it for all
    probes = await demand(members, 0.4, verdict=lambda bk: bk.failure(PROBE, "server_error"))
    assert len(probes) == 1, probes
    assert all(h.get(P).state is OPEN for h in members)
    await asyncio.sleep(0.65)
    # now it answers: one probe again; its success closes the breaker on every instance
    probes = await demand(members, 0.3, verdict=lambda bk: bk.success(0.01, False, PROBE))
    assert len([p for p in probes if p >= 0]) == 1, probes
    assert await until(lambda: all(h.get(P).state is CLOSED for h in members))
    assert all(h.get(P).available(h.clock()) for h in members)


async def test_after_a_failed_probe_any_instance_may_probe_next(fleet):
    """The instances that lost the slot to the prober are not locked out of the next half-open."""
    f = fleet()
    (a, sa), (b, sb), (c, sc) = await f.start(), await f.start(), await f.start()
    sa.attempt_timeout = lambda name: 30.0  # a's slot lasts 31 s: the losers must not wait for that
    trip(a)
    assert await until(lambda: b.get(P).state is OPEN and c.get(P).state is OPEN)
    await asyncio.sleep(0.65)
    got: list[int] = []
    while not got:  # a takes the slot and starts its probe (b and c have no demand yet)
        got = await demand([a], 0.05)
    assert got == [0]
    await demand([b, c], 0.2)  # while a's probe is in flight: they lose the slot
    assert sb.counters["probe_slots_lost"] >= 1 and sc.counters["probe_slots_lost"] >= 1
    a.get(P).failure(PROBE, "server_error")  # a's probe fails: another cooldown for all
    assert await until(lambda: b.get(P).state is OPEN and c.get(P).state is OPEN
                       and b.get(P).effective_state() == OPEN)
    await asyncio.sleep(0.65)
    got = await demand([b, c], 0.5, verdict=lambda bk: bk.failure(PROBE, "server_error"))
    assert len(got) == 1, got  # one of b, c probes this time (a is silent)


async def test_prober_that_dies_frees_the_slot_after_its_ttl(fleet, shared_redis):
    url, prefix = shared_redis
    f = fleet()
    (a, _), (b, _) = await f.start(), await f.start()
    trip(a)
    assert await until(lambda: b.get(P).state is OPEN)
    await asyncio.sleep(0.65)
    # a third instance takes the probe slot and dies without a verdict
    r = redis.Redis.from_url(url)
    assert r.set(f"{prefix}:{{health:{P}}}:probe", "dead-instance", nx=True, px=1000)
    r.close()
    assert await demand([a, b], 0.3) == []   # nobody probes while the slot is held
    got = await demand([a, b], 1.5)        # the slot's TTL ran out: one of them takes it
    assert len(got) == 1 and got[0] >= 0, got


async def test_retry_after_cooldown_is_shared_and_expires_everywhere(fleet):
    f = fleet()
    (a, _), (b, _) = await f.start(), await f.start()
    ta = a.throttle(P, "gpt-4o")
    ta.hit(a.clock(), 429, 0.8, 60.0, 1.0, 3)
    tb = b.throttle(P, "gpt-4o")
    assert await until(lambda: tb.until > b.clock())
    assert tb.status == 429 and 0.5 < tb.remaining(b.clock()) <= 0.8
    assert b.throttle(P, "gpt-4o-mini").until == 0.0  # per (provider, model)
    assert "gpt-4o" in b.describe(P)["rate_limit_cooldown_s"]
    await asyncio.sleep(0.85)
    assert ta.remaining(a.clock()) <= 0 and tb.remaining(b.clock()) <= 0
    assert b.cooling(P) == {} and a.cooling(P) == {}


async def test_breaker_key_carries_the_cooldown_and_expires(fleet, shared_redis):
    url, prefix = shared_redis
    f = fleet()
    (a, _), (b, _) = await f.start(), await f.start()
    trip(a)
    r = redis.Redis.from_url(url)
    try:
        key = f"{prefix}:{{health:{P}}}:breaker"
        assert await until(lambda: r.pttl(key) > 0)
        assert r.pttl(key) <= 600
        await asyncio.sleep(0.7)
        assert r.exists(key) == 0
    finally:
        r.close()
    for h in (a, b):
        assert h.get(P).effective_state() == HALF_OPEN  # the cooldown is over on both


async def test_late_starter_loads_open_breakers_and_cooldowns(fleet):
    f = fleet(cooldown=5.0)
    a, _ = await f.start()
    trip(a)
    a.throttle("p2", "m1").hit(a.clock(), 503, 4.0, 60.0, 1.0, 3)
    await asyncio.sleep(0.1)  # written
    c, sc = await f.start()   # start() returns once the first sync is done
    assert sc.ok
    bc = c.get(P)
    assert bc.state is OPEN and not bc.available(c.clock())
    assert 4.0 < bc.cfg.cooldown - (c.clock() - bc.opened_at) <= 5.0
    t = c.throttle("p2", "m1")
    assert t.status == 503 and 3.0 < t.remaining(c.clock()) <= 4.0


async def test_fleet_ewmas_are_merged(fleet):
    f = fleet(failure_threshold=1000)
    (a, _), (b, sb) = await f.start(), await f.start()
    ha = a.get(P)
    for _ in range(10):
        ha.success(0.4, False, NORMAL)
        ha.failure(NORMAL, "server_error")
    assert await until(lambda: b.get(P).fleet_err is not None)
    hb = b.get(P)
    assert hb.fleet_n == 1 and abs(hb.fleet_err - ha.err_ewma) < 1e-9  # b served nothing: a's alone
    assert abs(hb.fleet_lat - 0.4) < 1e-9 and hb.latency(False) == hb.fleet_lat
    assert b.score(P) < 1.0 and b.describe(P)["shared"]["fleet_instances"] == 1
    for _ in range(30):
        hb.success(0.1, False, NORMAL)
    assert await until(lambda: a.get(P).fleet_n == 2 and b.get(P).fleet_n == 2)
    lat = a.get(P).fleet_lat
    assert 0.1 < lat < 0.4  # weighted by each instance's requests in its window
    assert sb.status()["status"] == "ok"


async def test_malformed_and_foreign_messages_are_ignored(fleet, shared_redis, caplog):
    url, prefix = shared_redis
    f = fleet()
    a, sa = await f.start()
    r = redis.Redis.from_url(url)
    try:
        r.publish(sa.channel, b"not json")
        r.publish(sa.channel, b'{"t": "open", "p": "p1", "k": "breaker", "ms": "soon", "from": "x"}')
        r.publish(sa.channel, b'["a", "list"]')
        r.publish(sa.channel, b'{"t": "cool", "p": "p1", "ms": 100, "from": "x"}')
        r.publish(sa.channel, b'{"t": "open", "p": "unknown-provider", "k": "breaker", "ms": 5000, "from": "x"}')
        r.publish(sa.channel, b'{"t": "open", "p": "p1", "k": "breaker", "ms": 5000, "from": "x"}')
    finally:
        r.close()
    assert await until(lambda: a.get(P).state is OPEN)
    assert "unknown-provider" not in a.providers
    assert len([rec for rec in caplog.records if "malformed" in rec.getMessage()]) == 4
    assert sa.subscribed and sa.ok  # the subscription survived them


def test_config_shared_health_defaults_and_switch():
    cfg = load_config_dict({"redis": {"url": "redis://127.0.0.1:6379/0"}}, "<t>")
    sh = cfg.routing.shared_health
    assert sh.enabled is True and sh.redis_url == "redis://127.0.0.1:6379/0"
    assert sh.key_prefix == "helixagent"
    cfg = load_config_dict({"redis": {"url": "redis://x:1/0"}, "auth": {"redis_prefix": "staging"}}, "<t>")
    assert cfg.routing.shared_health.key_prefix == "staging"
    cfg = load_config_dict({"redis": {"url": "redis://x:1/0"}, "routing": {"shared_health": False}}, "<t>")
    assert cfg.routing.shared_health.enabled is False
    cfg = load_config_dict({}, "<t>")
    assert cfg.routing.shared_health.enabled is False
    cfg = load_config_dict({"routing": {"shared_health": {"sync_interval": "250ms", "key_prefix": "hx"}}}, "<t>")
    assert cfg.routing.shared_health.sync_interval == 0.25 and cfg.routing.shared_health.enabled is False
    from helixagent.config import ConfigError
    with pytest.raises(ConfigError, match="shared_health"):
        load_config_dict({"routing": {"shared_health": True}}, "<t>")
    with pytest.raises(ConfigError, match="shared_health"):
        load_config_dict({"routing": {"shared_health": {"sync": 1}}}, "<t>")


async def test_redis_down_local_only_then_resync(tmp_path, caplog):
    """A private Redis killed and started again on the same port: each instance goes local-only with
    one warning, keeps deciding on its own, and shares again (its own open breaker included) after."""
    from support.redis_server import PrivateRedis
    srv = PrivateRedis()
    port = srv.port
    cfg = BreakerConfig(failure_threshold=3, cooldown=3.0)
    ha, hb = Health(cfg, [P]), Health(cfg, [P])
    sa = SharedHealth(ha, srv.url, "hxdown", sync_interval=0.1, timeout=0.3)
    sb = SharedHealth(hb, srv.url, "hxdown", sync_interval=0.1, timeout=0.3)
    caplog.set_level(logging.WARNING, logger="helixagent.routing")
    try:
        await sa.start()
        await sb.start()
        assert sa.ok and sb.ok
        srv.proc.kill()
        srv.proc.wait(10)
        assert await until(lambda: not sa.ok and not sb.ok)
        assert sa.status()["status"] == "degraded" and sa.status()["outages"] == 1
        trip(ha)  # local only: written nowhere, b does not learn it
        await asyncio.sleep(0.5)
        assert hb.get(P).state is CLOSED and not ha.get(P).held
        warned = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(warned) == 2, [r.getMessage() for r in warned]  # one line per instance, not one per try
        srv2 = PrivateRedis.__new__(PrivateRedis)
        _restart(srv2, port, str(tmp_path))
        try:
            assert await until(lambda: sa.ok and sb.ok, timeout=10)
            # a's breaker opened during the outage is written back: b skips the provider too
            assert await until(lambda: hb.get(P).state is OPEN)
            assert any("answers again" in r.getMessage() for r in caplog.records)
        finally:
            srv2.close()
    finally:
        await sa.stop()
        await sb.stop()
        srv.close()


def _restart(srv: Any, port: int, d: str) -> None:
    import shutil
    import subprocess
    srv.port, srv.dir = port, d
    srv.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not srv._ping():
        if srv.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not restart")
        time.sleep(0.05)


async def test_redis_unreachable_at_start_is_local_only_with_one_warning(caplog):
    from support.servers import free_port
    caplog.set_level(logging.WARNING, logger="helixagent.routing")
    h = Health(BreakerConfig(failure_threshold=2, cooldown=0.2), [P])
    s = SharedHealth(h, f"redis://127.0.0.1:{free_port()}/0", "hxnone", sync_interval=0.05, timeout=0.2)
    try:
        await s.start()
        assert not s.ok and s.status()["status"] == "degraded"
        await asyncio.sleep(0.5)  # several reconnect attempts
        warned = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(warned) == 1 and "start-up" in warned[0].getMessage()
        trip(h)
        assert not h.get(P).held
        await asyncio.sleep(0.25)
        assert h.get(P).acquire(h.clock()) == PROBE  # probes on its own, as a single instance does
    finally:
        await s.stop()


def test_every_key_of_a_provider_is_in_one_cluster_slot():
    from redis.crc import key_slot
    s = SharedHealth(Health(BreakerConfig(), [P]), "redis://127.0.0.1:1/0", "hx:prod")
    for name in (P, "claude", "a:b{c"):
        keys = [s.key(name, w) for w in ("breaker", "stream_breaker", "probe", "stream_probe", "cool", "stats")]
        assert len({key_slot(k.encode()) for k in keys}) == 1, keys
        assert all(k.startswith("hx:prod:{health:") for k in keys)
