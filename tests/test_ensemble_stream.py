"""Streamed ensembles: event order validated with the SDKs' types (openai, anthropic), the judge's synthesis
relayed token by token, keep-alive comments while the panel works, errors as the stream's last event."""
from __future__ import annotations

import anthropic
import httpx
import openai
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletionChunk
from pydantic import TypeAdapter

from ensemble_support import MSG, Script, client, ensemble_stream, gateway_cfg, panel, panel_session, records
from helixagent.ensemble import stream as estream

__all__ = ["panel", "panel_session"]

VOTE3 = {"strategy": "majority", "providers": ["a", "b", "c"]}


def _check_order(chunks: list[ChatCompletionChunk]) -> dict:
    for c in chunks:  # every chunk is a valid ChatCompletionChunk (the SDK parsed it; re-validate the dump)
        ChatCompletionChunk.model_validate(c.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    finish = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
    meta = [i for i, c in enumerate(chunks) if (c.model_extra or {}).get("ensemble")]
    assert len(finish) == 1 and len(meta) == 1 and finish[0] < meta[0]
    content = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content]
    assert content and all(0 < i < finish[0] for i in content)
    return chunks[meta[0]].model_extra["ensemble"]


def test_vote_streamed_after_the_decision(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris is it", delay=0.2), b=Script("paris IS it", delay=0.3), c=Script("Lyon"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    chunks = ensemble_stream(gw, VOTE3, stream_options={"include_usage": True})
    e = _check_order(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris is it" and e["winner"]["provider"] == "a" and e["decision"] == "majority"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3 + 3 + 1
    # the parent record's usage is the panel's
    parent = records(gw, chunks[0].id.removeprefix("chatcmpl-"))[0]
    assert parent["streamed"] and parent["total_tokens"] == chunks[-1].usage.total_tokens


def test_judge_synthesis_relayed_token_by_token(make_gateway, panel, tmp_path):
    words = "Paris is the capital of France".split(" ")
    panel.scripts.update(a=Script("Paris"), b=Script("Paris."), c=Script("Lyon"),
                         j=Script(" ".join(words), chunk_delay=0.02))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    chunks = ensemble_stream(gw, {"strategy": "judge", "providers": ["a", "b", "c"], "judge": {"provider": "j"}})
    e = _check_order(chunks)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas == [words[0]] + [" " + w for w in words[1:]]   # the judge's own chunks, one by one
    assert e["decision"] == "judge_synthesis" and e["judge"]["status"] == "answered"
    assert panel.calls["j"][0]["stream"] is True and panel.calls["a"][0].get("stream") in (None, False)


def test_keepalive_comments_while_the_panel_works(make_gateway, panel, tmp_path, monkeypatch):
    monkeypatch.setattr(estream, "KEEPALIVE_SECONDS", 0.1)
    panel.scripts.update(a=Script("Paris", delay=0.6), b=Script("Paris", delay=0.6))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    body = {"model": "x", "messages": MSG, "stream": True, "ensemble_config": {"providers": ["a", "b"]}}
    lines = []
    with httpx.stream("POST", gw.url + "/v1/ensemble/completions", json=body, timeout=20) as r:
        assert r.status_code == 200
        assert r.headers["x-helixagent-ensemble-strategy"] == "majority"
        assert r.headers["x-helixagent-ensemble-id"] == r.headers["x-helixagent-request-id"]
        for line in r.iter_lines():
            if line:
                lines.append(line)
    keep = [i for i, ln in enumerate(lines) if ln.startswith(": keep-alive")]
    content = [i for i, ln in enumerate(lines) if ln.startswith("data: {") and '"content":"Paris"' in ln]
    assert keep and content and max(keep) < content[0], lines
    assert lines[0].startswith("data: ") and '"role":"assistant"' in lines[0]
    assert lines[-1] == "data: [DONE]"


def test_min_providers_unmet_ends_the_stream_with_an_error_event(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script(status=500), b=Script(status=500), c=Script("Paris"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    with pytest.raises(openai.APIError) as ei:
        ensemble_stream(gw, {**VOTE3, "min_providers": 2})
    assert "min_providers" in str(ei.value)


def test_named_ensemble_streamed_through_chat_completions(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Rome"), b=Script("rome"), c=Script("Paris"))
    gw = make_gateway(gateway_cfg(panel, tmp_path, ensembles={"v": VOTE3}))
    chunks = list(client(gw).chat.completions.create(model="ensemble/v", messages=MSG, stream=True))
    e = _check_order(chunks)
    assert e["name"] == "v" and chunks[0].model == "ensemble/v"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Rome"


def test_named_ensemble_through_the_anthropic_sdk(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Rome"), b=Script("rome"), c=Script("Paris"))
    gw = make_gateway(gateway_cfg(panel, tmp_path, ensembles={"v": VOTE3}))
    c = anthropic.Anthropic(base_url=gw.url, api_key="sk-anything", max_retries=0, timeout=20)
    m = c.messages.create(model="ensemble/v", max_tokens=50, messages=MSG)
    assert m.content[0].text == "Rome"
    with c.messages.stream(model="ensemble/v", max_tokens=50, messages=MSG) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Rome"
    Message.model_validate(final.model_dump())
    # every raw event is one of the SDK's stream event types, in the documented order
    body = {"model": "ensemble/v", "max_tokens": 50, "messages": MSG, "stream": True}
    adapter = TypeAdapter(RawMessageStreamEvent)
    types = []
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, timeout=20,
                      headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-anything"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = orjson.loads(line[6:])
                if ev["type"] != "ping":
                    adapter.validate_python(ev)
                types.append(ev["type"])
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_delta" in types and types.index("content_block_start") < types.index("content_block_delta")


def test_named_ensemble_through_the_responses_api(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Rome"), b=Script("rome"), c=Script("Paris"))
    gw = make_gateway(gateway_cfg(panel, tmp_path, ensembles={"v": VOTE3}))
    r = client(gw).responses.create(model="ensemble/v", input="capital of Italy?")
    assert r.output_text == "Rome"
    with client(gw).responses.stream(model="ensemble/v", input="capital of Italy?") as s:
        final = s.get_final_response()
    assert final.output_text == "Rome"


def test_judge_cut_mid_stream_ends_with_an_error_event(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris"), b=Script("Paris"), j=Script("one two three four five", cut_after=3))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    body = {"model": "x", "messages": MSG, "stream": True,
            "ensemble_config": {"strategy": "judge", "providers": ["a", "b"], "judge": {"provider": "j"}}}
    events = []
    with httpx.stream("POST", gw.url + "/v1/ensemble/completions", json=body, timeout=20) as r:
        eid = r.headers["x-helixagent-ensemble-id"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    text = "".join((orjson.loads(e)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                   for e in events[:-1])
    assert text == "one two"  # what the judge wrote before its connection dropped
    last = orjson.loads(events[-1])
    assert "error" in last and last["error"]["code"] is not None, last
    recs = records(gw, eid)
    judge = [x for x in recs if x["provider"] == "j"]
    assert len(judge) == 1 and judge[0]["outcome"] == "error" and judge[0]["streamed"]
    assert recs[0]["outcome"] == "upstream_error"


def test_judge_failing_before_its_first_token_streams_the_vote(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Paris", delay=0.2), b=Script("paris", delay=0.2), c=Script("Lyon"),
                         j=Script(status=503))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    chunks = ensemble_stream(gw, {"strategy": "judge", "providers": ["a", "b", "c"], "judge": {"provider": "j"}})
    e = _check_order(chunks)
    assert e["decision"] == "judge_failed_vote" and e["winner"]["provider"] == "a"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris"


def test_named_ensemble_through_the_gemini_api(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("Rome"), b=Script("rome"), c=Script("Paris"))
    gw = make_gateway(gateway_cfg(panel, tmp_path, ensembles={"v": VOTE3}))
    body = {"contents": [{"role": "user", "parts": [{"text": "capital of Italy?"}]}]}
    r = httpx.post(gw.url + "/v1beta/models/ensemble/v:generateContent", json=body, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["candidates"][0]["content"]["parts"][0]["text"] == "Rome"
    texts = []
    with httpx.stream("POST", gw.url + "/v1beta/models/ensemble/v:streamGenerateContent?alt=sse", json=body,
                      timeout=20) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                for c in orjson.loads(line[6:]).get("candidates") or ():
                    texts += [p.get("text", "") for p in c.get("content", {}).get("parts") or ()]
    assert "".join(texts) == "Rome"
