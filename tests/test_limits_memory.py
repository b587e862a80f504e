"""Limits with the in-memory backend: algorithms (injected clock), the stage over real HTTP."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import httpx
import pytest

from helixagent.limits import Limit, REQ, TOK, USD, fmt_reset
from helixagent.limits.backends import DAY, GCRA, MONTH, SLIDING, MemoryBackend
from helixagent.tokens import estimate_messages
from support.keys import MASTER, MODEL, admin_create, chat


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


T0 = datetime(2026, 3, 31, 23, 58, 30, tzinfo=timezone.utc).timestamp()  # 90 s before a new day and month


def test_sliding_window_is_exact_inside_a_window_and_has_no_edge_burst():
    clk = Clock(T0 - 20)  # 10 s into a minute
    b = MemoryBackend(clk)
    lim = [Limit(REQ, SLIDING, "k", 10, "key")]
    assert sum(b.reserve(lim, [1]).ok for _ in range(25)) == 10
    r = b.reserve(lim, [1])
    assert not r.ok and r.failed == 0 and r.remaining == [0] and 0 < r.retry_after <= 120
    start_next = (int(T0 - 20) // 60 + 1) * 60
    # 1 s into the next minute the previous minute still weighs 59/60 of 10: nothing more (a fixed window
    # would admit another 10 here)
    clk.t = start_next + 1
    assert sum(b.reserve(lim, [1]).ok for _ in range(10)) == 0
    # 12 s in, it weighs 8: two more
    clk.t = start_next + 12
    assert sum(b.reserve(lim, [1]).ok for _ in range(10)) == 2
    # a minute later only those two still count (weighted 59/60): eight more
    clk.t = start_next + 61
    assert sum(b.reserve(lim, [1]).ok for _ in range(20)) == 8


def test_gcra_burst_then_steady_rate():
    clk = Clock(1000.0)
    b = MemoryBackend(clk)
    lim = [Limit(REQ, GCRA, "ip", 60, "ip", burst=5)]  # 1 per second, bursts of 5
    assert sum(b.reserve(lim, [1]).ok for _ in range(20)) == 5
    r = b.reserve(lim, [1])
    assert not r.ok and r.retry_after == pytest.approx(1.0)
    clk.t += 1.0
    assert b.reserve(lim, [1]).ok and not b.reserve(lim, [1]).ok
    clk.t += 10  # refilled up to the burst, not beyond
    assert sum(b.reserve(lim, [1]).ok for _ in range(20)) == 5


def test_all_or_nothing_and_settle_refunds_into_the_same_window():
    clk = Clock(T0)
    b = MemoryBackend(clk)
    lims = [Limit(REQ, SLIDING, "rpm", 100, "key"), Limit(TOK, DAY, "tpd", 1000, "user"),
            Limit(TOK, MONTH, "tpmo", 5000, "app")]
    r = b.reserve(lims, [1, 600, 600])
    assert r.ok and r.remaining == [99, 400, 4400]
    r2 = b.reserve(lims, [1, 600, 600])
    assert not r2.ok and r2.failed == 1
    assert b.state["rpm"][1] == 1 and b.state["tpmo"][1] == 600  # nothing consumed by the failed request
    b.settle(r.handles, [0, -500, -500])  # the answer used 100 tokens, not 600
    r3 = b.reserve(lims, [1, 600, 600])
    assert r3.ok and r3.remaining == [98, 300, 4300]
    # a new day and a new month (UTC): budgets start again; a late settle of an old window changes nothing
    clk.t = T0 + 120
    r4 = b.reserve(lims, [1, 1000, 1000])
    assert r4.ok and r4.remaining[1:] == [0, 4000]
    b.settle(r3.handles, [0, -600, -600])
    assert b.state["tpd"][1] == 1000


def test_reset_and_retry_after_of_day_and_month_windows():
    clk = Clock(T0)
    b = MemoryBackend(clk)
    lims = [Limit(USD, DAY, "d", 10, "key"), Limit(USD, MONTH, "m", 10, "key")]
    r = b.reserve(lims, [11, 1])
    assert not r.ok and r.failed == 0 and r.retry_after == pytest.approx(90)
    assert r.reset == [pytest.approx(90), pytest.approx(90)]


def test_fmt_reset_matches_openai_style():
    assert fmt_reset(0.02) == "20ms" and fmt_reset(1) == "1s" and fmt_reset(360) == "6m0s"
    assert fmt_reset(3723) == "1h2m3s"


def test_sweep_keeps_memory_bounded():
    clk = Clock(T0)
    b = MemoryBackend(clk)
    for i in range(1000):
        b.reserve([Limit(REQ, GCRA, f"ip{i}", 60, "ip", 1)], [1])
    clk.t += 3600
    b._sweep(clk.t * 1000)
    assert not b.state


# -- over HTTP -------------------------------------------------------------------------------------------
MSGS = [{"role": "user", "content": "hello"}]
PER_REQUEST = estimate_messages(MSGS) + 8  # prompt (the mock provider reports the same count) + max_tokens
USER_DAY = PER_REQUEST * 3 + 12


@pytest.fixture
def limited(make_gateway):
    return make_gateway({
        "auth": {"master_key": MASTER},
        "providers": [{"name": "mock", "type": "mock", "mock_tokens": 50, "models": [MODEL],
                       "model_prices": {MODEL: {"input_per_mtok": 1000, "output_per_mtok": 2000}}}],
        "rate_limits": {"api_key": {"requests_per_minute": 4, "tokens_per_minute": 100000},
                        "user": {"tokens_per_day": USER_DAY},
                        "cost": {"application": {"per_day": 1.0}}},
    })


def test_request_limit_429_shape_and_headers(limited):
    k = admin_create(limited, user_id="u1", application="app", limits={"requests_per_minute": 2})["key"]
    r = chat(limited, k, max_tokens=8)
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "1"
    assert r.headers["x-ratelimit-limit-tokens"] == str(USER_DAY)
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    assert chat(limited, k, max_tokens=8).status_code == 200
    r = chat(limited, k, max_tokens=8)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert "requests per minute for API key" in err["message"]
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # the openai SDK sees a RateLimitError
    import openai
    c = openai.OpenAI(base_url=limited.url + "/v1", api_key=k, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8)
    # the master key is not limited per key
    assert chat(limited, MASTER, max_tokens=8).status_code == 200


def test_token_budget_reserves_then_settles(limited):
    k1 = admin_create(limited, user_id="budget", application="app")["key"]
    k2 = admin_create(limited, user_id="budget", application="app")["key"]  # same user, other key
    codes = [chat(limited, k, max_tokens=8).status_code for k in (k1, k2, k1)]
    assert codes == [200, 200, 200]
    r = chat(limited, k2, max_tokens=8)
    assert r.status_code == 429 and "tokens per day for user 'budget'" in r.json()["error"]["message"]
    err = r.json()["error"]
    # a budget, not a per-minute rate: its own code, still OpenAI's 429 type and headers
    assert err["code"] == "budget_exceeded" and err["type"] == "rate_limit_error"
    assert err["message"].startswith("budget exceeded: ")
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-remaining-tokens"] == "12"
    # a request reserving more than its real usage is refunded: max_tokens 400 > what is left, refused;
    # a smaller one that fits in the remaining half passes
    assert chat(limited, k1, max_tokens=400).status_code == 429
    small = estimate_messages(MSGS) + 1
    assert small <= 12
    r = chat(limited, k1, max_tokens=1)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == small


def test_settle_refunds_overestimates(make_gateway):
    gw = make_gateway({"auth": {"master_key": MASTER},
                       "providers": [{"name": "mock", "type": "mock", "mock_tokens": 4, "models": [MODEL]}],
                       "rate_limits": {"user": {"tokens_per_day": 1000}}})
    k = admin_create(gw, user_id="refund")["key"]
    # each reserves prompt + 500 but spends prompt + 4: far more than two fit in 1000 after refunds
    ok = sum(chat(gw, k, max_tokens=500).status_code == 200 for _ in range(12))
    real = estimate_messages(MSGS) + 4
    assert ok == min(12, 1 + (1000 - (estimate_messages(MSGS) + 500)) // real)
    limiter = gw.app.services["limits"]
    used = next(v[1] for key, v in limiter.backend.state.items() if key.endswith(":user:refund:tpd"))
    assert used == ok * real


def test_concurrent_burst_cannot_overshoot_token_budget(make_gateway):
    budget = PER_REQUEST * 5 + 3
    gw = make_gateway({"auth": {"master_key": MASTER},
                       "providers": [{"name": "mock", "type": "mock", "mock_tokens": 50, "models": [MODEL],
                                      "latency_ms": 20}],
                       "rate_limits": {"application": {"tokens_per_month": budget}}})
    k = admin_create(gw, user_id="x", application="burst")["key"]

    async def burst():
        async with httpx.AsyncClient(timeout=20) as c:
            rs = await asyncio.gather(*(c.post(gw.url + "/v1/chat/completions",
                                               headers={"authorization": f"Bearer {k}"},
                                               json={"model": MODEL, "messages": MSGS, "max_tokens": 8})
                                        for _ in range(30)))
        return [r.status_code for r in rs]
    codes = asyncio.run(burst())
    assert codes.count(200) == 5 and codes.count(429) == 25


def test_cost_budget_in_dollars(make_gateway):
    gw = make_gateway({"auth": {"master_key": MASTER},
                       "providers": [{"name": "mock", "type": "mock", "mock_tokens": 50, "models": [MODEL],
                                      "model_prices": {MODEL: {"input_per_mtok": 1000, "output_per_mtok": 2000}}}],
                       "rate_limits": {"cost": {"api_key": {"per_day": 0.1}}}})
    k = admin_create(gw, user_id="spender")["key"]
    per = (estimate_messages(MSGS) * 1000 + 8 * 2000) / 1e6   # dollars per request
    expected = int(0.1 // per)
    codes = [chat(gw, k, max_tokens=8).status_code for _ in range(expected + 3)]
    assert codes.count(200) == expected and codes[expected:] == [429] * 3
    r = chat(gw, k, max_tokens=8)
    assert "cost budget per day for API key" in r.json()["error"]["message"]
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert gw.app.services["limits"].budget_rejected == 4
    # per-key override raises this key's budget
    k2 = admin_create(gw, user_id="rich", limits={"cost_per_day": 1.0})["key"]
    assert sum(chat(gw, k2, max_tokens=8).status_code == 200 for _ in range(expected + 3)) == expected + 3


def test_ip_limit_with_burst(make_gateway):
    gw = make_gateway({"rate_limits": {"ip": {"requests_per_minute": 6, "burst_size": 3}}})
    codes = [chat(gw, None, max_tokens=4).status_code for _ in range(6)]
    assert codes == [200, 200, 200, 429, 429, 429]
    r = chat(gw, None, max_tokens=4)
    assert 1 <= int(r.headers["retry-after"]) <= 10 and r.headers["x-ratelimit-limit-requests"] == "6"


def test_cache_hit_is_not_charged_upstream_tokens():
    """Unit level (the cache is another module): a HIT settles the token reservation to zero."""
    from helixagent.canonical import ChatRequest, Usage
    from helixagent.config import load_config_dict
    from helixagent.limits import Limiter, LimitsStage
    from helixagent.pipeline import Identity, RequestContext

    cfg = load_config_dict({"rate_limits": {"user": {"tokens_per_day": 10_000}}})
    backend = MemoryBackend()
    stage = LimitsStage(Limiter(cfg, backend))
    ident = Identity(key_id="k1", user_id="cachey", role="user")

    async def one(hit: bool) -> None:
        ctx = RequestContext("chat")
        ctx.identity = ident
        ctx.request = ChatRequest(model="m", messages=MSGS, params={"max_tokens": 100})
        await stage.pre(ctx)
        ctx.usage = Usage(10, 20, 30)
        ctx.cache_status = "HIT" if hit else "MISS"
        await stage.post(ctx)

    asyncio.run(one(True))
    state = next(v for k, v in backend.state.items() if k.endswith("cachey:tpd"))
    assert state[1] == 0
    asyncio.run(one(False))
    state = next(v for k, v in backend.state.items() if k.endswith("cachey:tpd"))
    assert state[1] == 30
