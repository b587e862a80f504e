"""Several gateway instances sharing one real Redis (HELIX_TEST_REDIS_URL) and one key database."""
from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from conftest import need_redis
from helixagent.limits import Limit, REQ, TOK, USD
from helixagent.limits.backends import DAY, MONTH, SLIDING, BackendUnavailable, MemoryBackend, RedisBackend
from helixagent.tokens import estimate_messages
from support.keys import MASTER, MODEL, admin_create, admin_post, chat, redis_cleanup, unique_prefix

pytestmark = pytest.mark.redis
MSGS = [{"role": "user", "content": "hello"}]
PER_REQUEST = estimate_messages(MSGS) + 8


@pytest.fixture
def shared(make_gateway, tmp_path):
    """``start(rate_limits)`` -> three gateways on one Redis prefix and one SQLite key database."""
    url = need_redis()
    prefix = unique_prefix()

    def start(rate_limits: dict, n: int = 3, latency_ms: float = 20) -> list:
        # a generous Redis timeout: exactness is tested here, not the outage policy (a loaded CI host)
        rl = {"backend": "redis", "redis_url": url, "key_prefix": prefix, "redis_timeout": 3.0, **rate_limits}
        cfg = {"auth": {"master_key": MASTER, "redis_prefix": prefix},
               "database": {"url": f"sqlite:///{tmp_path}/shared.db"},
               "providers": [{"name": "mock", "type": "mock", "mock_tokens": 50, "models": [MODEL],
                              "latency_ms": latency_ms}],
               "rate_limits": rl}
        return [make_gateway(cfg) for _ in range(n)]

    yield start
    redis_cleanup(url, prefix)


def _burst(gws: list, key: str, total: int, **params) -> list[int]:
    async def run():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as c:
            rs = await asyncio.gather(*(
                c.post(gws[i % len(gws)].url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": MODEL, "messages": MSGS, **params}) for i in range(total)))
        return [r.status_code for r in rs]
    return asyncio.run(run())


def test_three_instances_admit_exactly_the_request_limit(shared):
    gws = shared({"api_key": {"requests_per_minute": 10}})
    k = admin_create(gws[0], user_id="burst", application="a")["key"]
    codes = _burst(gws, k, 60, max_tokens=8)
    assert codes.count(200) == 10 and codes.count(429) == 50, codes
    # per-key override applies on every instance too
    k2 = admin_create(gws[1], user_id="burst2", limits={"requests_per_minute": 4})["key"]
    codes = _burst(gws, k2, 30, max_tokens=8)
    assert codes.count(200) == 4 and codes.count(429) == 26


def test_three_instances_admit_exactly_the_token_budget(shared):
    gws = shared({"user": {"tokens_per_day": PER_REQUEST * 7 + 5},
                  "application": {"tokens_per_month": 10 ** 9}})
    keys = [admin_create(gws[0], user_id="tok-user", application="app")["key"] for _ in range(3)]

    async def run():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as c:
            rs = await asyncio.gather(*(
                c.post(gws[i % 3].url + "/v1/chat/completions", headers={"authorization": f"Bearer {keys[i % 3]}"},
                       json={"model": MODEL, "messages": MSGS, "max_tokens": 8}) for i in range(45)))
        return rs
    rs = asyncio.run(run())
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 7 and codes.count(429) == 38, codes
    ok = [r for r in rs if r.status_code == 200]
    assert all(r.json()["usage"]["total_tokens"] == PER_REQUEST for r in ok)
    bad = next(r for r in rs if r.status_code == 429)
    assert "tokens per day for user 'tok-user'" in bad.json()["error"]["message"]
    assert bad.headers["x-ratelimit-remaining-tokens"] == "5" and int(bad.headers["retry-after"]) >= 1


def test_revoked_key_fails_at_once_on_every_instance(shared):
    gws = shared({})
    k = admin_create(gws[0], user_id="rev")
    for g in gws:  # every instance has the key cached now
        assert chat(g, k["key"], max_tokens=4).status_code == 200
    assert admin_post(gws[1], f"/admin/keys/{k['id']}/revoke").status_code == 200
    for g in gws:  # no waiting: the revoke call returned only after every instance dropped the key
        r = chat(g, k["key"], max_tokens=4)
        assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"


def test_rotation_with_grace_on_every_instance(shared):
    gws = shared({})
    old = admin_create(gws[0], user_id="rot")
    for g in gws:
        assert chat(g, old["key"], max_tokens=4).status_code == 200
    new = admin_post(gws[2], f"/admin/keys/{old['id']}/rotate", {"grace": "1s"}).json()
    for g in gws:
        assert chat(g, old["key"], max_tokens=4).status_code == 200
        assert chat(g, new["key"], max_tokens=4).status_code == 200
    time.sleep(1.05)
    for g in gws:
        assert chat(g, old["key"], max_tokens=4).status_code == 401
        assert chat(g, new["key"], max_tokens=4).status_code == 200


def test_cli_revoke_reaches_running_instances_at_once(shared, tmp_path):
    gws = shared({})
    k = admin_create(gws[0], user_id="cli-rev")
    for g in gws:
        assert chat(g, k["key"], max_tokens=4).status_code == 200
    cfg = gws[0].cfg
    cfgfile = tmp_path / "cli.yaml"
    cfgfile.write_text(f"database: {{url: '{cfg.database.url}'}}\n"
                       f"auth: {{redis_url: '{cfg.rate_limits.redis_url}', redis_prefix: '{cfg.auth.redis_prefix}'}}\n")
    from helixagent.cli import main
    assert main(["keys", "revoke", k["id"], "--config", str(cfgfile)]) == 0
    for g in gws:
        assert chat(g, k["key"], max_tokens=4).status_code == 401


def test_redis_down_follows_policy_counted_and_logged_once(make_gateway, caplog):
    base = {"auth": {"master_key": MASTER},
            "providers": [{"name": "mock", "type": "mock", "mock_tokens": 8, "models": [MODEL]}]}
    down = "redis://127.0.0.1:1/0"
    caplog.set_level(logging.ERROR, logger="helixagent.limits")
    # default policy: request limits allow, budgets deny
    gw = make_gateway({**base, "rate_limits": {"backend": "redis", "redis_url": down,
                                               "api_key": {"requests_per_minute": 1}}})
    k = admin_create(gw, user_id="u", application="a")["key"]
    assert [chat(gw, k, max_tokens=4).status_code for _ in range(5)] == [200] * 5
    lim = gw.app.services["limits"]
    assert lim.backend_errors == 5 and lim.outages == 1
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    gw2 = make_gateway({**base, "rate_limits": {"backend": "redis", "redis_url": down,
                                                "user": {"tokens_per_day": 10 ** 6}}})
    events = []
    gw2.app.services["limits"].listeners.append(lambda ev, info: events.append(ev))
    k2 = admin_create(gw2, user_id="u", application="a")["key"]
    r = chat(gw2, k2, max_tokens=4)
    assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limit_backend_unavailable"
    assert "retry-after" in r.headers
    assert events[:2] == ["backend_error", "policy"]
    gw3 = make_gateway({**base, "rate_limits": {"backend": "redis", "redis_url": down, "on_backend_error": "allow",
                                                "user": {"tokens_per_day": 10 ** 6}}})
    k3 = admin_create(gw3, user_id="u", application="a")["key"]
    assert chat(gw3, k3, max_tokens=4).status_code == 200


async def test_backend_outage_and_recovery_logged_once_each(caplog):
    url = need_redis()
    prefix = unique_prefix()
    b = RedisBackend(url)
    ups, downs = [], []
    b.on_error = lambda exc: downs.append(exc)
    b.on_recover = lambda: ups.append(1)
    lim = [Limit(REQ, SLIDING, f"{prefix}:x", 100, "k")]
    try:
        assert (await b.reserve(lim, [1])).ok
        real = b.redis
        b.redis = None  # break it: every call fails
        dead = RedisBackend("redis://127.0.0.1:1/0")
        b._reserve = dead._reserve
        live, b.coalescer = b.coalescer, dead.coalescer  # the coalesced transport too
        for _ in range(5):
            with pytest.raises(BackendUnavailable):
                await b.reserve(lim, [1])
        assert len(downs) == 1
        b.redis = real
        b._reserve = real.register_script(__import__("helixagent.limits.backends", fromlist=["x"]).RESERVE_LUA)
        b.coalescer = live
        b.down_until = 0
        assert (await b.reserve(lim, [1])).ok and ups == [1]
    finally:
        await b.close()
        redis_cleanup(url, prefix)


async def test_lua_and_memory_agree():
    """The same sequence of reservations and settlements gives the same answers in both backends."""
    url = need_redis()
    prefix = unique_prefix()
    rb = RedisBackend(url)
    mb = MemoryBackend()
    lims = [Limit(REQ, SLIDING, f"{prefix}:rpm", 50, "k"), Limit(TOK, SLIDING, f"{prefix}:tpm", 1000, "k"),
            Limit(TOK, DAY, f"{prefix}:tpd", 2500, "u"), Limit(TOK, MONTH, f"{prefix}:tpmo", 4000, "a"),
            Limit(USD, DAY, f"{prefix}:usd", 900_000, "a")]
    try:
        seq = [[1, 300, 300, 300, 200_000], [1, 300, 300, 300, 200_000], [1, 500, 500, 500, 100_000],
               [1, 200, 200, 200, 600_000], [1, 100, 100, 100, 100_000]]
        for costs in seq:
            a = await rb.reserve(lims, costs)
            b = mb.reserve(lims, costs)
            assert (a.ok, a.failed) == (b.ok, b.failed)
            if a.ok:
                # remaining may differ by one in the sliding windows (a few ms between the two clocks)
                assert [abs(x - y) <= 1 for x, y in zip(a.remaining, b.remaining, strict=True)] == [True] * 5
                assert all(abs(x - y) < 1.0 for x, y in zip(a.reset, b.reset, strict=True))
                deltas = [0, -100, -100, -100, -50_000]
                await rb.settle(a.handles, deltas, [lim.ttl for lim in lims])
                mb.settle(b.handles, deltas)
            else:
                assert abs(a.retry_after - b.retry_after) < 1.0
    finally:
        await rb.close()
        redis_cleanup(url, prefix)


async def test_calls_of_one_iteration_share_one_round_trip_and_stay_exact():
    """50 reservations made in one loop iteration against a limit of 10: one round trip, exactly 10 admitted
    (each is still its own script evaluation), and their settles share one round trip too."""
    url = need_redis()
    prefix = unique_prefix()
    b = RedisBackend(url)
    lims = [Limit(REQ, SLIDING, f"{prefix}:rpm", 10, "k"), Limit(TOK, DAY, f"{prefix}:tpd", 10 ** 6, "k")]
    try:
        co = b.coalescer
        b0 = co.batches
        res = await asyncio.gather(*(b.reserve(lims, [1, 100]) for _ in range(50)))
        assert co.batches == b0 + 1
        assert [r.ok for r in res] == [True] * 10 + [False] * 40  # in the order they were made
        assert [r.remaining[0] for r in res[:10]] == list(range(9, -1, -1))
        await asyncio.gather(*(b.settle(r.handles, [0, -60], [lim.ttl for lim in lims]) for r in res[:10]))
        assert co.batches == b0 + 2
        assert int(await b.redis.get(res[0].handles[1])) == 10 * 40
    finally:
        await b.close()
        redis_cleanup(url, prefix)


async def test_a_failed_round_trip_reaches_every_caller():
    b = RedisBackend("redis://127.0.0.1:1/0", timeout=0.5)
    downs = []
    b.on_error = lambda exc: downs.append(exc)
    lim = [Limit(REQ, SLIDING, "t:x", 100, "k")]
    try:
        out = await asyncio.gather(*(b.reserve(lim, [1]) for _ in range(5)), b.settle([b"t:x:1"], [3], [1000]),
                                   return_exceptions=True)
        assert b.coalescer.batches == 1
        assert all(isinstance(r, BackendUnavailable) for r in out), out
        assert len(downs) == 1 and b.in_outage
    finally:
        await b.close()


async def test_an_error_reply_reaches_only_its_caller_and_a_cancelled_caller_is_skipped():
    url = need_redis()
    prefix = unique_prefix()
    b = RedisBackend(url)
    from helixagent.limits.redis_batch import Coalescer, Script
    text = "return redis.call('INCR', KEYS[1])"
    sha = await b.redis.script_load(text)
    co = Coalescer(b.pool, [Script(text, sha)])
    s = Script(text, sha)
    try:
        await b.redis.set(f"{prefix}:bad", "not a number")
        a = co.call(s, [f"{prefix}:n"], [])
        bad = co.call(s, [f"{prefix}:bad"], [])
        gone = co.call(s, [f"{prefix}:n"], [])
        c = co.call(s, [f"{prefix}:n"], [])
        gone.cancel()
        assert await a == 1
        with pytest.raises(__import__("redis").exceptions.ResponseError):
            await bad
        assert await c == 3  # the cancelled caller's call was made (sent before it left)
        assert co.batches == 1
    finally:
        await b.close()
        redis_cleanup(url, prefix)


async def test_noscript_loads_the_scripts_and_resends_once():
    """A Redis that lost its scripts (restart, SCRIPT FLUSH): the calls are resent once after SCRIPT LOAD."""
    from support.redis_server import PrivateRedis
    srv = PrivateRedis()
    b = RedisBackend(srv.url)
    lims = [Limit(REQ, SLIDING, "p:rpm", 3, "k"), Limit(TOK, DAY, "p:tpd", 1000, "k")]
    try:
        await b.redis.script_flush()
        res = await asyncio.gather(*(b.reserve(lims, [1, 10]) for _ in range(5)))
        assert [r.ok for r in res] == [True] * 3 + [False] * 2
        await b.settle(res[0].handles, [0, 5], [lim.ttl for lim in lims])
        assert int(await b.redis.get(res[0].handles[1])) == 35
        await b.redis.script_flush()
        await b.settle(res[1].handles, [0, -10], [lim.ttl for lim in lims])
        assert int(await b.redis.get(res[0].handles[1])) == 25
    finally:
        await b.close()
        srv.close()


def test_pack_is_what_redis_py_sends():
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from helixagent.limits.redis_batch import pack
    conn = Connection()
    cmds = [("EVALSHA", "a" * 40, 2, "hx:rl:ip:10.0.0.1", "hx:rl:key:ké:rpm", 1, 10 ** 12, 300, 0, -5, 0, 2.5, 7),
            ("EVALSHA", "b" * 40, 1, b"hx:rl:key:k:tpm:123", -100, 125000), ("PING",)]
    assert pack(cmds, conn.encoder) == b"".join(conn.pack_commands(cmds))
    with pytest.raises(DataError):
        pack([("SET", "k", True)], conn.encoder)
