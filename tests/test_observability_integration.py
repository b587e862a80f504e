"""Metrics and access lines across features: cache counters, limits backend state and budgets, breaker
availability from the routing health service, and access lines for requests outside the pipeline."""
from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from conftest import need_redis
from fakes.openai_upstream import Fault, FakeOpenAI
from helixagent.config import load_config_dict
from helixagent.observability.logs import configure_logging, reset_logging
from support.keys import MASTER, MODEL, admin_create, chat, redis_cleanup, unique_prefix
from support.observability import parse_metrics, value
from support.servers import wait_until

MSGS = [{"role": "user", "content": "hello"}]


def scrape(gw, key=None):
    r = httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {key}"} if key else {})
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


def post(gw, text, timeout=20.0):
    return httpx.post(gw.url + "/v1/chat/completions", timeout=timeout,
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "temperature": 0})


def test_cache_counters_exported_exactly(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)],
                       "cache": {"enabled": True, "type": "memory", "max_size": 2}})
    for i in range(4):  # 4 stores into 2 slots: 2 evictions
        assert post(gw, f"distinct {i}").status_code == 200
    assert post(gw, "distinct 3").headers["x-helixagent-cache"] == "HIT"
    # 6 identical requests while the first is still upstream: 1 call, 5 coalesced followers
    fake_openai.push(Fault(delay=0.5))
    svc = gw.app.services["cache"]

    async def burst():
        async with httpx.AsyncClient(timeout=20) as c:
            first = asyncio.ensure_future(c.post(gw.url + "/v1/chat/completions", json={
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same"}], "temperature": 0}))
            while not svc.inflight:
                await asyncio.sleep(0.005)
            rest = [c.post(gw.url + "/v1/chat/completions", json={
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same"}], "temperature": 0})
                for _ in range(5)]
            return list(await asyncio.gather(first, *rest))
    rs = asyncio.run(burst())
    assert [r.status_code for r in rs] == [200] * 6
    st = svc.stats
    assert st.coalesced == 5 and st.evictions == 3 and st.stores == 5
    m = scrape(gw)
    assert value(m, "helixagent_cache_evictions_total") == 3
    assert value(m, "helixagent_cache_coalesced_total") == 5
    assert value(m, "helixagent_cache_stores_total") == 5
    assert value(m, "helixagent_cache_errors_total") == 0
    assert value(m, "helixagent_cache_entries") == 2
    assert value(m, "helixagent_cache_bytes") == st.bytes > 0
    assert value(m, "helixagent_cache_backend_up") == 1
    # a second scrape adds nothing (deltas, not totals, are pushed)
    assert value(scrape(gw), "helixagent_cache_evictions_total") == 3


def test_cache_and_limits_backend_outage_metrics(make_gateway, fake_openai):
    dead = "redis://127.0.0.1:1/0"  # nothing listens: connection refused
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0)],
                       "cache": {"enabled": True, "type": "redis", "redis_url": dead, "redis_timeout": "0.2s"},
                       "rate_limits": {"backend": "redis", "redis_url": dead, "redis_timeout": 0.2,
                                       "ip": {"requests_per_minute": 1000}}})
    for i in range(3):  # request limits allow during an outage by default; the cache is bypassed
        r = post(gw, f"q{i}")
        assert r.status_code == 200 and r.headers["x-helixagent-cache"] == "BYPASS"
    limits = gw.app.services["limits"]
    cache = gw.app.services["cache"]
    m = scrape(gw)
    assert limits.backend_errors == 3 and limits.outages == 1
    assert value(m, "helixagent_rate_limit_backend_errors_total") == 3
    assert value(m, "helixagent_rate_limit_backend_outages_total") == 1
    assert value(m, "helixagent_rate_limit_backend_up") == 0
    assert cache.stats.errors >= 1
    assert value(m, "helixagent_cache_errors_total") == cache.stats.errors
    assert value(m, "helixagent_cache_backend_up") == 0
    assert value(m, "helixagent_cache_entries") == 0  # Redis keeps its own size: no memory gauge


def _limited(make_gateway, rl):
    return make_gateway({"auth": {"master_key": MASTER},
                         "providers": [{"name": "mock", "type": "mock", "mock_tokens": 4, "models": [MODEL]}],
                         "rate_limits": rl})


def _budget_case(make_gateway, rl, wait=False):
    gw = _limited(make_gateway, {"user": {"tokens_per_day": 1000}, "application": {"tokens_per_month": 100000},
                                 **rl})
    m = scrape(gw, MASTER)  # configured, nobody used them yet: full
    assert value(m, "helixagent_budget_remaining_ratio", scope="user", window="day") == 1.0
    assert value(m, "helixagent_budget_remaining_ratio", scope="application", window="month") == 1.0
    a = admin_create(gw, user_id="u-a", application="app1")["key"]
    b = admin_create(gw, user_id="u-b", application="app1")["key"]
    c = admin_create(gw, user_id="u-c", limits={"tokens_per_day": 500})["key"]
    for key, n in ((a, 3), (b, 1), (c, 2)):
        for _ in range(n):
            r = chat(gw, key, max_tokens=4)
            assert r.status_code == 200, r.text
    per = r.json()["usage"]["total_tokens"]
    want = {("user", "day"): (1000 - 3 * per) / 1000, ("application", "month"): (100000 - 4 * per) / 100000,
            ("api_key", "day"): (500 - 2 * per) / 500}
    lm = gw.app.services["limits"]
    if wait:  # Redis: read by the periodic refresh
        assert wait_until(lambda: lm.budget_remaining().get(("user", "day")) == pytest.approx(want[("user", "day")]), 15)
    m = scrape(gw, MASTER)
    for (scope, window), frac in want.items():
        assert value(m, "helixagent_budget_remaining_ratio", scope=scope, window=window) == pytest.approx(frac)
    series = {ls for (n, ls) in m if n == "helixagent_budget_remaining_ratio"}
    assert len(series) == 3  # bounded: scope x window, never a user, key or application name
    assert "u-a" not in httpx.get(gw.url + "/metrics", headers={"authorization": f"Bearer {MASTER}"}).text
    return gw


def test_budget_remaining_memory(make_gateway):
    _budget_case(make_gateway, {})


def test_budget_remaining_redis(make_gateway):
    url = need_redis()
    prefix = unique_prefix()
    try:
        _budget_case(make_gateway, {"backend": "redis", "redis_url": url, "key_prefix": prefix,
                                    "redis_timeout": 3.0}, wait=True)
    finally:
        redis_cleanup(url, prefix)


def test_breaker_availability_on_metrics(make_gateway):
    fa, fb = FakeOpenAI(), FakeOpenAI()
    try:
        gw = make_gateway({"providers": [fa.provider("a", priority=1, max_retries=0), fb.provider("b", priority=2)],
                           "routing": {"circuit_breaker": {"failure_threshold": 2, "cooldown": "0.5s",
                                                           "min_requests": 100},
                                       "retries": {"max_attempts": 1}}})
        m = scrape(gw)
        assert value(m, "helixagent_provider_availability", provider="a") == 1
        fa.sticky = Fault(status=500)
        for _ in range(2):
            assert post(gw, "x").headers["x-helixagent-provider"] == "b"
        m = scrape(gw)
        assert value(m, "helixagent_provider_availability", provider="a") == 0
        assert value(m, "helixagent_provider_breaker_state", provider="a") == 2
        assert value(m, "helixagent_provider_availability", provider="b") == 1
        fa.sticky = None
        time.sleep(0.6)
        r = post(gw, "probe")  # the half-open probe succeeds
        assert r.headers["x-helixagent-provider"] == "a"
        m = scrape(gw)
        assert value(m, "helixagent_provider_availability", provider="a") == 1
        assert value(m, "helixagent_provider_breaker_state", provider="a") == 0
    finally:
        fa.close()
        fb.close()


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "helix.log"
    cfg = load_config_dict({"logging": {"file": str(path), "format": "json"}})
    configure_logging(cfg.logging)
    yield path
    reset_logging()


def test_access_lines_outside_the_pipeline(make_gateway, fake_openai, logfile):
    gw = make_gateway({"auth": {"master_key": MASTER}, "providers": [fake_openai.provider(max_retries=0)],
                       "logging": {"file": str(logfile), "format": "json"}})
    h = {"authorization": f"Bearer {MASTER}", "user-agent": "probe/1.0", "x-request-id": "rid-models-1"}
    created = admin_create(gw, user_id="alice", application="shop", role="readonly")
    ro = {"authorization": f"Bearer {created['key']}"}
    assert httpx.get(gw.url + "/v1/models", headers=h).status_code == 200
    assert httpx.get(gw.url + "/health", headers=ro).status_code == 200
    assert httpx.get(gw.url + "/metrics", headers=h).status_code == 200
    assert httpx.get(gw.url + "/v1/usage", headers=ro).status_code == 200
    assert httpx.get(gw.url + "/admin/keys", headers=ro).status_code == 403
    assert httpx.get(gw.url + "/dashboard/data").status_code == 401
    assert httpx.get(gw.url + "/nope", headers=h).status_code == 404
    assert httpx.post(gw.url + "/v1/chat/completions", headers=h,
                      json={"model": "gpt-4o-mini", "messages": MSGS}).status_code == 200

    def lines():
        out = []
        for raw in logfile.read_text().splitlines():
            d = orjson.loads(raw)
            if d.get("logger") == "helixagent.access":
                out.append(d)
        return out
    assert wait_until(lambda: len(lines()) >= 9, 5)
    by = {(d["method"], d["path"]): d for d in lines()}
    assert by[("POST", "/admin/keys")]["status_code"] == 201
    m = by[("GET", "/v1/models")]
    assert m["status_code"] == 200 and m["user_agent"] == "probe/1.0" and m["client_request_id"] == "rid-models-1"
    assert m["response_time"] >= 0 and m["request_id"] and m["ip"] == "127.0.0.1" and m["error"] is None
    assert m["provider"] is None and m["tokens"] is None
    hl = by[("GET", "/health")]
    assert hl["status_code"] == 200 and hl["key_id"] == created["id"] and hl["user"] == "alice"
    assert hl["application"] == "shop"
    assert by[("GET", "/metrics")]["status_code"] == 200
    assert by[("GET", "/v1/usage")]["status_code"] == 200
    ad = by[("GET", "/admin/keys")]
    assert ad["status_code"] == 403 and ad["error"]["code"] == "insufficient_permissions"
    assert by[("GET", "/dashboard/data")]["status_code"] == 401
    assert by[("GET", "/nope")]["status_code"] == 404 and by[("GET", "/nope")]["error"]["code"] == "unknown_url"
    # the pipeline request still has exactly one line (from the observability stage)
    assert [d["path"] for d in lines()].count("/v1/chat/completions") == 1
    text = logfile.read_text()
    assert MASTER not in text and created["key"] not in text
