"""Routing and resilience over real HTTP: fault-injecting fake upstreams behind a real gateway."""
from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fakes.openai_upstream import Fault, FakeOpenAI
from support.observability import parse_metrics, value
from support.servers import free_port, wait_until

MSG = [{"role": "user", "content": "hello there"}]
FAST_RETRIES = {"max_attempts": 2, "backoff_base_ms": 10, "backoff_max_ms": 50, "max_retry_after_ms": 3000}


@pytest.fixture(scope="module")
def fakes_module() -> Iterator[tuple[FakeOpenAI, FakeOpenAI, FakeOpenAI]]:
    fs = (FakeOpenAI(), FakeOpenAI(), FakeOpenAI())
    yield fs
    for f in fs:
        f.close()


@pytest.fixture
def fakes(fakes_module: tuple[FakeOpenAI, ...]) -> Iterator[tuple[FakeOpenAI, ...]]:
    for f in fakes_module:
        f.reset()
    yield fakes_module
    for f in fakes_module:
        f.reset()


def two(fakes: Any, routing: dict[str, Any] | None = None, a: dict[str, Any] | None = None,
        b: dict[str, Any] | None = None) -> dict[str, Any]:
    fa, fb = fakes[0], fakes[1]
    r = {"retries": dict(FAST_RETRIES)}
    r.update(routing or {})
    return {"providers": [fa.provider("a", priority=1, **(a or {})), fb.provider("b", priority=2, **(b or {}))],
            "routing": r}


def post(gw: Any, body: dict[str, Any], timeout: float = 20.0) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=timeout)


def chat(gw: Any, **extra: Any) -> httpx.Response:
    return post(gw, {"model": "gpt-4o-mini", "messages": MSG, **extra})


def sse_events(resp: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in resp.text.split("\n"):
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


# -- failover ------------------------------------------------------------------------------------------
def test_5xx_retries_then_falls_back(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.sticky = Fault(status=500)
    gw = make_gateway(two(fakes))
    r = chat(gw)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    assert r.headers["x-helixagent-provider"] == "b"
    assert r.headers["x-helixagent-attempts"] == "3"
    assert len(fa.calls) == 2 and len(fb.calls) == 1  # one retry on a, then b


def test_400_is_not_retried_nor_failed_over(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=400, message="bad parameter 'temperature'"))
    gw = make_gateway(two(fakes))
    r = chat(gw)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "upstream_invalid_request"
    assert r.headers["x-helixagent-provider"] == "a"
    assert len(fa.calls) == 1 and len(fb.calls) == 0


def test_retry_after_is_honoured(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=429, headers={"retry-after": "1"}))
    gw = make_gateway({"providers": [fa.provider("a")], "routing": {"retries": FAST_RETRIES}})
    t0 = time.monotonic()
    r = chat(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert len(fa.calls) == 2
    assert fa.calls[1]["t"] - fa.calls[0]["t"] >= 0.95  # waited as told
    assert elapsed < 1.0 + 1.0


def test_retry_after_beyond_limit_falls_back_at_once(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=429, headers={"retry-after": "30"}))
    gw = make_gateway(two(fakes))
    t0 = time.monotonic()
    r = chat(gw)
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 1 and len(fb.calls) == 1
    assert time.monotonic() - t0 < 1.0


def test_429_without_fallback_returns_retry_after(make_gateway, fakes):
    fa = fakes[0]
    fa.sticky = Fault(status=429, headers={"retry-after": "30"})
    gw = make_gateway({"providers": [fa.provider("a")], "routing": {"retries": FAST_RETRIES}})
    r = chat(gw)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "30"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert len(fa.calls) == 1


def test_retry_sleep_never_exceeds_request_budget(make_gateway, fakes):
    fa = fakes[0]
    fa.sticky = Fault(status=503, headers={"retry-after": "2"})
    gw = make_gateway({"providers": [fa.provider("a")],
                       "routing": {"retries": FAST_RETRIES, "request_timeout_ms": 1000}})
    t0 = time.monotonic()
    r = chat(gw)
    assert r.status_code == 503
    assert len(fa.calls) == 1  # a 2 s wait does not fit in a 1 s budget
    assert time.monotonic() - t0 < 1.0 + 1.0


def test_upstream_auth_failure_falls_back_without_retry(make_gateway, fakes):
    fa, fb, _ = fakes
    gw = make_gateway(two(fakes, a={"api_key": "sk-wrong-key-000000"}))
    r = chat(gw)
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 1 and len(fb.calls) == 1


def test_connection_reset_and_refused_fall_back(make_gateway, fakes):
    fa, fb, fc = fakes
    fa.sticky = Fault(reset=True)
    cfg = {"providers": [
        {"name": "dead", "type": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "sk-x-000000",
         "models": ["gpt-4o-mini"], "priority": 0, "max_retries": 0},
        fa.provider("a", priority=1), fb.provider("b", priority=2)], "routing": {"retries": FAST_RETRIES}}
    gw = make_gateway(cfg)
    r = chat(gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "b"
    assert r.headers["x-helixagent-attempts"] == "4"  # dead x1, a x2, b x1
    assert len(fa.calls) == 2 and len(fb.calls) == 1


def test_slow_first_byte_times_out_and_falls_back(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(delay=5))
    gw = make_gateway(two(fakes, a={"timeout_ms": 500, "max_retries": 0}))
    t0 = time.monotonic()
    r = chat(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    assert elapsed < 0.5 + 1.0
    assert wait_until(lambda: fa.calls[0]["disconnected"], 3)  # the gateway hung up on a


def test_slow_body_bounded_by_total_timeout(make_gateway, fakes):
    fa, fb, _ = fakes
    # 8 pieces, 0.25 s apart: every read is quick (< first-byte timeout) but the whole takes 2 s.
    fa.push(Fault(body_delay=0.25))
    gw = make_gateway(two(fakes, a={"timeout_ms": 700, "max_retries": 0}))
    t0 = time.monotonic()
    r = chat(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    assert elapsed < 0.7 + 1.0


def test_hang_without_fallback_is_a_timeout(make_gateway, fakes):
    fa = fakes[0]
    fa.sticky = Fault(hang=True)
    gw = make_gateway({"providers": [fa.provider("a", timeout_ms=400)], "routing": {"retries": FAST_RETRIES}})
    t0 = time.monotonic()
    r = chat(gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert len(fa.calls) == 2
    assert elapsed < 2 * 0.4 + 1.0


def test_request_budget_bounds_all_attempts(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.sticky = Fault(hang=True)
    gw = make_gateway(two(fakes, routing={"request_timeout_ms": 600}, a={"timeout_ms": 10000}))
    t0 = time.monotonic()
    r = chat(gw)
    assert r.status_code == 504
    assert len(fb.calls) == 0
    assert time.monotonic() - t0 < 0.6 + 1.0


def test_embeddings_fail_over(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.sticky = Fault(status=502)
    gw = make_gateway(two(fakes, a={"max_retries": 0}))
    r = httpx.post(gw.url + "/v1/embeddings", json={"model": "gpt-4o-mini", "input": "hi"}, timeout=10)
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 1 and len(fb.calls) == 1


# -- streaming -----------------------------------------------------------------------------------------
def stream(gw: Any) -> httpx.Response:
    return post(gw, {"model": "gpt-4o-mini", "messages": MSG, "stream": True,
                     "stream_options": {"include_usage": True}})


@pytest.mark.parametrize("fault", [Fault(status=503), Fault(cut_after=0), Fault(reset=True)],
                         ids=["503", "cut-before-first-chunk", "reset"])
def test_stream_fails_over_before_first_byte(make_gateway, fakes, fault):
    fa, fb, _ = fakes
    fa.push(fault)
    gw = make_gateway(two(fakes, a={"max_retries": 0}))
    r = stream(gw)
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in ev[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo:hello echo:there"
    assert len(fa.calls) == 1 and len(fb.calls) == 1


def test_stream_slow_first_chunk_fails_over(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(chunk_delay=3))
    gw = make_gateway(two(fakes, a={"timeout_ms": 500, "max_retries": 0}))
    t0 = time.monotonic()
    r = stream(gw)
    assert r.headers["x-helixagent-provider"] == "b"
    assert sse_events(r)[-1] == "[DONE]"
    assert time.monotonic() - t0 < 0.5 + 1.0


def test_stream_cut_mid_stream_ends_with_error_event(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(cut_after=2))
    gw = make_gateway(two(fakes))
    r = stream(gw)
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "a"
    ev = sse_events(r)
    assert "[DONE]" not in ev
    for e in ev[:-1]:
        ChatCompletionChunk.model_validate(e)
    assert len(ev) == 3 and ev[-1]["error"]["type"] == "upstream_error"  # 2 chunks, then the error event
    assert len(fb.calls) == 0  # bytes already reached the client: no failover


def test_stalled_stream_ends_by_timeout(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(stall_after=2))
    gw = make_gateway(two(fakes, a={"timeout_ms": 800}))
    t0 = time.monotonic()
    r = stream(gw)
    elapsed = time.monotonic() - t0
    ev = sse_events(r)
    assert ev[-1]["error"]["code"] == "upstream_timeout"
    assert len(ev) == 3
    assert elapsed < 0.8 + 1.0
    assert wait_until(lambda: fa.calls[0]["disconnected"], 3)
    # the stall counts against a's stream health (mid-stream: not against its non-streamed health)
    h = httpx.get(gw.url + "/health").json()["providers"]["a"]
    assert h["stream"]["cut"] == 1 and h["stream"]["last_error"] == "timeout"
    assert h["failures"] == 0


def test_openai_sdk_sees_error_after_first_byte(make_gateway, fakes):
    fa = fakes[0]
    fa.push(Fault(cut_after=3))
    gw = make_gateway(two(fakes))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    got = []
    with pytest.raises(openai.APIError):
        for ch in c.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True):
            got.append(ch)
    assert len(got) == 3


# -- circuit breaker -----------------------------------------------------------------------------------
def test_breaker_skips_failing_provider_then_probe_restores_it(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.sticky = Fault(status=500)
    cfg = two(fakes, routing={"circuit_breaker": {"failure_threshold": 2, "cooldown": "0.5s", "min_requests": 100}},
              a={"max_retries": 0})
    gw = make_gateway(cfg)
    for _ in range(2):
        r = chat(gw)
        assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 2
    h = httpx.get(gw.url + "/health").json()["providers"]
    assert h["a"]["breaker"] == "open" and h["a"]["availability"] == 0.0
    assert h["b"]["breaker"] == "closed" and h["b"]["availability"] == 1.0
    assert h["a"]["score"] < h["b"]["score"]
    for _ in range(3):  # skipped while open: a sees no calls
        r = chat(gw)
        assert r.headers["x-helixagent-provider"] == "b"
        assert "x-helixagent-attempts" not in r.headers
    assert len(fa.calls) == 2
    fa.sticky = None
    time.sleep(0.6)
    assert httpx.get(gw.url + "/health").json()["providers"]["a"]["breaker"] == "half_open"
    r = chat(gw)  # the probe
    assert r.headers["x-helixagent-provider"] == "a"
    assert len(fa.calls) == 3
    assert httpx.get(gw.url + "/health").json()["providers"]["a"]["breaker"] == "closed"
    assert gw.app.services["health"].availability("a") == 1.0


def test_failed_probe_reopens(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.sticky = Fault(status=503)
    cfg = two(fakes, routing={"circuit_breaker": {"failure_threshold": 1, "cooldown": "0.3s"}}, a={"max_retries": 0})
    gw = make_gateway(cfg)
    chat(gw)
    assert gw.app.services["health"].state("a") == "open"
    time.sleep(0.35)
    r = chat(gw)
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 2
    assert gw.app.services["health"].state("a") == "open"
    r = chat(gw)
    assert len(fa.calls) == 2


def test_all_breakers_open_fails_fast(make_gateway, fakes):
    fa = fakes[0]
    fa.sticky = Fault(status=500)
    gw = make_gateway({"providers": [fa.provider("a", max_retries=0)],
                       "routing": {"circuit_breaker": {"failure_threshold": 1, "cooldown": "30s"}}})
    assert chat(gw).status_code == 502
    r = chat(gw)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "providers_unavailable"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert len(fa.calls) == 1


# -- hedging -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
def test_hedging_takes_the_fast_answer_and_cancels_the_slow(make_gateway, fakes, streaming):
    fa, fb, _ = fakes
    cfg = two(fakes, routing={"hedging": {"enabled": True, "min_delay_ms": 100, "min_samples": 3}})
    gw = make_gateway(cfg)
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": streaming}
    for _ in range(3):  # learn a's latency
        assert post(gw, body).headers["x-helixagent-provider"] == "a"
    assert len(fb.calls) == 0  # fast answers are never hedged
    fa.push(Fault(delay=2.5))
    t0 = time.monotonic()
    r = post(gw, body)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 4 and len(fb.calls) == 1
    assert elapsed < 2.5 - 1
    if streaming:
        assert sse_events(r)[-1] == "[DONE]"
    else:
        ChatCompletion.model_validate(r.json())
    router = gw.app.services["router"]
    assert router.counters["hedges"] == 1
    # the loser was cancelled: even once a's slow answer has come (2.5 s), it is never counted
    assert wait_until(lambda: fa.calls[3]["t"] + 2.8 < time.time(), 5)
    h = gw.app.services["health"].describe("a")
    assert h["successes"] == 3 and h["failures"] == 0
    assert gw.app.services["health"].describe("b")["successes"] == 1


def test_hedge_loser_connection_is_closed(make_gateway, fakes):
    fa, fb, _ = fakes
    gw = make_gateway(two(fakes, routing={"hedging": {"enabled": True, "min_delay_ms": 100, "min_samples": 1}}))
    chat(gw)
    fa.push(Fault(delay=3))
    assert chat(gw).headers["x-helixagent-provider"] == "b"
    assert wait_until(lambda: fa.calls[1]["disconnected"], 2)


def test_hedging_without_latency_history_does_not_hedge(make_gateway, fakes):
    fa, fb, _ = fakes
    gw = make_gateway(two(fakes, routing={"hedging": {"enabled": True, "min_delay_ms": 50, "min_samples": 5}}))
    fa.push(Fault(delay=0.5))
    r = chat(gw)
    assert r.headers["x-helixagent-provider"] == "a"
    assert len(fb.calls) == 0


def test_hedged_failure_moves_to_next_candidate(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.sticky = Fault(status=500)
    gw = make_gateway(two(fakes, routing={"hedging": {"enabled": True}}))
    r = chat(gw)
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 1 and len(fb.calls) == 1


def test_per_route_hedging_and_strategy(make_gateway, fakes):
    fa, fb, _ = fakes
    cfg = two(fakes, routing={"routes": [{"models": ["gpt-4o*"], "strategy": "cost",
                                          "hedging": {"enabled": False}}]},
              a={"model_prices": {"gpt-4o-mini": {"input_per_mtok": 5, "output_per_mtok": 15}}},
              b={"model_prices": {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}})
    gw = make_gateway(cfg)
    r = chat(gw)
    assert r.headers["x-helixagent-provider"] == "b"  # cheapest first


# -- cost ----------------------------------------------------------------------------------------------
PRICES_A = {"gpt-4o-mini": {"input_per_mtok": 10.0, "output_per_mtok": 30.0}}
PRICES_B = {"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}


def test_cost_header_from_real_usage(make_gateway, fakes):
    fa = fakes[0]
    gw = make_gateway({"providers": [fa.provider("a", model_prices=PRICES_A)]})
    r = chat(gw)
    u = r.json()["usage"]
    expected = u["prompt_tokens"] * 10e-6 + u["completion_tokens"] * 30e-6
    assert float(r.headers["x-helixagent-cost"]) == pytest.approx(expected, rel=1e-6)


def test_cost_header_from_the_catalogue(make_gateway, fakes):
    from helixagent.providers import catalogue
    fa = fakes[0]
    gw = make_gateway({"providers": [fa.provider("a")]})
    r = chat(gw)
    u = r.json()["usage"]
    expected = catalogue.estimate_cost(gw.cfg.providers[0], "gpt-4o-mini", u["prompt_tokens"], u["completion_tokens"])
    assert expected and float(r.headers["x-helixagent-cost"]) == pytest.approx(expected, rel=1e-6)


def test_unknown_price_gives_no_cost_header_and_is_not_skipped(make_gateway, fakes):
    fa = fakes[0]
    gw = make_gateway({"providers": [fa.provider("a", models=["house-model-1"])],
                       "routing": {"max_cost_per_token": 1e-9, "max_cost_per_request": 1e-9}})
    r = post(gw, {"model": "house-model-1", "messages": MSG})
    assert r.status_code == 200
    assert "x-helixagent-cost" not in r.headers


def test_max_cost_per_token_skips_expensive_provider(make_gateway, fakes):
    fa, fb, _ = fakes
    gw = make_gateway(two(fakes, a={"model_prices": PRICES_A, "max_cost_per_token": 1e-5},
                          b={"model_prices": PRICES_B}))
    r = chat(gw)
    assert r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 0


def test_max_cost_per_request_uses_prompt_and_max_tokens(make_gateway, fakes):
    fa, fb, _ = fakes
    # a: 30 $/Mtok output.  max_tokens 100 -> ~0.003 $ < 0.01; max_tokens 1000 -> ~0.03 $ > 0.01.
    gw = make_gateway(two(fakes, routing={"max_cost_per_request": 0.01},
                          a={"model_prices": PRICES_A}, b={"model_prices": PRICES_B}))
    assert chat(gw, max_tokens=100).headers["x-helixagent-provider"] == "a"
    assert chat(gw, max_tokens=1000).headers["x-helixagent-provider"] == "b"


def test_every_provider_over_cost_limit_is_a_clear_error(make_gateway, fakes):
    fa, fb, _ = fakes
    gw = make_gateway(two(fakes, routing={"max_cost_per_request": 0.0001},
                          a={"model_prices": PRICES_A}, b={"model_prices": PRICES_A}))
    r = chat(gw, max_tokens=1000)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "cost_limit_exceeded"
    assert "a/gpt-4o-mini" in r.json()["error"]["message"]
    assert len(fa.calls) == 0 and len(fb.calls) == 0


def test_alias_routes_to_per_provider_models(make_gateway, fakes):
    fa, fb, _ = fakes
    cfg = two(fakes, a={"max_retries": 0})
    cfg["routing"]["aliases"] = {"helix-fast": [{"provider": "a", "model": "gpt-4o"},
                                                {"provider": "b", "model": "gpt-4o-mini"}]}
    fa.sticky = Fault(status=500)
    gw = make_gateway(cfg)
    r = post(gw, {"model": "helix-fast", "messages": MSG})
    assert r.headers["x-helixagent-provider"] == "b"
    assert r.headers["x-helixagent-model"] == "gpt-4o-mini"
    assert fa.calls[0]["body"]["model"] == "gpt-4o" and fb.calls[0]["body"]["model"] == "gpt-4o-mini"


# -- Retry-After cooldown across requests ------------------------------------------------------------
def cooling(gw: Any, name: str) -> dict[str, float]:
    return httpx.get(gw.url + "/health").json()["providers"][name].get("rate_limit_cooldown_s", {})


def cooldown_metric(gw: Any, provider: str, model: str) -> float:
    m = parse_metrics(httpx.get(gw.url + "/metrics").text)
    return value(m, "helixagent_provider_rate_limit_cooldown_seconds", provider=provider, model=model)


def test_429_retry_after_benches_provider_model_across_requests(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=429, headers={"retry-after": "2"}))
    gw = make_gateway(two(fakes, a={"max_retries": 0}))
    r = chat(gw)
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 1 and len(fb.calls) == 1
    # the next requests (plain and streamed) go straight to b: a is not called while it cools down
    r = chat(gw)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    assert r.headers["x-helixagent-provider"] == "b" and "x-helixagent-attempts" not in r.headers
    r = chat(gw, stream=True)
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "b"
    ChatCompletionChunk.model_validate(sse_events(r)[0])
    assert len(fa.calls) == 1 and len(fb.calls) == 3
    left = cooling(gw, "a")
    assert set(left) == {"gpt-4o-mini"} and 0 < left["gpt-4o-mini"] <= 2
    assert 0 < cooldown_metric(gw, "a", "gpt-4o-mini") <= 2
    assert cooldown_metric(gw, "a", "gpt-4o") == 0
    # the cooldown is per (provider, model): a still serves gpt-4o
    r = post(gw, {"model": "gpt-4o", "messages": MSG})
    assert r.headers["x-helixagent-provider"] == "a" and len(fa.calls) == 2
    # once the Retry-After has passed, a is first again
    assert wait_until(lambda: not cooling(gw, "a"), timeout=5)
    assert cooldown_metric(gw, "a", "gpt-4o-mini") == 0
    r = chat(gw)
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "a"
    assert len(fa.calls) == 3 and len(fb.calls) == 3
    assert fa.calls[2]["t"] - fa.calls[0]["t"] >= 1.95


def test_single_candidate_in_cooldown_fails_fast_with_remaining_retry_after(make_gateway, fakes):
    fa = fakes[0]
    fa.push(Fault(status=429, headers={"retry-after": "30"}))
    gw = make_gateway({"providers": [fa.provider("a")],
                       "routing": {"retries": FAST_RETRIES, "rate_limit_cooldown_max": "10s"}})
    r = chat(gw)
    assert r.status_code == 429 and r.headers["retry-after"] == "30"  # the upstream's own answer
    r = chat(gw)  # 10 s (the cap) > max_retry_after_ms: answered at once, upstream not called
    assert r.status_code == 429, r.text
    assert 9 <= int(r.headers["retry-after"]) <= 10
    assert 9 < cooldown_metric(gw, "a", "gpt-4o-mini") <= 10
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "upstream_rate_limited"
    assert "'a'" in err["message"] and "gpt-4o-mini" in err["message"]
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=MSG)  # type: ignore[arg-type]
    assert len(fa.calls) == 1


def test_single_candidate_short_cooldown_is_waited_for(make_gateway, fakes):
    fa = fakes[0]
    fa.push(Fault(status=429, headers={"retry-after": "1"}))
    gw = make_gateway({"providers": [fa.provider("a", max_retries=0)], "routing": {"retries": FAST_RETRIES}})
    r = chat(gw)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    r = chat(gw)  # 1 s <= max_retry_after_ms (3 s) and fits the budget: the gateway waits, then calls a
    assert r.status_code == 200, r.text
    assert len(fa.calls) == 2
    assert fa.calls[1]["t"] - fa.calls[0]["t"] >= 0.95


def test_overloaded_503_with_retry_after_benches_too(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=503, headers={"retry-after": "20"}))
    gw = make_gateway(two(fakes, a={"max_retries": 0}))
    assert chat(gw).headers["x-helixagent-provider"] == "b"
    assert chat(gw).headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 1 and len(fb.calls) == 2


def test_429_without_retry_after_benches_only_after_consecutive_hits(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=429), Fault(status=429))
    gw = make_gateway(two(fakes, routing={"rate_limit_cooldown_after": 2, "rate_limit_cooldown_default": "20s"},
                          a={"max_retries": 0}))
    assert chat(gw).headers["x-helixagent-provider"] == "b"
    assert not cooling(gw, "a")  # one 429 without Retry-After does not bench a
    assert chat(gw).headers["x-helixagent-provider"] == "b"  # a was tried again: second 429 in a row
    assert len(fa.calls) == 2 and set(cooling(gw, "a")) == {"gpt-4o-mini"}
    assert chat(gw).headers["x-helixagent-provider"] == "b"
    assert len(fa.calls) == 2 and len(fb.calls) == 3  # benched now


def test_429_without_retry_after_single_hit_is_not_remembered(make_gateway, fakes):
    fa, fb, _ = fakes
    fa.push(Fault(status=429))
    gw = make_gateway(two(fakes, a={"max_retries": 0}))
    assert chat(gw).headers["x-helixagent-provider"] == "b"
    r = chat(gw)
    assert r.headers["x-helixagent-provider"] == "a" and len(fa.calls) == 2 and len(fb.calls) == 1
