"""An ensemble's whole panel (judge and debate rounds too) is reserved against the caller's budgets before any
member is called; refused up front with the amount it would need, nothing spent; settled to the real usage
after.  Memory and real Redis limit backends."""
from __future__ import annotations

import math
import time

import openai
import pytest
import redis

from conftest import need_redis
from ensemble_support import MSG, Script, client, ensemble, gateway_cfg, panel, panel_session, records
from support.keys import MASTER, admin_create, redis_cleanup, unique_prefix

from helixagent.ensemble.budget import OVERHEAD
from helixagent.tokens import estimate_messages

__all__ = ["panel", "panel_session"]

PROMPT = estimate_messages(MSG)
MT = 100


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    if request.param == "memory":
        yield {}, None
        return
    url = need_redis()
    prefix = unique_prefix()
    yield {"backend": "redis", "redis_url": url, "key_prefix": prefix, "redis_timeout": 3.0}, (url, prefix)
    redis_cleanup(url, prefix)


def _gw(make_gateway, panel, tmp_path, rl):
    return make_gateway(gateway_cfg(panel, tmp_path, auth={"master_key": MASTER}, rate_limits=rl))


def test_a_budget_that_fits_two_members_but_not_three_is_refused_up_front(make_gateway, panel, tmp_path, backend):
    rl, where = backend
    gw = _gw(make_gateway, panel, tmp_path, rl)
    per_member = PROMPT + MT
    k = admin_create(gw, user_id="ens", limits={"tokens_per_day": per_member * 2 + 10})
    with pytest.raises(openai.RateLimitError) as ei:
        ensemble(gw, {"providers": ["a", "b", "c"]}, key=k["key"], max_tokens=MT)
    err = ei.value.body
    assert err["code"] == "budget_exceeded"
    assert f"reserves about {per_member * 3} tokens" in err["message"], err["message"]
    assert panel.total() == 0  # nothing was called
    refused = records(gw, ei.value.response.headers["x-helixagent-request-id"])
    assert len(refused) == 1 and refused[0]["status"] == 429 and refused[0]["endpoint"] == "ensemble"
    # two members fit, and the reservation settles to the real usage (each fake answer: 10 + 1 tokens)
    r = ensemble(gw, {"providers": ["a", "b"]}, key=k["key"], max_tokens=MT)
    assert r.usage.total_tokens == 22 and panel.total() == 2
    assert r.model_extra["ensemble"]["reserved"]["tokens"] == per_member * 2
    lim = gw.app.services["limits"]
    if where is None:
        used = next(v for key, v in lim.backend.state.items() if key.endswith(f"{k['id']}:tpd"))
        assert used[1] == 22, used
    else:
        url, prefix = where
        day = int(time.time() * 1000 // 86_400_000)
        rc = redis.Redis.from_url(url)
        try:
            assert int(rc.get(f"{prefix}:rl:key:{k['id']}:tpd:d{day}") or 0) == 22
        finally:
            rc.close()


def test_judge_and_debate_rounds_are_in_the_reservation(make_gateway, panel, tmp_path):
    gw = _gw(make_gateway, panel, tmp_path, {})
    n = 3
    judge = PROMPT + n * MT + OVERHEAD + MT
    panel_cost = n * (PROMPT + MT)
    k = admin_create(gw, user_id="judge", limits={"tokens_per_day": panel_cost + judge - 1})
    cfg = {"strategy": "judge", "providers": ["a", "b", "c"], "judge": {"provider": "j"}}
    with pytest.raises(openai.RateLimitError) as ei:
        ensemble(gw, cfg, key=k["key"], max_tokens=MT)
    assert f"reserves about {panel_cost + judge} tokens" in ei.value.body["message"]
    debate = panel_cost + 2 * n * (PROMPT + n * MT + OVERHEAD + MT)
    with pytest.raises(openai.RateLimitError) as ei:
        ensemble(gw, {"strategy": "debate", "providers": ["a", "b", "c"], "rounds": 3}, key=k["key"], max_tokens=MT)
    assert f"reserves about {debate} tokens" in ei.value.body["message"]
    assert panel.total() == 0


def test_dollar_budget_prices_each_member_and_settles_to_real_cost(make_gateway, panel, tmp_path):
    gw = _gw(make_gateway, panel, tmp_path, {"cost": {"api_key": {"per_day": 0.0005}}})
    k = admin_create(gw, user_id="usd")
    # each member: PROMPT * 1e-6 + 100 * 2e-6 ~ 0.000216 $: two fit in 0.0005 $, three do not
    with pytest.raises(openai.RateLimitError) as ei:
        ensemble(gw, {"providers": ["a", "b", "c"]}, key=k["key"], max_tokens=MT)
    need = 3 * (PROMPT * 1e-6 + MT * 2e-6)
    assert f"reserves about ${need:.6f}" in ei.value.body["message"], ei.value.body["message"]
    assert panel.total() == 0
    raw = client(gw, k["key"]).post("/ensemble/completions", cast_to=openai.types.chat.ChatCompletion,
                                    body={"model": "x", "messages": MSG, "max_tokens": MT,
                                          "ensemble_config": {"providers": ["a", "b"]}},
                                    options={"headers": {"X-Stainless-Raw-Response": "true"}})
    r = raw.parse()
    real = 2 * (10 * 1e-6 + 1 * 2e-6)
    assert r.model_extra["ensemble"]["cost"] == pytest.approx(real)
    assert float(raw.headers["x-helixagent-cost"]) == pytest.approx(real)
    lim = gw.app.services["limits"]
    used = next(v for key, v in lim.backend.state.items() if key.endswith(f"{k['id']}:usd-d"))
    assert used[1] == math.ceil(real * 1e6), used
    parent = records(gw, raw.headers["x-helixagent-ensemble-id"])[0]
    assert parent["cost"] == pytest.approx(real) and parent["key_id"] == k["id"]


def test_usage_report_counts_an_ensemble_once(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("x"), b=Script("x"))
    gw = _gw(make_gateway, panel, tmp_path, {})
    k = admin_create(gw, user_id="usage")
    ensemble(gw, {"providers": ["a", "b"]}, key=k["key"])
    from ensemble_support import flush
    flush(gw)
    import httpx
    u = httpx.get(gw.url + "/v1/usage", headers={"authorization": f"Bearer {MASTER}"},
                  params={"user_id": "usage"}, timeout=10).json()
    assert u["total"]["requests"] == 1 and u["total"]["total_tokens"] == 22, u


def _redis_on(port: int, tmp_path):
    import shutil
    import subprocess
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (needed to stop and restart a private Redis)")
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    try:
        from support.servers import wait_until

        def up() -> bool:
            try:
                return bool(r.ping())
            except redis.ConnectionError:
                return False
        assert wait_until(up, 15)
    finally:
        r.close()
    return p


def test_redis_down_and_back_budgets_deny_before_any_member_call(make_gateway, panel, tmp_path):
    from support.servers import free_port
    port = free_port()
    rs = _redis_on(port, tmp_path)
    try:
        gw = _gw(make_gateway, panel, tmp_path, {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
                                                 "redis_timeout": 1.0, "user": {"tokens_per_day": 10 ** 6}})
        k = admin_create(gw, user_id="outage", application="a")["key"]
        cfg = {"providers": ["a", "b"]}
        assert ensemble(gw, cfg, key=k).model_extra["ensemble"]["answered"] == 2
        rs.kill()
        rs.wait(10)
        before = panel.total()
        with pytest.raises(openai.InternalServerError) as ei:  # 503: budgets deny while Redis is away
            ensemble(gw, cfg, key=k)
        assert ei.value.status_code == 503 and ei.value.body["code"] == "rate_limit_backend_unavailable"
        assert panel.total() == before  # nothing was called
        rs = _redis_on(port, tmp_path)
        from support.servers import wait_until

        def served() -> bool:
            try:
                return ensemble(gw, cfg, key=k).model_extra["ensemble"]["answered"] == 2
            except openai.InternalServerError:
                return False
        assert wait_until(served, 15, 0.2)
    finally:
        rs.kill()
        rs.wait(10)


def test_a_client_leaving_mid_panel_is_charged_what_the_members_spent(make_gateway, panel, tmp_path):
    import socket

    import orjson
    import sqlalchemy as sa

    from ensemble_support import flush
    from helixagent.store.db import make_sync_engine
    from helixagent.store.schema import completions as C
    from support.servers import wait_until
    panel.scripts.update(a=Script("x"), b=Script("x", delay=3))
    gw = _gw(make_gateway, panel, tmp_path, {})
    k = admin_create(gw, user_id="leaver", limits={"tokens_per_day": 10 ** 6})
    body = orjson.dumps({"model": "x", "messages": MSG, "max_tokens": MT, "ensemble_config": {"providers": ["a", "b"]}})
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST /v1/ensemble/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"authorization: Bearer " + k["key"].encode() + b"\r\ncontent-length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    lim = gw.app.services["limits"]

    def used() -> int:
        return next((v[1] for key, v in lim.backend.state.items() if key.endswith(f"{k['id']}:tpd")), -1)
    assert wait_until(lambda: panel.count("a") == 1 and panel.count("b") == 1, 5)
    assert wait_until(lambda: used() == 2 * (PROMPT + MT), 5)  # the whole panel reserved

    def a_answered() -> bool:  # a's member record is written when its answer is in (b takes 3 s)
        flush(gw)
        eng = make_sync_engine(gw.cfg.database.url)
        try:
            with eng.connect() as conn:
                return conn.execute(sa.select(C.c.request_id).where(C.c.provider == "a")).first() is not None
        finally:
            eng.dispose()
    assert wait_until(a_answered, 10)
    s.close()
    assert wait_until(lambda: used() == 11, 10), used()  # settled to a's real usage; b was cancelled


def test_the_reported_worst_case_follows_a_reloaded_default_completion(make_gateway, panel, tmp_path):
    """No token budget on the caller (so the limits stage reserves nothing): the ``reserved`` the answer reports
    is the ensemble stage's own estimate -- with the running config's default_completion_tokens after a reload."""
    from helixagent.config import load_config_dict
    cfg = gateway_cfg(panel, tmp_path, rate_limits={"default_completion_tokens": 50})
    gw = make_gateway(cfg)
    assert ensemble(gw, {"providers": ["a", "b"]}).model_extra["ensemble"]["reserved"]["tokens"] == 2 * (PROMPT + 50)
    new = load_config_dict(dict(cfg, database=gw.app.cfg.database.model_dump(),
                                rate_limits={"default_completion_tokens": 70}), "reloaded")
    report = gw.run(gw.app.services["reload"].apply(new), timeout=20)
    assert "rate_limits" in report["changed"], report
    assert ensemble(gw, {"providers": ["a", "b"]}).model_extra["ensemble"]["reserved"]["tokens"] == 2 * (PROMPT + 70)
