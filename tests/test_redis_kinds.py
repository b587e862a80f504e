"""Every Redis URL kind -- rediss:// (TLS, a test CA), Sentinel and a 3-node Cluster, each a private
server started for this module -- carries the limits (exact admission across two gateways), the cache (a
hit on the other instance, and one upstream call for identical concurrent requests on both), and the
key-change bus (a revocation on one gateway reaches the other at once); the bounded pool's back-pressure
(PoolExhausted, not an outage) holds on each; no password reaches an error message."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from fakes.openai_upstream import Fault, FakeOpenAI
from helixagent.config import ConfigError, load_config_dict
from helixagent.redaction import mask_url as redact
from helixagent.redis_client import OUTAGE, PoolExhausted, is_cluster, make_client, parse_url, tagged
from support.keys import MASTER, admin_create, admin_post, http
from support.redis_kinds import ClusterRedis, SentinelRedis, TLSRedis

KINDS = {"tls": TLSRedis, "sentinel": SentinelRedis, "cluster": ClusterRedis}


@pytest.fixture(scope="module", params=list(KINDS))
def deployment(request: Any) -> Iterator[Any]:
    d = KINDS[request.param]()
    yield d
    d.close()


def _cfg(url: str, prefix: str, db: Path, fake: FakeOpenAI) -> dict[str, Any]:
    return {"auth": {"master_key": MASTER, "redis_url": url, "redis_prefix": prefix},
            "database": {"url": f"sqlite:///{db}"},
            "providers": [fake.provider(max_retries=0)],
            "rate_limits": {"backend": "redis", "redis_url": url, "key_prefix": prefix, "redis_timeout": 3.0},
            "cache": {"enabled": True, "type": "redis", "redis_url": url, "key_prefix": f"{prefix}:cache:",
                      "redis_timeout": "3s", "flight_lease": "1s"}}


def _chat(gw: Any, key: str, **body: Any) -> httpx.Response:
    return http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=15,
                     json={"model": "gpt-4o-mini", **body})


def test_limits_cache_flights_and_key_bus_on_each_url_kind(deployment: Any, make_gateway: Callable[..., Any],
                                                          fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    prefix = "hxk" + uuid.uuid4().hex[:8]
    cfg = _cfg(deployment.url, prefix, tmp_path / "keys.db", fake_openai)
    gws = [make_gateway(cfg), make_gateway(cfg)]
    assert gws[0].app.services["cache"].backend.client is not None
    r = http.get(gws[0].url + "/readyz", timeout=10)   # readiness pings every Redis in use, of this kind
    assert r.status_code == 200, r.text
    k = admin_create(gws[0], user_id="kinds")["key"]
    msgs = [{"role": "user", "content": "cached on every kind"}]

    # cache: stored by one instance, a hit on the other
    r = _chat(gws[0], k, messages=msgs, temperature=0)
    assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "MISS", r.text
    r = _chat(gws[1], k, messages=msgs, temperature=0)
    assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "HIT"
    assert len(fake_openai.calls) == 1

    # flights: identical concurrent requests on both instances make one upstream call
    fake_openai.sticky = Fault(delay=1.0)

    async def burst(n: int, key: str, **body: Any) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(*(
                c.post(gws[i % 2].url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "gpt-4o-mini", **body}) for i in range(n)))
    rs = asyncio.run(burst(8, k, messages=[{"role": "user", "content": "shared flight"}], temperature=0))
    assert [r.status_code for r in rs] == [200] * 8 and len(fake_openai.calls) == 2
    assert len({r.json()["id"] for r in rs}) == 1
    fake_openai.sticky = None

    # limits: a 4-per-minute key admitted exactly 4 times over both instances (multi-key reserve script)
    k2 = admin_create(gws[1], user_id="kinds2", limits={"requests_per_minute": 4, "tokens_per_day": 10 ** 6})["key"]
    rs = asyncio.run(burst(12, k2, messages=[{"role": "user", "content": "limited"}], max_tokens=4))
    codes = [r.status_code for r in rs]
    assert codes.count(200) == 4 and codes.count(429) == 8, codes

    # key bus: gws[1] has k cached (just used); a revocation on gws[0] reaches it before the call returns
    assert all(g.app.services["auth"].bus.healthy for g in gws)   # subscribed on this kind
    r = _chat(gws[1], k, messages=msgs, temperature=0)
    assert r.status_code == 200
    kid = next(x["id"] for x in http.get(gws[0].url + "/admin/keys", headers={"authorization": f"Bearer {MASTER}"})
               .json()["data"] if x["user_id"] == "kinds")
    assert admin_post(gws[0], f"/admin/keys/{kid}/revoke").status_code == 200
    r = _chat(gws[1], k, messages=msgs, temperature=0)
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"

    # every key the gateways wrote is under a hash tag in a cluster (one slot per script)
    async def keys() -> list[bytes]:
        c = make_client(deployment.url, pool_size=4, pool_timeout=2, timeout=3, connect_timeout=3)
        try:
            await c.ping()
            if is_cluster(c):
                out: list[bytes] = []
                for node in c.get_primaries():
                    out += await c.execute_command("KEYS", f"{prefix}*", target_nodes=node)
                return out
            return list(await c.keys(f"{prefix}*"))
        finally:
            await c.aclose()
    written = asyncio.run(keys())
    assert written
    if isinstance(deployment, ClusterRedis):
        assert all(b"{" in key and b"}" in key for key in written), written


def test_pool_exhaustion_is_back_pressure_on_each_url_kind(deployment: Any) -> None:
    async def run() -> None:
        c = make_client(deployment.url, pool_size=2, pool_timeout=0.3, timeout=None, connect_timeout=3)
        k = tagged("hxk" + uuid.uuid4().hex[:8], "pool", "q")
        try:
            await c.ping()
            holders = [asyncio.ensure_future(c.blpop([k], timeout=2)) for _ in range(2)]
            await asyncio.sleep(0.3)
            with pytest.raises(PoolExhausted):
                await c.get(k)
            assert await asyncio.gather(*holders) == [None, None]
            assert await c.get(k) is None   # free again
        finally:
            await c.aclose()
    asyncio.run(run())


def test_no_password_in_errors_or_config_messages() -> None:
    secret = "pw-never-shown-42"
    for url in (f"redis+sentinel://:{secret}@127.0.0.1:1/svc/0", f"redis+cluster://:{secret}@127.0.0.1:1",
                f"rediss://:{secret}@127.0.0.1:1/0"):
        assert secret not in redact(url)
        parse_url(url)

        async def fail(u: str = url) -> str:
            c = make_client(u, pool_size=2, pool_timeout=1, timeout=0.5, connect_timeout=0.5)
            try:
                await c.ping()
            except OUTAGE as exc:
                return f"{type(exc).__name__}: {exc}"
            finally:
                await c.aclose()
            raise AssertionError("a dead Redis answered")
        msg = asyncio.run(fail())
        assert secret not in msg, msg
    for bad in (f"redis+cluster://:{secret}@127.0.0.1:1/2", f"memcached://:{secret}@x:1",
                f"redis+sentinel://:{secret}@127.0.0.1:26379"):
        with pytest.raises(ConfigError) as ei:
            load_config_dict({"redis": {"url": bad}})
        assert secret not in str(ei.value) and "redis.url" in str(ei.value)
    with pytest.raises(ValueError):
        tagged("p", "a{b")
    # `config check` shows the effective config: Redis URLs without a user and query passwords masked too
    from helixagent.config import masked_dict
    from helixagent.preflight import mask_url
    url = f"redis+sentinel://:{secret}@h1:26379,h2:26379/svc/0?sentinel_password={secret}"
    shown = masked_dict(load_config_dict({"redis": {"url": url}, "cache": {"enabled": True, "type": "redis"}}))
    assert secret not in str(shown) and shown["redis"]["url"].startswith("redis+sentinel://:****@h1")
    assert secret not in mask_url(url) and secret not in mask_url(f"rediss://:{secret}@h:6380/0")


def test_rediss_refuses_a_server_its_ca_does_not_trust(tmp_path: Path) -> None:
    """TLS verification is real: the same server with a CA that did not sign its certificate is an
    outage (refused), never a silent plaintext or unverified connection."""
    from support.redis_kinds import make_ca
    srv = TLSRedis()
    try:
        other_ca = make_ca(tmp_path)[0]
        bad = srv.url.replace(str(srv.ca), str(other_ca))

        async def ping(url: str) -> str:
            c = make_client(url, pool_size=2, pool_timeout=2, timeout=3, connect_timeout=3)
            try:
                return str(await c.ping())
            except OUTAGE as exc:
                return type(exc).__name__
            finally:
                await c.aclose()
        assert asyncio.run(ping(srv.url)) == "True"
        assert asyncio.run(ping(bad)) == "ConnectionError"
        plain = f"redis://:{srv.password}@127.0.0.1:{srv.port}/0"   # no TLS to a TLS-only port
        assert asyncio.run(ping(plain)) in ("ConnectionError", "TimeoutError")
    finally:
        srv.close()
