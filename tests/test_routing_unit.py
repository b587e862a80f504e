"""Routing internals in process: breaker state machine, health score, strategies, cost limits, prices."""
from __future__ import annotations

import random
import socket
import time

import httpx
import pytest

from helixagent.canonical import ChatRequest
from helixagent.config import BreakerConfig, load_config_dict
from helixagent.errors import GatewayError
from helixagent.providers import build_provider
from helixagent.routing import costs
from helixagent.routing.health import CLOSED, DENIED, HALF_OPEN, NORMAL, OPEN, PROBE, Health, ProviderHealth
from helixagent.routing.router import Router


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(**kw) -> tuple[ProviderHealth, Clock]:
    clock = Clock()
    return ProviderHealth("p", BreakerConfig(**kw), clock), clock


def test_breaker_opens_on_consecutive_failures_and_cools_down():
    h, clock = breaker(failure_threshold=3, cooldown=10, min_requests=100)
    for _ in range(2):
        assert h.acquire(clock()) == NORMAL
        h.failure(NORMAL)
    assert h.state == CLOSED
    h.success(0.1, False, NORMAL)  # a success resets the run
    for _ in range(3):
        h.failure(NORMAL)
    assert h.state == OPEN and h.availability() == 0.0
    assert h.acquire(clock()) == DENIED and not h.available(clock())
    clock.t += 9.9
    assert h.acquire(clock()) == DENIED
    clock.t += 0.2
    assert h.available(clock()) and h.effective_state() == HALF_OPEN and h.availability() == 0.5
    assert h.acquire(clock()) == PROBE
    assert h.acquire(clock()) == DENIED  # one probe at a time
    h.success(0.1, False, PROBE)
    assert h.state == CLOSED and h.availability() == 1.0


def test_breaker_needs_n_probes_and_a_failed_probe_reopens():
    h, clock = breaker(failure_threshold=1, cooldown=5, half_open_probes=2)
    h.failure(NORMAL)
    clock.t += 5
    assert h.acquire(clock()) == PROBE and h.acquire(clock()) == PROBE
    assert h.acquire(clock()) == DENIED
    h.success(0.1, False, PROBE)
    assert h.state == HALF_OPEN
    h.cancelled(PROBE)  # an abandoned probe frees its slot without a verdict
    assert h.acquire(clock()) == PROBE
    h.failure(PROBE)
    assert h.state == OPEN and h.opens == 2
    assert h.acquire(clock()) == DENIED


def test_breaker_error_rate_over_window_with_min_requests():
    h, clock = breaker(failure_threshold=100, error_rate_threshold=0.5, min_requests=10, window=10)
    for i in range(9):  # 5 failures of 9: rate over threshold but too few requests
        (h.failure(NORMAL) if i % 2 == 0 else h.success(0.1, False, NORMAL))
    assert h.state == CLOSED
    h.success(0.1, False, NORMAL)   # 10 requests, 5 failures: next failure makes 6/11
    h.failure(NORMAL)
    assert h.state == OPEN


def test_error_rate_window_forgets_old_requests():
    h, clock = breaker(failure_threshold=100, error_rate_threshold=0.5, min_requests=4, window=10)
    for _ in range(3):
        h.failure(NORMAL)
    clock.t += 11  # those fall out of the window
    h.success(0.1, False, NORMAL)
    h.success(0.1, False, NORMAL)
    h.success(0.1, False, NORMAL)
    h.failure(NORMAL)
    assert h.window_counts() == (4, 1)
    assert h.state == CLOSED


def test_latency_ewma_and_p95():
    h, _ = breaker()
    for i in range(100):
        h.success((i % 20 + 1) / 100, False, NORMAL)
    assert h.full.count == 100
    assert 0.18 <= h.full.p95() <= 0.20
    assert 0.05 < h.full.ewma < 0.2
    assert h.ttfb.ewma is None


def test_health_describe_and_score():
    clock = Clock()
    hs = Health(BreakerConfig(failure_threshold=2, cooldown=30), ["fast", "slow", "broken"], clock)
    hs.get("fast").success(0.1, False, NORMAL)
    hs.get("slow").success(0.4, False, NORMAL)
    hs.get("broken").failure(NORMAL, "timeout")
    hs.get("broken").failure(NORMAL, "timeout")
    assert hs.score("fast") == 1.0
    assert hs.score("slow") == pytest.approx(0.25, abs=1e-3)
    assert hs.score("broken") == 0.0
    d = hs.describe("broken")
    assert d["breaker"] == "open" and d["availability"] == 0.0 and d["last_error"] == "timeout"
    assert d["cooldown_remaining_s"] == 30 and d["failures"] == 2
    assert hs.describe("fast")["latency_ewma_ms"] == 100.0
    assert hs.availability("unknown") == 1.0


def make_router(data: dict) -> Router:
    cfg = load_config_dict(data)
    providers = {pc.name: build_provider(pc, cfg.http) for pc in cfg.providers}
    return Router(cfg, providers, Clock())


def mock(name: str, **kw) -> dict:
    d = {"name": name, "type": "mock", "models": ["m"], "priority": 10}
    d.update(kw)
    return d


def req(max_tokens: int | None = None, text: str = "hi") -> ChatRequest:
    return ChatRequest("m", [{"role": "user", "content": text}], {"max_tokens": max_tokens} if max_tokens else {})


def names(cands) -> list[str]:
    return [c.name for c in cands]


def test_priority_order_and_fallback_chain():
    r = make_router({"providers": [mock("a", priority=2, fallback_to=["x"]), mock("b", priority=1),
                                   mock("x", models=["other"], priority=99)]})
    assert names(r.order(r.plan("m", None), req())) == ["b", "a", "x"]
    assert r.candidates("m", None)[2].model == "other"  # fallback uses the provider's own model
    r.health.get("b").failure(NORMAL)
    for _ in range(10):
        r.health.get("b").failure(NORMAL)
    assert names(r.order(r.plan("m", None), req())) == ["a", "x"]


def test_latency_strategy_fastest_healthy_first():
    r = make_router({"providers": [mock("a", priority=1), mock("b", priority=2), mock("c", priority=3)],
                     "routing": {"strategy": "latency"}})
    r.health.get("a").success(0.5, False, NORMAL)
    r.health.get("b").success(0.1, False, NORMAL)
    r.health.get("c").success(0.3, False, NORMAL)
    assert names(r.order(r.plan("m", None), req())) == ["b", "c", "a"]
    r.health.get("a").success(0.01, True, NORMAL)  # streams are ordered by time to first chunk
    assert names(r.order(r.plan("m", None), req(), stream=True))[0] == "a"


def test_cost_strategy_cheapest_first_unknown_last():
    r = make_router({"providers": [
        mock("pricey", priority=1, model_prices={"m": {"input_per_mtok": 10, "output_per_mtok": 30}}),
        mock("unknown", priority=2),
        mock("cheap", priority=3, model_prices={"m": {"input_per_mtok": 0.1, "output_per_mtok": 0.4}})],
        "routing": {"routes": [{"models": ["m"], "strategy": "cost"}]}})
    assert names(r.order(r.plan("m", None), req())) == ["cheap", "pricey", "unknown"]


def test_weighted_strategy_follows_weights():
    r = make_router({"providers": [mock("a", weight=3), mock("b", weight=1), mock("z", weight=0)],
                     "routing": {"strategy": "weighted"}})
    random.seed(7)
    plan = r.plan("m", None)
    firsts = [r.order(plan, req())[0].name for _ in range(4000)]
    share = firsts.count("a") / len(firsts)
    assert 0.70 < share < 0.80  # expected 0.75
    assert "z" not in firsts


def test_route_prefix_match_and_limits():
    r = make_router({"providers": [mock("a", models=["gpt-4o", "gpt-4o-mini"])],
                     "routing": {"strategy": "latency", "max_cost_per_request": 5,
                                 "routes": [{"models": ["gpt-4o*"], "strategy": "cost", "max_cost_per_request": 1}]}})
    rt = r.route_for("gpt-4o-mini")
    assert rt.strategy == "cost" and rt.max_cost_per_request == 1
    assert r.route_for("other").strategy == "latency"


def test_cost_limits():
    prices = {"m": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    r = make_router({"providers": [mock("a", model_prices=prices, max_cost_per_request=0.001)]})
    plan = r.plan("m", None)
    assert names(r.order(plan, req(max_tokens=100))) == ["a"]  # ~0.0002 $
    with pytest.raises(GatewayError) as ei:
        r.order(plan, req(max_tokens=1000))  # ~0.002 $
    assert ei.value.status == 400 and ei.value.code == "cost_limit_exceeded"
    # no max_tokens: routing.estimate_completion_tokens (1024) is assumed
    with pytest.raises(GatewayError):
        r.order(plan, req())
    r2 = make_router({"providers": [mock("a", model_prices=prices, max_cost_per_token=1e-6)]})
    with pytest.raises(GatewayError) as ei:
        r2.order(r2.plan("m", None), req())
    assert "2e-06/token" in ei.value.message


def test_price_prefers_catalogue_when_present(monkeypatch):
    cfg = load_config_dict({"providers": [mock("a", model_prices={"m": {"input_per_mtok": 1}})]}).providers[0]
    assert costs.price(cfg, "m") == (1e-6, 0.0)
    assert costs.price(cfg, "nope") is None

    class Cat:
        @staticmethod
        def price(pc, model):
            return (3e-6, 4e-6) if model == "m" else None

    monkeypatch.setattr(costs, "_catalogue", Cat)
    assert costs.price(cfg, "m") == (3e-6, 4e-6)
    assert costs.format_cost(0.00012) == "0.00012" and costs.format_cost(0.0) == "0"


def test_backoff_is_jittered_exponential_and_honours_retry_after():
    r = make_router({"providers": [mock("a")],
                     "routing": {"retries": {"backoff_base_ms": 100, "backoff_max_ms": 400, "max_retry_after_ms": 2000}}})
    e = GatewayError(502, "x", retryable=True)
    for n, hi in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 0.4)):
        xs = [r._backoff(n, e) for _ in range(200)]
        assert all(hi / 2 <= x <= hi for x in xs) and len(set(xs)) > 1
    assert r._backoff(1, GatewayError(429, "x", retry_after=1.5)) == 1.5
    assert r._backoff(1, GatewayError(429, "x", retry_after=2.5)) is None


def test_connect_timeout_holds(make_gateway, fake_openai):
    """A server that never accepts (full backlog): the connect timeout, not the total, applies."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue so further SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        time.sleep(0.05)
        gw = make_gateway({"providers": [
            {"name": "blackhole", "type": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "api_key": "sk-x-1234567",
             "models": ["gpt-4o-mini"], "priority": 0, "max_retries": 0, "timeout_ms": 20000, "connect_timeout_ms": 300},
            fake_openai.provider("ok", priority=1)]})
        t0 = time.monotonic()
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30,
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        assert r.headers["x-helixagent-provider"] == "ok"
        assert time.monotonic() - t0 < 0.3 + 1.0
        assert httpx.get(gw.url + "/health").json()["providers"]["blackhole"]["last_error"] == "timeout"
    finally:
        for s in fillers:
            s.close()
        srv.close()


# -- the router's handler in process, with scripted providers ------------------------------------------
import asyncio  # noqa: E402

from helixagent.canonical import ChatResponse, Usage, new_completion  # noqa: E402
from helixagent.pipeline import RequestContext  # noqa: E402
from helixagent.providers.base import Provider  # noqa: E402


class Scripted(Provider):
    """Answers after ``delay`` seconds, or raises the next scripted error."""

    def __init__(self, cfg, http, delay: float = 0.0, errors=()):
        super().__init__(cfg, http)
        self.delay = delay
        self.errors = list(errors)
        self.calls = 0
        self.cancelled = 0

    def serves(self, model: str) -> bool:
        return model in self.cfg.models

    async def chat(self, req):
        self.calls += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.errors:
            e = self.errors.pop(0)
            raise e
        u = Usage(10, 5, 15)
        return ChatResponse(new_completion("id", req.model, {"role": "assistant", "content": "hi"}, "stop", u),
                            u, self.name, req.model)


def scripted_router(specs: dict, routing: dict | None = None) -> Router:
    cfg = load_config_dict({"providers": [dict(mock(n, priority=i), **spec.pop("cfg", {}))
                                          for i, (n, spec) in enumerate(specs.items())],
                            "routing": routing or {"retries": {"backoff_base_ms": 1, "backoff_max_ms": 2}}})
    provs = {pc.name: Scripted(pc, cfg.http, **specs[pc.name]) for pc in cfg.providers}
    return Router(cfg, provs)


async def run_chat(r: Router, **kw) -> RequestContext:
    ctx = RequestContext("chat")
    ctx.request = req(**kw)
    await r.handle_chat(ctx)
    return ctx


async def test_counters_on_context_and_unreadable_answer_degrades():
    bad_body = GatewayError(502, "unreadable", retryable=True, kind="bad_upstream_body")
    r = scripted_router({"a": {"errors": [GatewayError(503, "busy", retryable=True), bad_body]},
                         "b": {}})
    ctx = await run_chat(r)
    assert ctx.provider == "b"
    assert (ctx.attempts, ctx.retries, ctx.fallbacks) == (3, 1, 1)
    assert ctx.candidates_tried == ["a", "a", "b"]
    assert r.counters == {"attempts": 3, "retries": 1, "fallbacks": 1, "hedges": 0}
    assert r.health.describe("a")["last_error"] == "bad_upstream_body"


async def test_adapter_bug_is_a_loud_500_never_the_providers_failure():
    r = scripted_router({"a": {"errors": [KeyError("x")]}, "b": {}})
    with pytest.raises(GatewayError) as ei:
        await run_chat(r)
    assert ei.value.status == 500 and ei.value.kind == "internal" and not ei.value.retryable
    assert [r.providers[n].calls for n in "ab"] == [1, 0]  # neither retried nor failed over
    d = r.health.describe("a")
    assert d["failures"] == 0 and d["consecutive_failures"] == 0 and d["breaker"] == "closed"


async def test_hedging_is_bounded_by_max_extra_and_cancels_losers():
    r = scripted_router({"a": {"delay": 0.5}, "b": {"delay": 0.4}, "c": {}},
                        {"hedging": {"enabled": True, "min_delay_ms": 50, "min_samples": 1, "max_extra": 1}})
    for n in "abc":
        r.health.get(n).success(0.01, False, NORMAL)
    ctx = await run_chat(r)
    # a started, b hedged after 50 ms, c never (max_extra 1); b answers first
    assert ctx.provider == "b"
    assert [r.providers[n].calls for n in "abc"] == [1, 1, 0]
    await asyncio.sleep(0.05)
    assert r.providers["a"].cancelled == 1
    assert r.counters["hedges"] == 1 and ctx.state["hedged"] == 1


async def test_stream_cost_is_settled_from_the_usage_chunk():
    prices = {"m": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    cfg = load_config_dict({"providers": [mock("a", model_prices=prices)]})
    r = Router(cfg, {pc.name: build_provider(pc, cfg.http) for pc in cfg.providers})
    ctx = RequestContext("chat")
    ctx.request = ChatRequest("m", [{"role": "user", "content": "hello"}], {}, stream=True)
    await r.handle_chat(ctx)
    assert "x-helixagent-cost" not in ctx.response_headers  # headers left before the cost was known
    chunks = [c async for c in ctx.stream]
    u = chunks[-1]["usage"]
    assert ctx.cost == pytest.approx(u["prompt_tokens"] * 1e-6 + u["completion_tokens"] * 2e-6)
    assert r.health.describe("a")["ttfb_ewma_ms"] is not None


def test_rate_limits_give_no_breaker_verdict():
    h, clock = breaker(failure_threshold=2, cooldown=5)
    for _ in range(5):
        h.throttled(NORMAL)
    assert h.state == CLOSED and h.rate_limited == 5 and h.last_error == "rate_limited"
    h.failure(NORMAL)
    assert h.state == CLOSED  # rate limits did not count towards the run of failures
    h.failure(NORMAL)
    assert h.state == OPEN
    clock.t += 5
    assert h.acquire(clock()) == PROBE
    h.throttled(PROBE)  # frees the probe slot, stays half-open
    assert h.state == HALF_OPEN and h.acquire(clock()) == PROBE


# -- Retry-After cooldown across requests ----------------------------------------------------------------
from helixagent.routing.health import Throttle  # noqa: E402


def test_throttle_rules_cap_default_and_streak():
    t = Throttle("p", "m")
    t.hit(100.0, 429, 5.0, 60.0, 1.0, 3)
    assert t.until == 105.0 and t.status == 429
    t.hit(100.0, 429, 600.0, 60.0, 1.0, 3)
    assert t.until == 160.0  # capped
    t.hit(200.0, 503, 2.0, 60.0, 1.0, 3)
    assert t.until == 202.0 and t.status == 503  # the newest Retry-After wins
    t = Throttle("p", "m")
    t.hit(100.0, 429, 0.0, 60.0, 1.0, 3)
    t.hit(100.0, 503, None, 60.0, 1.0, 3)  # an overload without Retry-After: the breaker's business
    assert t.until == 0.0 and t.streak == 0
    t.hit(100.0, 429, None, 60.0, 1.0, 3)
    t.hit(100.0, 429, None, 60.0, 1.0, 3)
    assert t.until == 0.0 and t.streak == 2
    t.hit(100.0, 429, None, 60.0, 1.0, 3)
    assert t.until == 101.0
    off = Throttle("p", "m")
    off.hit(100.0, 429, 30.0, 0.0, 1.0, 1)  # rate_limit_cooldown_max: 0 turns the feature off
    assert off.until == 0.0


def test_order_puts_cooling_candidates_last_soonest_first_and_health_shows_them():
    r = make_router({"providers": [mock("a", priority=1), mock("b", priority=2), mock("c", priority=3)]})
    now = r.clock()
    r.health.throttle("a", "m").hit(now, 429, 10.0, 60.0, 1.0, 3)
    r.health.throttle("b", "m").hit(now, 429, 5.0, 60.0, 1.0, 3)
    assert names(r.order(r.plan("m", None), req())) == ["c", "b", "a"]
    assert r.health.describe("a")["rate_limit_cooldown_s"] == {"m": 10.0}
    assert "rate_limit_cooldown_s" not in r.health.describe("c")
    r.clock.t += 6
    assert names(r.order(r.plan("m", None), req())) == ["b", "c", "a"]
    r.clock.t += 5
    assert names(r.order(r.plan("m", None), req())) == ["a", "b", "c"]
    assert "rate_limit_cooldown_s" not in r.health.describe("a")


def _rl(retry_after=None) -> GatewayError:
    return GatewayError(429, "slow down", retryable=True, retry_after=retry_after, kind="rate_limited")


async def test_success_resets_the_429_streak():
    r = scripted_router({"a": {"errors": [_rl(), _rl(), _rl()], "cfg": {"max_retries": 0}}, "b": {}},
                        {"rate_limit_cooldown_after": 2})
    t = r.health.throttle("a", "m")
    assert (await run_chat(r)).provider == "b" and t.streak == 1
    r.providers["a"].errors = []
    assert (await run_chat(r)).provider == "a" and t.streak == 0
    r.providers["a"].errors = [_rl()]
    assert (await run_chat(r)).provider == "b" and t.streak == 1 and t.until == 0.0


async def test_hedged_mode_skips_cooling_candidates_and_fails_fast_when_all_cool():
    r = scripted_router({"a": {}, "b": {}}, {"hedging": {"enabled": True, "min_delay_ms": 50}})
    now = r.clock()
    r.health.throttle("a", "m").hit(now, 429, 1.0, 60.0, 1.0, 3)
    ctx = await run_chat(r)
    assert ctx.provider == "b" and r.providers["a"].calls == 0
    r.health.throttle("b", "m").hit(now, 503, 2.0, 60.0, 1.0, 3)
    with pytest.raises(GatewayError) as ei:
        await run_chat(r)
    assert ei.value.status == 429 and ei.value.kind == "rate_limit_cooldown"  # a is free first
    assert 0 < ei.value.retry_after <= 1.0
    assert r.providers["a"].calls == 0 and r.providers["b"].calls == 1


async def test_sequential_all_cooling_beyond_max_retry_after_answers_without_calling():
    r = scripted_router({"a": {}, "b": {}}, {"retries": {"max_retry_after_ms": 100}})
    now = r.clock()
    r.health.throttle("a", "m").hit(now, 429, 5.0, 60.0, 1.0, 3)
    r.health.throttle("b", "m").hit(now, 503, 3.0, 60.0, 1.0, 3)
    with pytest.raises(GatewayError) as ei:
        await run_chat(r)
    # the client learns the soonest a provider is free again: b's overload, in <= 3 s
    assert ei.value.status == 503 and ei.value.code == "upstream_overloaded" and 0 < ei.value.retry_after <= 3.0
    assert r.providers["a"].calls == 0 and r.providers["b"].calls == 0


async def test_candidate_that_starts_cooling_mid_request_is_not_waited_for_when_another_is_free():
    r = scripted_router({"a": {}, "b": {}})
    plan = r.plan("m", None)
    cands = r.order(plan, req())
    assert names(cands) == ["a", "b"]
    # another request benches a after this one ordered its candidates
    r.health.throttle("a", "m").hit(r.clock(), 429, 2.0, 60.0, 1.0, 3)
    ctx = RequestContext("chat")
    ctx.request = req()
    c, _ = await asyncio.wait_for(r._sequential(ctx, cands, req(), "chat"), 1.0)
    assert c.name == "b" and r.providers["a"].calls == 0
