"""Cross-instance de-duplication, the edges: two gateways in this process (separate apps, separate cache
services; they share nothing but Redis) -- the leader's error reaches the followers on the other instance
and nothing is stored; a memory cache with the shared redis.url still de-duplicates across instances; the
values in a flight stream are encrypted with encryption.enabled; Redis dying under a waiting follower
sends it upstream alone (never a hang), and once Redis is back the instances share flights again; bad
flight settings are rejected naming the parameter."""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import redis

from conftest import need_redis
from fakes.openai_upstream import Fault, FakeOpenAI
from support.keys import redis_cleanup, unique_prefix
from support.redis_server import PrivateRedis
from support.servers import wait_until

pytestmark = pytest.mark.redis
URL = "/v1/chat/completions"


def _cache(url: str, prefix: str, **kw: Any) -> dict[str, Any]:
    return {"enabled": True, "type": "redis", "redis_url": url, "key_prefix": f"{prefix}:cache:",
            "redis_timeout": "3s", "flight_lease": "1s", **kw}


def _burst(gws: list[Any], n: int, data: dict[str, Any], stagger: float = 0.0) -> list[httpx.Response]:
    async def one(c: httpx.AsyncClient, i: int) -> httpx.Response:
        await asyncio.sleep(stagger * i)
        return await c.post(gws[i % len(gws)].url + URL, json=data)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))
    return asyncio.run(run())


def body(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def test_leader_error_reaches_followers_on_the_other_instance_and_is_not_stored(
        make_gateway: Callable[..., Any], fake_openai: FakeOpenAI) -> None:
    url, prefix = need_redis(), unique_prefix()
    try:
        cfg = {"providers": [fake_openai.provider(max_retries=0)], "cache": _cache(url, prefix)}
        gws = [make_gateway(cfg), make_gateway(cfg)]
        fake_openai.push(Fault(delay=1.0, status=500, message="upstream exploded"))
        rs = _burst(gws, 8, body("this one fails"), stagger=0.02)
        assert len(fake_openai.calls) == 1
        assert len({r.status_code for r in rs}) == 1 and rs[0].status_code >= 500
        assert len({r.json()["error"]["message"] for r in rs}) == 1
        assert {r.headers["x-helixagent-cache"] for r in rs} == {"MISS"}
        # nothing stored: the next request goes upstream (and succeeds)
        r = httpx.post(gws[1].url + URL, json=body("this one fails"), timeout=10)
        assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "MISS" and len(fake_openai.calls) == 2
        snaps = [g.app.services["cache"].snapshot() for g in gws]
        assert sum(s["flights_led"] for s in snaps) >= 1 and sum(s["flights_followed"] for s in snaps) >= 1
    finally:
        redis_cleanup(url, prefix)


def test_memory_cache_with_the_shared_redis_url_dedupes_across_instances(
        make_gateway: Callable[..., Any], fake_openai: FakeOpenAI) -> None:
    url, prefix = need_redis(), unique_prefix()
    try:
        cfg = {"providers": [fake_openai.provider(max_retries=0)], "redis": {"url": url},
               "cache": {"enabled": True, "type": "memory", "key_prefix": f"{prefix}:cache:", "flight_lease": "1s"}}
        gws = [make_gateway(cfg), make_gateway(cfg)]
        fake_openai.sticky = Fault(delay=1.0)
        for stream in (False, True):
            before = len(fake_openai.calls)
            rs = _burst(gws, 10, body(f"memory cache {stream}", stream=stream), stagger=0.02)
            assert [r.status_code for r in rs] == [200] * 10
            assert len(fake_openai.calls) == before + 1
            assert len({r.text for r in rs}) == 1
    finally:
        redis_cleanup(url, prefix)


def test_flight_stream_values_are_encrypted(make_gateway: Callable[..., Any], fake_openai: FakeOpenAI,
                                            tmp_path: Path) -> None:
    url, prefix = need_redis(), unique_prefix()
    keyfile = tmp_path / "k.keys"
    keyfile.write_text("k2026-01-01:" + base64.b64encode(os.urandom(32)).decode() + "\n")
    try:
        cfg = {"providers": [fake_openai.provider(max_retries=0)], "cache": _cache(url, prefix),
               "encryption": {"enabled": True, "key_file": str(keyfile)}}
        gws = [make_gateway(cfg), make_gateway(cfg)]
        fake_openai.sticky = Fault(chunk_delay=0.15)
        rs = _burst(gws, 6, body("zebracornflakes secret words", stream=True), stagger=0.05)
        assert [r.status_code for r in rs] == [200] * 6 and len(fake_openai.calls) == 1
        assert len({r.text for r in rs}) == 1 and "echo:zebracornflakes" in rs[0].text
        r = redis.Redis.from_url(url)
        try:
            streams = [k for k in r.scan_iter(match=f"{prefix}:cache:*:fl:*", count=1000)]
            assert streams, "the flight stream is gone too early"
            values = [v for k in streams for _, f in r.xrange(k) for v in f.values()]
            assert values and not any(b"zebracornflakes" in v or b"echo:" in v for v in values)
        finally:
            r.close()
    finally:
        redis_cleanup(url, prefix)


def test_redis_dying_under_a_waiting_follower_sends_it_upstream_alone(make_gateway: Callable[..., Any],
                                                                      fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    srv = PrivateRedis()
    try:
        cfg = {"providers": [fake_openai.provider(max_retries=0)],
               "cache": _cache(srv.url, unique_prefix(), redis_timeout="500ms")}
        a, b = make_gateway(cfg), make_gateway(cfg)
        fake_openai.push(Fault(delay=3.0))   # the leader's call

        async def run() -> tuple[httpx.Response, httpx.Response, float]:
            async with httpx.AsyncClient(timeout=30) as c:
                lead = asyncio.ensure_future(c.post(a.url + URL, json=body("redis dies")))
                while not fake_openai.calls:
                    await asyncio.sleep(0.02)
                follow = asyncio.ensure_future(c.post(b.url + URL, json=body("redis dies")))
                await asyncio.sleep(0.5)
                assert len(fake_openai.calls) == 1   # b follows, it did not call the upstream
                t0 = time.monotonic()
                await asyncio.to_thread(srv.close)
                rf = await follow
                took = time.monotonic() - t0
                return await lead, rf, took
        rl, rf, took = asyncio.run(run())
        assert rl.status_code == 200 and rf.status_code == 200
        assert len(fake_openai.calls) == 2    # the follower went upstream alone
        assert took < 10
        assert rf.json()["choices"][0]["message"]["content"] == rl.json()["choices"][0]["message"]["content"]

        # Redis comes back on the same port: the instances share flights again
        proc = subprocess.Popen(["redis-server", "--port", str(srv.port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def back(gw: Any) -> bool:
                r = httpx.post(gw.url + URL, json=body("is redis back"), timeout=10)
                return r.headers["x-helixagent-cache"] == "HIT"
            assert wait_until(lambda: back(a) and back(b), 15, 0.3)
            fake_openai.sticky = Fault(delay=1.0)
            before = len(fake_openai.calls)
            rs = _burst([a, b], 6, body("shared again after the outage"), stagger=0.02)
            assert [r.status_code for r in rs] == [200] * 6 and len(fake_openai.calls) == before + 1
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        srv.close()


def test_bad_flight_settings_are_rejected_naming_the_parameter() -> None:
    from helixagent.config import ConfigError, load_config_dict
    for bad, word in (({"flight_lease": 0}, "flight_lease"), ({"flight_lease": "soon"}, "flight_lease"),
                      ({"dedupe_across_instances": "yes please"}, "dedupe_across_instances"),
                      ({"key_prefix": "a{b}:"}, "key_prefix")):
        with pytest.raises(ConfigError) as ei:
            load_config_dict({"cache": {"enabled": True, "type": "redis", "redis_url": "redis://127.0.0.1:1/0", **bad}})
        assert f"cache.{word}" in str(ei.value)
    for section, key in (("rate_limits", "key_prefix"), ("auth", "redis_prefix")):
        with pytest.raises(ConfigError) as ei:
            load_config_dict({section: {key: "x{y}"}})
        assert f"{section}.{key}" in str(ei.value)


def test_the_local_rules_hold_across_instances(make_gateway: Callable[..., Any], fake_openai: FakeOpenAI,
                                               tmp_path: Path) -> None:
    """Per-tenant scope, "cache": false, a sampled temperature and Cache-Control: no-cache decide what is
    shared across instances exactly as within one: only identical cacheable requests of one tenant."""
    from support.keys import MASTER, admin_create
    url, prefix = need_redis(), unique_prefix()
    try:
        cfg = {"auth": {"master_key": MASTER, "redis_prefix": prefix}, "database": {"url": f"sqlite:///{tmp_path}/k.db"},
               "providers": [fake_openai.provider(max_retries=0)], "cache": _cache(url, prefix)}
        a, b = make_gateway(cfg), make_gateway(cfg)
        ka = admin_create(a, user_id="ua", application="app-a")["key"]
        kb = admin_create(a, user_id="ub", application="app-b")["key"]
        fake_openai.sticky = Fault(delay=1.0)

        async def pair(first: tuple[Any, str, dict[str, Any], dict[str, str]],
                       second: tuple[Any, str, dict[str, Any], dict[str, str]]) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as c:
                def go(gw: Any, key: str, data: dict[str, Any], h: dict[str, str]) -> Any:
                    return c.post(gw.url + URL, json=data, headers={"authorization": f"Bearer {key}", **h})
                t1 = asyncio.ensure_future(go(*first))
                await asyncio.sleep(0.3)   # the first is in flight on its instance
                return [await t1, await go(*second)]

        def calls_for(first: Any, second: Any) -> int:
            before = len(fake_openai.calls)
            rs = asyncio.run(pair(first, second))
            assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]
            return len(fake_openai.calls) - before

        q = body("scoped question")
        assert calls_for((a, ka, q, {}), (b, ka, q, {})) == 1                          # same tenant: shared
        q = body("another scoped question")
        assert calls_for((a, ka, q, {}), (b, kb, q, {})) == 2                          # another application
        q = body("not cached")
        assert calls_for((a, ka, q, {}), (b, ka, dict(q, cache=False), {})) == 2       # "cache": false
        q = {k: v for k, v in body("sampled").items() if k != "temperature"}
        assert calls_for((a, ka, q, {}), (b, ka, q, {})) == 2                          # sampled answers differ
        q = body("fresh please")
        assert calls_for((a, ka, q, {}), (b, ka, q, {"cache-control": "no-cache"})) == 2   # never joins
        q = body("others may join a no-cache leader")
        assert calls_for((a, ka, q, {"cache-control": "no-cache"}), (b, ka, q, {})) == 1
    finally:
        redis_cleanup(url, prefix)
