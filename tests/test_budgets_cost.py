"""Dollar budgets priced from the shipped catalogue and from ``model_prices`` (memory and real Redis).

The limiter used to call the catalogue's ``estimate_cost`` with the wrong arguments inside ``try/except
Exception`` and count every catalogue-priced model as free: ``cost_per_day: 0.01`` admitted 300 of 300
gpt-4o requests and its Redis counter stayed 0.
"""
from __future__ import annotations

import logging
import math
import time

import pytest
import redis

from conftest import need_redis
from support.keys import MASTER, admin_create, http, redis_cleanup, unique_prefix

PROMPT = " ".join(f"w{i}" for i in range(200))   # ~200 prompt tokens: a visible cost per request
CATALOGUE_GPT4O = (2.50, 10.00)                   # data/models.yaml, USD per million tokens


def _chat(gw, key: str, model: str = "gpt-4o"):
    return http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                     json={"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 50})


def _spend_until_rejected(gw, key: str, model: str, prices: tuple[float, float], limit: int = 80) -> tuple[int, int]:
    """Send requests one by one until the budget rejects; -> (admitted, micro-dollars really spent)."""
    admitted = spent = 0
    for _ in range(limit):
        r = _chat(gw, key, model)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "budget_exceeded", r.text
            assert "cost budget per day for API key" in r.json()["error"]["message"]
            return admitted, spent
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        spent += math.ceil(u["prompt_tokens"] * prices[0] + u["completion_tokens"] * prices[1])  # micro-$
        admitted += 1
    raise AssertionError(f"{limit} requests admitted: the dollar budget is not enforced")


def _gateway(make_gateway, fake_openai, rate_limits, **provider):
    return make_gateway({"auth": {"master_key": MASTER}, "providers": [fake_openai.provider(max_retries=0, **provider)],
                         "rate_limits": rate_limits})


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    if request.param == "memory":
        yield {}, None
        return
    url = need_redis()
    prefix = unique_prefix()
    yield {"backend": "redis", "redis_url": url, "key_prefix": prefix, "redis_timeout": 3.0}, (url, prefix)
    redis_cleanup(url, prefix)


def _redis_counter(where, key_id: str) -> int:
    url, prefix = where
    r = redis.Redis.from_url(url)
    try:
        day = int(time.time() * 1000 // 86_400_000)
        v = r.get(f"{prefix}:rl:key:{key_id}:usd-d:d{day}")
        return int(v or 0)
    finally:
        r.close()


def test_catalogue_priced_model_stops_when_the_budget_is_spent(make_gateway, fake_openai, backend):
    rl, where = backend
    gw = _gateway(make_gateway, fake_openai, {**rl, "cost": {"api_key": {"per_day": 0.01}}})
    k = admin_create(gw, user_id="spender")
    admitted, spent = _spend_until_rejected(gw, k["key"], "gpt-4o", CATALOGUE_GPT4O)
    # every request costs ~0.0006 $ at the catalogue's gpt-4o price: ~15 fit in 0.01 $
    assert 5 <= admitted < 30 and 0.005 * 1e6 < spent <= 0.01 * 1e6, (admitted, spent)
    if where is not None:
        # settled to the real usage, counted in Redis (each settlement rounds up to a whole micro-dollar)
        assert spent <= _redis_counter(where, k["id"]) <= spent + admitted
    lim = gw.app.services["limits"]
    assert lim.budget_rejected == 1 and lim.backend_errors == 0


def test_model_prices_override_the_catalogue(make_gateway, fake_openai, backend):
    rl, where = backend
    prices = (250.0, 1000.0)  # 100x the catalogue's gpt-4o
    gw = _gateway(make_gateway, fake_openai, {**rl, "cost": {"api_key": {"per_day": 1.0}}},
                  model_prices={"gpt-4o": {"input_per_mtok": prices[0], "output_per_mtok": prices[1]}})
    k = admin_create(gw, user_id="override")
    admitted, spent = _spend_until_rejected(gw, k["key"], "gpt-4o", prices)
    # at the catalogue price 1 $ would buy ~1,600 requests; at the override ~17
    assert 5 <= admitted < 30 and 0.5 * 1e6 < spent <= 1e6, (admitted, spent)
    if where is not None:
        assert spent <= _redis_counter(where, k["id"]) <= spent + admitted


def test_unknown_price_under_a_budget_is_rejected_by_default(make_gateway, fake_openai):
    gw = _gateway(make_gateway, fake_openai, {"cost": {"api_key": {"per_day": 1.0}}},
                  models=["gpt-4o", "my-finetune"])
    k = admin_create(gw, user_id="unpriced")["key"]
    r = _chat(gw, k, "my-finetune")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "model_price_unknown" and err["param"] == "model" and "unknown_price" in err["message"]
    assert fake_openai.calls == []  # never sent upstream
    assert _chat(gw, k, "gpt-4o").status_code == 200  # a priced model under the same budget is served


def test_unknown_price_counted_at_the_default_price(make_gateway, fake_openai):
    prices = (500.0, 1000.0)
    gw = _gateway(make_gateway, fake_openai,
                  {"cost": {"api_key": {"per_day": 1.0}}, "unknown_price": "default",
                   "default_price_per_mtok": {"input": prices[0], "output": prices[1]}},
                  models=["gpt-4o", "my-finetune"])
    k = admin_create(gw, user_id="defaulted")["key"]
    admitted, spent = _spend_until_rejected(gw, k, "my-finetune", prices)
    assert 5 <= admitted < 30 and 0.5 * 1e6 < spent <= 1e6, (admitted, spent)


def test_unknown_price_default_needs_a_price():
    from helixagent.config import ConfigError, load_config_dict
    with pytest.raises(ConfigError, match="default_price_per_mtok"):
        load_config_dict({"rate_limits": {"unknown_price": "default"}}, "<test>")


def test_a_bug_in_pricing_is_a_loud_500_never_free(make_gateway, fake_openai, monkeypatch, caplog):
    """Our own failure (here: the catalogue raising) must not turn into "free": a 500 and a log line."""
    from helixagent.providers import catalogue

    gw = _gateway(make_gateway, fake_openai, {"cost": {"api_key": {"per_day": 0.01}}})
    k = admin_create(gw, user_id="bug")["key"]

    def broken(*a, **kw):
        raise RuntimeError("catalogue bug")

    monkeypatch.setattr(catalogue, "price", broken)
    caplog.set_level(logging.ERROR)
    r = _chat(gw, k, "gpt-4o")
    assert r.status_code == 500, r.text
    assert r.json()["error"]["message"].startswith("internal error")
    assert fake_openai.calls == []
    assert any(rec.levelno >= logging.ERROR for rec in caplog.records)
