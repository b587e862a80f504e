"""Ensemble completions end to end: real gateway, fake upstreams over real HTTP, the openai SDK as client."""
from __future__ import annotations

import openai
import pytest

from ensemble_support import (MSG, Script, client, ensemble, ensemble_raw, gateway_cfg, panel, panel_session,
                              records)

__all__ = ["panel", "panel_session"]  # fixtures

VOTE3 = {"strategy": "majority", "providers": ["a", "b", "c"]}


def test_majority_normalises_whitespace_case_and_reports_the_panel(make_gateway, panel, tmp_path):
    # the dissenter answers first, so the majority is only decided by the last answer: all three count
    panel.scripts.update(a=Script("The capital is  Paris.", delay=0.2), b=Script("the capital is paris. ", delay=0.3),
                         c=Script("London"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    raw = ensemble_raw(gw, VOTE3)
    r = raw.parse()
    assert r.choices[0].message.content == "The capital is  Paris."
    e = r.model_extra["ensemble"]
    assert e["strategy"] == "majority" and e["decision"] == "majority"
    assert e["winner"] == {"provider": "a", "model": "a-model", "index": 0}
    assert e["agreement"] == pytest.approx(2 / 3, abs=1e-5)
    assert [m["provider"] for m in e["members"]] == ["a", "b", "c"]
    assert {m["provider"]: m["votes"] for m in e["members"]} == {"a": 2.0, "b": 2.0, "c": 1.0}
    assert e["left_out"] == [] and e["answered"] == 3 and e["panel_size"] == 3
    # the caller pays for every call: the usage is the panel's
    assert r.usage.prompt_tokens == 30 and r.usage.completion_tokens == 5 + 5 + 1  # the fake: words split on ' '
    h = raw.headers
    assert h["x-helixagent-ensemble-strategy"] == "majority" and h["x-helixagent-ensemble-winner"] == "a"
    assert h["x-helixagent-ensemble-members"] == "3/3" and h["x-helixagent-ensemble-decision"] == "majority"
    assert h["x-helixagent-ensemble-id"] == h["x-helixagent-request-id"]
    # every member got the caller's conversation, once
    assert all(panel.count(n) == 1 and panel.calls[n][0]["messages"] == MSG for n in "abc")
    # one parent record and one per member, linked by the ensemble id; usage counted once (the parent)
    rid = h["x-helixagent-ensemble-id"]
    recs = records(gw, rid)
    assert [x["endpoint"] for x in recs] == ["ensemble", "ensemble_member", "ensemble_member", "ensemble_member"]
    parent, members = recs[0], recs[1:]
    assert parent["request_id"] == rid and parent["total_tokens"] == r.usage.total_tokens
    assert sorted(m["provider"] for m in members) == ["a", "b", "c"]
    assert {m["request_id"] for m in members} == {m["request_id"] for m in e["members"]}
    assert parent["cost"] == pytest.approx(sum(m["cost"] for m in members))
    assert parent["cost"] > 0 and all(m["outcome"] == "completed" for m in members)


def test_majority_json_and_tool_calls_compare_structurally(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script('{"city": "Paris", "n": 1}', delay=0.2),
                         b=Script('```json\n{"n": 1,  "city": "Paris"}\n```', delay=0.3),
                         c=Script('{"city": "paris", "n": 1}'))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    e = ensemble(gw, VOTE3).model_extra["ensemble"]
    assert e["winner"]["provider"] == "a" and e["agreement"] == pytest.approx(2 / 3, abs=1e-5)
    panel.reset()
    panel.scripts.update(a=Script(tool_call={"name": "lookup", "arguments": '{"q": "x", "k": 2}'}),
                         b=Script(tool_call={"name": "lookup", "arguments": '{"k": 2, "q": "x"}'}),
                         c=Script(tool_call={"name": "search", "arguments": '{"q": "x", "k": 2}'}))
    r = ensemble(gw, {**VOTE3, "preferred_providers": ["c"]})
    e = r.model_extra["ensemble"]
    assert e["winner"]["provider"] == "a" and e["decision"] == "majority"
    assert r.choices[0].message.tool_calls[0].function.name == "lookup"


def test_majority_tie_broken_by_preferred_providers_then_health(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("one"), b=Script("two"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    cfg = {"strategy": "majority", "providers": ["a", "b"], "preferred_providers": ["b", "a"]}
    e = ensemble(gw, cfg).model_extra["ensemble"]
    assert e["decision"] == "tie_preferred" and e["winner"]["provider"] == "b"
    # no preference: the healthier member's answer (a's breaker has seen failures)
    h = gw.app.router.health.get("a")
    h.err_ewma = 0.5
    e = ensemble(gw, {"strategy": "majority", "providers": ["a", "b"]}).model_extra["ensemble"]
    assert e["decision"] == "tie_health" and e["winner"]["provider"] == "b"


def test_confidence_weighted_uses_logprobs_where_returned(make_gateway, panel, tmp_path):
    # a and b disagree; a is sure (logprob ~0), b unsure; c returns no logprobs -> its configured weight
    panel.scripts.update(a=Script("Paris", logprob=-0.01), b=Script("Lyon", logprob=-2.0), c=Script("Lyon"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    cfg = {"strategy": "confidence_weighted", "providers": ["a", "b", "c"], "weights": {"c": 0.2}}
    r = ensemble(gw, cfg)
    e = r.model_extra["ensemble"]
    # Lyon: 0.135 + 0.2 = 0.335 < Paris: 0.99
    assert e["winner"]["provider"] == "a" and e["decision"] == "confidence"
    conf = {m["provider"]: m.get("confidence") for m in e["members"]}
    assert conf["a"] == pytest.approx(0.99, abs=0.001) and conf["b"] == pytest.approx(0.1353, abs=0.001)
    assert conf["c"] is None
    assert e["confidence"] == pytest.approx(0.99005 / 3, abs=1e-3)
    # logprobs were asked of each member; the caller did not ask for them, so the answer carries none
    assert all(panel.calls[n][0]["logprobs"] is True for n in "abc")
    assert r.choices[0].logprobs is None


def test_confidence_threshold_with_and_without_fallback(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris", logprob=-0.5), b=Script("Lyon", logprob=-0.1), c=Script("Nice", logprob=-3))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    cfg = {"strategy": "confidence_weighted", "providers": ["a", "b", "c"], "confidence_threshold": 0.8}
    e = ensemble(gw, cfg).model_extra["ensemble"]
    assert e["decision"] == "fallback_to_best" and e["winner"]["provider"] == "b"
    with pytest.raises(openai.UnprocessableEntityError) as ei:
        ensemble(gw, {**cfg, "fallback_to_best": False})
    err = ei.value.body
    assert err["code"] == "ensemble_low_confidence" and err["param"] == "ensemble_config.confidence_threshold"


def test_quality_weighted_prefers_the_heavier_member(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("alpha"), b=Script("beta"), c=Script("gamma"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    cfg = {"strategy": "quality_weighted", "members": [{"provider": "a", "weight": 1}, {"provider": "b", "weight": 5},
                                                      {"provider": "c", "weight": 1}]}
    e = ensemble(gw, cfg).model_extra["ensemble"]
    assert e["winner"]["provider"] == "b" and e["decision"] == "quality"
    scores = {m["provider"]: m["score"] for m in e["members"]}
    assert scores["b"] > scores["a"] and scores["b"] > scores["c"]


def _judge_answer(mode: str):
    def answer(body):
        last = body["messages"][-1]["content"]
        assert "You are the judge of a panel of 3" in last
        if mode == "pick":
            return '{"choice": 2, "reason": "the second is most precise"}'
        return "Paris is the capital of France"
    return answer


def test_judge_synthesis_and_pick(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("Paris, France"), c=Script("Lyon"),
                         j=Script(_judge_answer("synthesis")))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    cfg = {"strategy": "judge", "providers": ["a", "b", "c"], "judge": {"provider": "j"}}
    raw = ensemble_raw(gw, cfg)
    r = raw.parse()
    assert r.choices[0].message.content == "Paris is the capital of France"
    e = r.model_extra["ensemble"]
    assert e["decision"] == "judge_synthesis" and e["winner"]["judge"] is True
    assert e["judge"]["provider"] == "j" and e["judge"]["status"] == "answered"
    judged = panel.calls["j"][0]["messages"][-1]["content"]
    assert "[1]\nParis" in judged and "[2]\nParis, France" in judged and "[3]\nLyon" in judged
    recs = records(gw, raw.headers["x-helixagent-ensemble-id"])
    assert sorted(x["provider"] for x in recs[1:]) == ["a", "b", "c", "j"]
    # pick: the chosen candidate unchanged, with the judge's reason
    panel.scripts["j"] = Script(_judge_answer("pick"))
    r = ensemble(gw, {**cfg, "judge_mode": "pick"})
    assert r.choices[0].message.content == "Paris, France"
    e = r.model_extra["ensemble"]
    assert e["decision"] == "judge_pick" and e["winner"]["provider"] == "b"
    assert e["judge"]["reason"] == "the second is most precise"


def test_judge_failure_falls_back_to_the_vote(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("paris"), c=Script("Lyon"), j=Script(status=500))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    e = ensemble(gw, {"strategy": "judge", "providers": ["a", "b", "c"], "judge": {"provider": "j"}}
                 ).model_extra["ensemble"]
    assert e["decision"] == "judge_failed_vote" and e["winner"]["provider"] == "a"
    assert "decided by majority vote" in e["judge"]["note"]


def test_debate_members_see_each_others_answers(make_gateway, panel, tmp_path):
    def member(name, first, later):
        def answer(body):
            return first if len(body["messages"]) == 1 else later
        return Script(answer)
    panel.scripts.update(a=member("a", "Paris", "Paris"), b=member("b", "Lyon", "Paris"), c=member("c", "Nice", "Nice"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    r = ensemble(gw, {"strategy": "debate", "providers": ["a", "b", "c"], "rounds": 2})
    e = r.model_extra["ensemble"]
    assert e["rounds"] == 2 and e["decision"] == "majority" and r.choices[0].message.content == "Paris"
    assert all(panel.count(n) == 2 for n in "abc")
    second_b = panel.calls["b"][1]["messages"]
    assert second_b[:1] == MSG and second_b[1] == {"role": "assistant", "content": "Lyon"}
    assert "round 2 of 2" in second_b[2]["content"]
    assert "[A]\nParis" in second_b[2]["content"] and "[B]\nNice" in second_b[2]["content"]
    assert "Lyon" not in second_b[2]["content"]
    assert [(m["provider"], m["round"]) for m in e["members"]] == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("c", 2)]


def test_slow_member_cut_by_panel_timeout_with_min_providers_met(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("Paris"), c=Script("Lyon", delay=5))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    cfg = {"strategy": "confidence_weighted", "providers": ["a", "b", "c"], "min_providers": 2,
           "panel_timeout_ms": 600}
    raw = ensemble_raw(gw, cfg)
    e = raw.parse().model_extra["ensemble"]
    assert e["answered"] == 2 and e["winner"]["provider"] == "a"
    assert e["left_out"] == [{"provider": "c", "model": "c-model", "round": 1,
                              "reason": "panel_timeout_ms ran out before it answered"}]
    assert raw.headers["x-helixagent-ensemble-members"] == "2/3"
    recs = records(gw, raw.headers["x-helixagent-ensemble-id"])
    cut = [x for x in recs if x["provider"] == "c"]
    assert len(cut) == 1 and cut[0]["error_type"] == "ensemble_left_out"


def test_majority_decided_early_cancels_the_rest(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("Paris"), c=Script("Lyon", delay=5))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    e = ensemble(gw, {**VOTE3, "min_providers": 2}).model_extra["ensemble"]
    assert e["decision"] == "majority" and e["answered"] == 2
    assert e["left_out"][0]["provider"] == "c" and "decided" in e["left_out"][0]["reason"]


def test_a_failing_member_does_not_fail_the_request(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script(status=503), b=Script("Paris", delay=0.2), c=Script("Paris", delay=0.2))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    e = ensemble(gw, {**VOTE3, "min_providers": 2}).model_extra["ensemble"]
    assert e["winner"]["provider"] == "b" and e["answered"] == 2
    lo = e["left_out"]
    assert len(lo) == 1 and lo[0]["provider"] == "a" and lo[0]["reason"].startswith("failed: 503")
    failed = [m for m in e["members"] if m["provider"] == "a"][0]
    assert failed["status"] == "failed" and failed["error"]["status"] == 503


def test_min_providers_unmet_is_a_clear_error(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script(status=500), b=Script(status=503), c=Script("Paris"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    with pytest.raises(openai.APIStatusError) as ei:
        ensemble(gw, {**VOTE3, "min_providers": 2})
    assert ei.value.status_code == 502
    err = ei.value.body
    assert err["code"] == "ensemble_min_providers"
    # the upstream's 500 is the gateway's 502 upstream_error; c may be cut once 2 answers are out of reach
    assert "members answered, fewer than min_providers (2)" in err["message"]
    assert "a/a-model: failed: 502 upstream_error" in err["message"] and "b/b-model: failed: 503" in err["message"]


@pytest.mark.parametrize("cfg,param", [
    ({"strategy": "vote"}, "ensemble_config.strategy"),
    ({"providers": "a"}, "ensemble_config.providers"),
    ({"providers": ["a", "b"], "min_providers": "2"}, "ensemble_config.min_providers"),
    ({"providers": ["a", "b"], "min_providers": 3}, "ensemble_config.min_providers"),
    ({"providers": ["a", "b"], "confidence_threshold": 2}, "ensemble_config.confidence_threshold"),
    ({"providers": ["a", "b"], "fallback_to_best": "yes"}, "ensemble_config.fallback_to_best"),
    ({"providers": ["a", "b"], "rounds": 1.5}, "ensemble_config.rounds"),
    ({"providers": ["a", "b"], "panel_timeout_ms": True}, "ensemble_config.panel_timeout_ms"),
    ({"providers": ["a", "nope"]}, "ensemble_config.providers[1]"),
    ({"providers": ["a", "b"], "strategy": "judge"}, "ensemble_config.judge"),
    ({"providers": ["a", "b"], "judge": {"provider": "j", "mode": "x"}}, "ensemble_config.judge.mode"),
    ({"providers": ["a", "b"], "bogus": 1}, "ensemble_config.bogus"),
    ({}, "ensemble_config.providers"),
    ("majority", "ensemble_config"),
])
def test_bad_ensemble_config_is_a_400_naming_the_parameter(make_gateway, panel, tmp_path, cfg, param):
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    with pytest.raises(openai.BadRequestError) as ei:
        ensemble(gw, cfg)
    assert ei.value.body["param"] == param, ei.value.body
    assert panel.total() == 0


def test_missing_ensemble_config_and_unknown_named_ensemble(make_gateway, panel, tmp_path):
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    with pytest.raises(openai.BadRequestError) as ei:
        ensemble(gw, None)
    assert ei.value.body["param"] == "ensemble_config"
    with pytest.raises(openai.NotFoundError) as ei2:
        client(gw).chat.completions.create(model="ensemble/nope", messages=MSG)
    assert ei2.value.body["param"] == "model" and ei2.value.body["code"] == "model_not_found"
    # model is optional with an ensemble_config (each member answers with its provider's model)
    import httpx
    r = httpx.post(gw.url + "/v1/ensemble/completions", json={"messages": MSG, "ensemble_config": VOTE3}, timeout=10)
    assert r.status_code == 200 and r.json()["model"] == "ensemble", r.text
    assert {m["model"] for m in r.json()["ensemble"]["members"]} == {"a-model", "b-model", "c-model"}
    # the majority was decided by two answers and the third call cancelled: whether that call reached the
    # panel first is a race (a CI run counted it after the reset), so wait until the count stops moving
    import time
    seen, quiet_since = panel.total(), time.monotonic()
    while time.monotonic() - quiet_since < 0.5:
        time.sleep(0.05)
        if panel.total() != seen:
            seen, quiet_since = panel.total(), time.monotonic()
    panel.reset()
    with pytest.raises(openai.BadRequestError) as ei3:
        ensemble(gw, VOTE3, n=2)
    assert ei3.value.body["param"] == "n"
    assert panel.total() == 0  # refused at the edge: no member was called


def test_named_ensemble_via_chat_completions(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("PARIS"), c=Script("Rome"))
    gw = make_gateway(gateway_cfg(panel, tmp_path, ensembles={"capitals": {
        "strategy": "majority", "providers": ["a", "b", "c"], "min_providers": 2}}))
    raw = client(gw).chat.completions.with_raw_response.create(model="ensemble/capitals", messages=MSG)
    r = raw.parse()
    assert r.model == "ensemble/capitals" and r.choices[0].message.content == "Paris"
    e = r.model_extra["ensemble"]
    assert e["name"] == "capitals" and e["winner"]["provider"] == "a"
    assert raw.headers["x-helixagent-ensemble-winner"] == "a"
    assert raw.headers.get("x-helixagent-cache") in (None, "BYPASS")
    # listed among the models
    assert "ensemble/capitals" in [m.id for m in client(gw).models.list().data]
    assert client(gw).models.retrieve("ensemble/capitals").owned_by == "helixagent"
    # and through /v1/ensemble/completions by name
    r2 = ensemble(gw, None, model="ensemble/capitals")
    assert r2.model_extra["ensemble"]["name"] == "capitals"


def test_debate_closed_by_the_judge(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("Lyon"), c=Script("Nice"),
                         j=Script(lambda body: "Paris, after the debate"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    r = ensemble(gw, {"strategy": "debate", "providers": ["a", "b", "c"], "rounds": 2, "judge": {"provider": "j"}})
    e = r.model_extra["ensemble"]
    assert e["decision"] == "judge_synthesis" and r.choices[0].message.content == "Paris, after the debate"
    assert panel.count("j") == 1 and all(panel.count(n) == 2 for n in "abc")
    assert "You are the judge of a panel of 3" in panel.calls["j"][0]["messages"][-1]["content"]


def test_models_shortcut_and_an_unparsable_pick(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris", delay=0.2), b=Script("paris", delay=0.2), c=Script("Lyon"),
                         j=Script("I cannot decide"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    # models alone: each routed to the provider serving it
    e = ensemble(gw, {"models": ["a-model", "b-model", "c-model"], "strategy": "judge", "judge_mode": "pick",
                      "judge": {"provider": "j"}}).model_extra["ensemble"]
    assert [m["provider"] for m in e["members"]] == ["a", "b", "c"]
    assert e["decision"] == "judge_unparsed_vote" and e["winner"]["provider"] == "a"
    assert "named no candidate" in e["judge"]["note"]
    with pytest.raises(openai.BadRequestError) as ei:
        ensemble(gw, {"models": ["a-model", "unknown-model"]})
    assert ei.value.body["param"] == "ensemble_config.models[1]"
