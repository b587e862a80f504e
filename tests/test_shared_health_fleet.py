"""Shared health with real gateways: three ``helixagent serve`` processes on one Redis avoid a provider that
failed on one of them and probe it once for the fleet; a gateway whose Redis dies keeps serving on local
health and shares again when Redis is back.  Real Redis (HELIX_TEST_REDIS_URL), unique prefix per test."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_redis
from fakes.openai_upstream import Fault, FakeOpenAI
from support.keys import redis_cleanup, unique_prefix
from support.serve import ServeProcess
from support.servers import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]
MODEL = "gpt-4o-mini"
COOLDOWN = 4.0


class Serve(ServeProcess):
    """A gateway process that is ready once its shared health is live."""

    def __init__(self, cfg: dict[str, Any], tmp: Path, name: str):
        super().__init__(cfg, tmp, name, cwd=tmp)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def health(self) -> dict[str, Any]:
        return dict(self.client.get("/health").json())

    def ready(self) -> bool:
        return bool(self.health()["shared_health"]["status"] == "ok")

    def chat(self) -> str:
        r = self.client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8,
                                                           "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        return r.headers["x-helixagent-provider"]

    def breaker(self, provider: str = "p1") -> str:
        return str(self.health()["providers"][provider]["breaker"])

    def close(self) -> None:
        self.client.close()
        super().close()


@pytest.fixture
def upstream():
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture
def three(tmp_path, upstream):
    url = need_redis()
    prefix = unique_prefix()
    procs: list[Serve] = []
    for i in range(3):
        cfg = {"auth": {"redis_prefix": prefix},
               "database": {"url": f"sqlite:///{tmp_path}/gw{i}.db", "spool_dir": str(tmp_path / f"spool{i}")},
               "redis": {"url": url},
               "routing": {"shared_health": {"key_prefix": prefix, "sync_interval": "200ms"},
                           "retries": {"max_attempts": 1},
                           "circuit_breaker": {"failure_threshold": 3, "min_requests": 1000,
                                               "cooldown": f"{COOLDOWN}s"}},
               "providers": [upstream.provider("p1", models=[MODEL], fallback_to=["p2"], priority=1),
                             {"name": "p2", "type": "mock", "models": [MODEL], "priority": 2}]}
        procs.append(Serve(cfg, tmp_path, f"gw{i}"))
    try:
        deadline = time.time() + 60
        for p in procs:
            p.wait_ready(deadline)
        yield procs
    finally:
        for p in procs:
            p.close()
        redis_cleanup(url, prefix)


def test_three_processes_avoid_a_failing_provider_and_probe_it_once(three, upstream):
    g1, g2, g3 = three
    upstream.sticky = Fault(status=500)
    # failing requests through instance 1 only, until its breaker opens (each falls back to p2)
    for _ in range(3):
        assert g1.chat() == "p2"
    opened = time.monotonic()
    assert len(upstream.calls) == 3 and g1.breaker() == "open"
    # the others learn it within one breaker interval (pub/sub; no request of theirs needed)
    assert wait_until(lambda: g2.breaker() == "open" and g3.breaker() == "open", timeout=COOLDOWN * 0.75)
    assert time.monotonic() - opened < COOLDOWN
    for _ in range(8):
        assert g2.chat() == "p2" and g3.chat() == "p2" and g1.chat() == "p2"
    assert len(upstream.calls) == 3  # none of them reached p1
    h2 = g2.health()["providers"]["p1"]
    assert h2["shared"]["remote_opens"] == 1 and h2["failures"] == 0

    # the cooldown is over: requests on all three; exactly one coordinated probe reaches p1 (and fails)
    time.sleep(max(0.0, opened + COOLDOWN + 0.3 - time.monotonic()))
    for _ in range(15):
        for g in three:
            assert g.chat() == "p2"
    assert len(upstream.calls) == 4, len(upstream.calls)
    reopened = time.monotonic()
    assert all(g.breaker() == "open" for g in three)

    # p1 recovers: after the next cooldown one probe succeeds and closes the breaker on every instance
    upstream.sticky = None
    time.sleep(max(0.0, reopened + COOLDOWN + 0.3 - time.monotonic()))
    served: list[str] = []
    for _ in range(3):
        for g in three:
            served.append(g.chat())
    assert served.count("p1") >= 1
    first_p1 = served.index("p1")
    assert all(s == "p2" for s in served[:first_p1])
    assert wait_until(lambda: all(g.breaker() == "closed" for g in three), timeout=COOLDOWN * 0.75)
    before = len(upstream.calls)
    assert [g.chat() for g in three] == ["p1", "p1", "p1"]
    assert len(upstream.calls) == before + 3


def test_retry_after_on_one_process_cools_the_model_on_the_others(three, upstream):
    g1, g2, g3 = three
    upstream.push(Fault(status=429, headers={"retry-after": "3"}))
    assert g1.chat() == "p2"  # the 429 falls back (max_attempts 1: no retry on p1)
    assert len(upstream.calls) == 1
    assert wait_until(lambda: MODEL in g2.health()["providers"]["p1"].get("rate_limit_cooldown_s", {}), timeout=2)
    assert g2.chat() == "p2" and g3.chat() == "p2"
    assert len(upstream.calls) == 1  # cooling everywhere: p1 not called first
    assert g2.health()["providers"]["p1"]["breaker"] == "closed"  # a 429 is no breaker verdict


def test_gateway_keeps_serving_when_redis_dies_and_shares_again(make_gateway, fake_openai, tmp_path, caplog):
    from support.redis_server import PrivateRedis
    from test_shared_health import _restart
    srv = PrivateRedis()
    port = srv.port
    caplog.set_level(logging.WARNING, logger="helixagent.routing")
    gw = make_gateway({"redis": {"url": srv.url},
                       "routing": {"shared_health": {"key_prefix": "hxdown", "sync_interval": "100ms",
                                                     "redis_timeout": "300ms"}},
                       "providers": [fake_openai.provider()]})
    c = httpx.Client(base_url=gw.url, timeout=30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    srv2 = None
    try:
        assert wait_until(lambda: c.get("/health").json()["shared_health"]["status"] == "ok")
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        srv.proc.kill()
        srv.proc.wait(10)
        assert wait_until(lambda: c.get("/health").json()["shared_health"]["status"] == "degraded")
        for _ in range(20):
            assert c.post("/v1/chat/completions", json=body).status_code == 200
        warned = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(warned) == 1
        assert "helixagent_shared_health_up 0.0" in c.get("/metrics").text
        srv2 = PrivateRedis.__new__(PrivateRedis)
        d = tmp_path / "redis2"
        d.mkdir()
        _restart(srv2, port, str(d))
        assert wait_until(lambda: c.get("/health").json()["shared_health"]["status"] == "ok", timeout=15)
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        st = c.get("/health").json()["shared_health"]
        assert st["outages"] == 1 and st["subscribed"] is True
        m = c.get("/metrics").text
        assert "helixagent_shared_health_up 1.0" in m and "helixagent_shared_health_outages_total 1.0" in m
    finally:
        c.close()
        if srv2 is not None:
            srv2.close()
        srv.close()


def test_without_redis_shared_health_is_off(gateway):
    h = httpx.get(gateway.url + "/health").json()
    assert h["shared_health"] == {"enabled": False} and "shared" not in h["providers"]["openai"]
    assert "helixagent_shared_health_up 1.0" in httpx.get(gateway.url + "/metrics").text


def test_reload_keeps_sharing_and_reports_shared_health_changes_as_restart_only(make_gateway, fake_openai, tmp_path):
    """A provider added by a config reload is shared too; a changed routing.shared_health needs a restart."""
    from helixagent.config import load_config_dict
    url = need_redis()
    prefix = unique_prefix()
    db = {"url": f"sqlite:///{tmp_path}/r.db", "spool_dir": str(tmp_path / "spool")}

    def cfg(sync: str, extra: bool) -> dict[str, Any]:
        provs = [fake_openai.provider()] + ([fake_openai.provider("p3", priority=3)] if extra else [])
        return {"database": db, "redis": {"url": url}, "providers": provs,
                "routing": {"shared_health": {"key_prefix": prefix, "sync_interval": sync}}}
    try:
        gw = make_gateway(cfg("200ms", False))
        other = make_gateway(cfg("200ms", True))  # an instance that has p3 already
        shared = gw.app.services["shared_health"]
        assert wait_until(lambda: shared.ok and other.app.services["shared_health"].ok)
        res = gw.run(gw.app.services["reload"].apply(load_config_dict(cfg("5s", True), "<t>")))
        assert "routing.shared_health" in res["restart_required"], res
        assert gw.app.cfg.routing.shared_health.sync_interval == 0.2  # the running value is kept
        h3 = gw.app.router.health.get("p3")
        assert h3.listener is shared and gw.app.services["health"] is shared.health

        def trip() -> None:
            for _ in range(h3.cfg.failure_threshold):
                h3.failure(1, "server_error")  # NORMAL: not a probe
        gw.app.loop.call_soon_threadsafe(trip)
        oh = other.app.router.health
        assert wait_until(lambda: oh.get("p3").state == "open")
        assert httpx.get(other.url + "/health").json()["providers"]["p3"]["breaker"] == "open"
    finally:
        redis_cleanup(url, prefix)
