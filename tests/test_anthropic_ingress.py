"""The Anthropic Messages API ingress (/v1/messages) driven by the official `anthropic` SDK, against the fake
OpenAI upstream and the mock provider, validated strictly with the SDK's own types.  The translation's
property tests (round trip, stream events) are tests/test_anthropic_translation.py."""
from __future__ import annotations

import base64
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message

from fakes.openai_upstream import Fault
from support.anthropic_events import EVENT, check_order, fold

MOCK = {"name": "mock", "type": "mock", "models": ["mock-1"], "mock_tokens": 6}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def client(gw: Any, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)


@pytest.fixture
def oa_gw(make_gateway, fake_openai):
    return make_gateway({"providers": [fake_openai.provider()]})


@pytest.fixture
def mock_gw(make_gateway):
    return make_gateway({"providers": [MOCK]})


def raw_events(gw: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """POST a streamed request; parse the SSE framing by hand; validate every event with the SDK type."""
    body = dict(body, stream=True)
    out: list[dict[str, Any]] = []
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", gw.url + "/v1/messages", json=body,
                      headers={"x-api-key": "k", "anthropic-version": "2023-06-01", **(headers or {})}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = orjson.loads(line[6:])
                    assert event == data["type"], (event, data)
                    if event != "error":
                        EVENT.validate_python(data)
                    out.append(data)
                    event = None
                else:
                    assert line == "", line
    return out


# -- fake OpenAI upstream --------------------------------------------------------------------------------

def test_non_stream_text_and_system(oa_gw, fake_openai):
    c = client(oa_gw)
    raw = c.messages.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=50, system="You are terse.",
        messages=[{"role": "user", "content": "hello there"}], extra_body={"temperature": 0.5, "top_p": 0.9},
        stop_sequences=["END"], metadata={"user_id": "u-42"})
    m = Message.model_validate(orjson.loads(raw.http_response.content))
    assert raw.headers["request-id"] and raw.headers["x-helixagent-provider"] == "openai"
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == "echo:hello echo:there"
    assert m.stop_reason == "end_turn" and m.stop_sequence is None and m.model == "gpt-4o-mini"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens == 2
    up = fake_openai.calls[0]["body"]
    assert up["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]
    assert up["max_tokens"] == 50 and up["stop"] == ["END"] and up["temperature"] == 0.5 and up["top_p"] == 0.9
    assert up["user"] == "u-42"
    assert "anthropic-version" not in orjson.dumps(up).decode()


def test_max_tokens_stop_reason(oa_gw):
    m = client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=2,
                                      messages=[{"role": "user", "content": "one two three four"}])
    assert m.stop_reason == "max_tokens" and m.content[0].text == "echo:one echo:two"


def test_stream_sdk_and_raw_events(oa_gw):
    c = client(oa_gw)
    with c.messages.stream(model="gpt-4o-mini", max_tokens=50,
                           messages=[{"role": "user", "content": "a b c"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "echo:a echo:b echo:c"
    Message.model_validate(final.model_dump())
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3 and final.usage.input_tokens > 0
    events = raw_events(oa_gw, {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "a b c"}]})
    check_order(events)
    msg = fold(events)
    Message.model_validate(msg)
    assert msg["content"] == [{"type": "text", "text": "echo:a echo:b echo:c"}]
    assert msg["stop_reason"] == "end_turn" and msg["usage"]["output_tokens"] == 3


def test_create_stream_true(oa_gw):
    c = client(oa_gw)
    seen = []
    for ev in c.messages.create(model="gpt-4o-mini", max_tokens=50, stream=True,
                                messages=[{"role": "user", "content": "x y"}]):
        seen.append(ev.type)
    assert seen[0] == "message_start" and seen[-1] == "message_stop"
    assert seen.count("content_block_delta") == 2


def test_tools_multi_turn(oa_gw, fake_openai):
    c = client(oa_gw)
    first = c.messages.create(model="gpt-4o-mini", max_tokens=100, tools=[WEATHER],
                              tool_choice={"type": "tool", "name": "get_weather"},
                              messages=[{"role": "user", "content": "Paris?"}])
    Message.model_validate(first.model_dump())
    assert first.stop_reason == "tool_use"
    tu = [b for b in first.content if b.type == "tool_use"]
    assert len(tu) == 1 and tu[0].name == "get_weather" and tu[0].input == {"q": "Paris?"}
    up = fake_openai.calls[-1]["body"]
    assert up["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                             "parameters": WEATHER["input_schema"]}}]
    assert up["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    second = c.messages.create(
        model="gpt-4o-mini", max_tokens=100, tools=[WEATHER], tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "Paris?"},
                  {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": tu[0].id, "content": "18C sunny"},
                      {"type": "text", "text": "and so"}]}])
    assert second.stop_reason == "end_turn" and second.content[0].text == "echo:and echo:so"
    msgs = fake_openai.calls[-1]["body"]["messages"]
    assert msgs[1]["role"] == "assistant" and msgs[1]["tool_calls"][0]["id"] == tu[0].id
    assert orjson.loads(msgs[1]["tool_calls"][0]["function"]["arguments"]) == {"q": "Paris?"}
    assert msgs[2] == {"role": "tool", "tool_call_id": tu[0].id, "content": "18C sunny"}
    assert msgs[3] == {"role": "user", "content": "and so"}
    assert fake_openai.calls[-1]["body"]["tool_choice"] == "none"


def test_tool_stream_input_json_delta(oa_gw):
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "tools": [WEATHER], "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": "Weather in Oslo and Rome please"}]}
    events = raw_events(oa_gw, body)
    check_order(events)
    deltas = [e for e in events if e["type"] == "content_block_delta"]
    assert len(deltas) > 2 and all(d["delta"]["type"] == "input_json_delta" for d in deltas)
    msg = fold(events)
    Message.model_validate(msg)
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"][0]["type"] == "tool_use" and msg["content"][0]["input"] == {"q": "Weather in Oslo and Rome please"}
    with client(oa_gw).messages.stream(**body) as s:
        final = s.get_final_message()
    assert final.content[0].input == {"q": "Weather in Oslo and Rome please"} and final.stop_reason == "tool_use"


def test_images_and_system_blocks_cache_control_lowered(oa_gw, fake_openai):
    c = client(oa_gw)
    m = c.messages.create(
        model="gpt-4o-mini", max_tokens=20,
        system=[{"type": "text", "text": "sys one", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "sys two"}],
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "text", "text": "what is it", "cache_control": {"type": "ephemeral"}}]}])
    assert m.content[0].text == "echo:what echo:is echo:it"
    up = fake_openai.calls[-1]["body"]
    assert "cache_control" not in orjson.dumps(up).decode()  # prompt-cache hints mean nothing to OpenAI
    assert up["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "sys one"},
                                                               {"type": "text", "text": "sys two"}]}
    assert up["messages"][1]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "what is it"}]


def test_tool_result_is_error_lowered(oa_gw, fake_openai):
    client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=20, messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": [{"type": "text", "text": "boom"}]}]}])
    tool = fake_openai.calls[-1]["body"]["messages"][2]
    assert tool == {"role": "tool", "tool_call_id": "toolu_1",
                    "content": [{"type": "text", "text": "Error: "}, {"type": "text", "text": "boom"}]}


def test_count_tokens(oa_gw):
    c = client(oa_gw)
    small = c.messages.count_tokens(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    big = c.messages.count_tokens(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi " * 200}],
                                  tools=[WEATHER])
    assert 0 < small.input_tokens < big.input_tokens


# -- errors, in Anthropic's shape, raised as the SDK's own classes ---------------------------------------

def test_missing_max_tokens_and_bad_fields(oa_gw, fake_openai):
    with pytest.raises(anthropic.BadRequestError) as ei:
        client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=anthropic.omit,
                                      messages=[{"role": "user", "content": "x"}])
    assert ei.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                        "message": "max_tokens: Field required"}}
    for bad, needle in [
        ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "at least one user or assistant"),
        ({"max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {
            "type": "base64", "media_type": "image/tiff", "data": "AA"}}]}]}, "media_type"),
        ({"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, "temperature"),
        ({"max_tokens": 5, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]}, "tool_choice"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {
            "type": "url", "url": "https://x/y.pdf"}}]}]}, "a document with a 'url' source"),
        ({"max_tokens": 5, "mcp_servers": [{"type": "url", "url": "https://mcp.example/sse", "name": "x"}],
          "messages": [{"role": "user", "content": "x"}]}, "mcp_servers"),
        ({"max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
          "messages": [{"role": "user", "content": "x"}]}, "the Anthropic tool type 'web_search_20250305'"),
    ]:
        r = httpx.post(oa_gw.url + "/v1/messages", json={"model": "gpt-4o-mini", **bad}, headers={"x-api-key": "k"})
        assert r.status_code == 400, bad
        b = r.json()
        assert b["type"] == "error" and b["error"]["type"] == "invalid_request_error" and needle in b["error"]["message"]
    assert fake_openai.calls == []
    r = httpx.post(oa_gw.url + "/v1/messages", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_anthropic_only_features_for_openai_dropped_or_refused(oa_gw, fake_openai):
    """gpt-4o-mini (no reasoning): thinking and top_k are dropped and named; a prefill is refused (it would
    change the answer's meaning) before any upstream call."""
    c = client(oa_gw)
    raw = c.messages.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000},
        extra_body={"top_k": 5}, messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-helixagent-dropped-params"] == "thinking,top_k"
    assert raw.parse().content[0].text == "echo:x"
    up = fake_openai.calls[-1]["body"]
    assert "thinking" not in up and "top_k" not in up and "reasoning_effort" not in up
    fake_openai.reset()
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        c.messages.create(model="gpt-4o-mini", max_tokens=40, messages=[
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "{"}])
    assert fake_openai.calls == []


def test_unknown_model_404(oa_gw):
    with pytest.raises(anthropic.NotFoundError) as ei:
        client(oa_gw).messages.create(model="claude-nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "not_found_error"


def test_rate_limit_with_retry_after(oa_gw, fake_openai):
    fake_openai.sticky = Fault(status=429, headers={"retry-after": "1"}, message="slow down")
    with pytest.raises(anthropic.RateLimitError) as ei:
        client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.response.headers["retry-after"] == "1"
    assert ei.value.body["error"]["type"] == "rate_limit_error" and "slow down" in ei.value.body["error"]["message"]
    assert fake_openai.api_key not in ei.value.response.text


@pytest.mark.parametrize("status", [503, 529])
def test_overloaded(oa_gw, fake_openai, status):
    fake_openai.sticky = Fault(status=status)
    with pytest.raises(anthropic.InternalServerError) as ei:
        client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["error"]["type"] == "overloaded_error"


def test_auth_master_key(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider()], "auth": {"master_key": "sk-helix-master-0123456789"}})
    with pytest.raises(anthropic.AuthenticationError) as ei:
        client(gw, "wrong").messages.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["error"]["type"] == "authentication_error"
    ok = client(gw, "sk-helix-master-0123456789").messages.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ok.content[0].text == "echo:x"
    bearer = httpx.post(gw.url + "/v1/messages", json={"model": "gpt-4o-mini", "max_tokens": 5, "messages": [
        {"role": "user", "content": "y"}]}, headers={"authorization": "Bearer sk-helix-master-0123456789"})
    assert bearer.status_code == 200 and bearer.json()["content"][0]["text"] == "echo:y"
    with pytest.raises(anthropic.AuthenticationError):
        client(gw, "wrong").messages.count_tokens(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])


def test_405_and_413_in_anthropic_shape(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider()], "server": {"max_body_bytes": 2000}})
    r = httpx.get(gw.url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.APIStatusError) as ei:
        client(gw).messages.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x" * 5000}])
    assert ei.value.status_code == 413 and ei.value.body["error"]["type"] == "request_too_large"


def test_mid_stream_cut_gives_error_event(oa_gw, fake_openai):
    # a cut right after the first bytes may surface before the answer starts (an HTTP 502) or as an error
    # event: either way the SDK raises its own error, never hangs
    fake_openai.push(Fault(cut_after=2))
    with pytest.raises(anthropic.APIStatusError) as ei:
        for _ in client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=50, stream=True,
                                               messages=[{"role": "user", "content": "a b c d e"}]):
            pass
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "api_error"
    # a cut once the stream is under way: message_start was sent, then an error event in Anthropic's shape
    fake_openai.push(Fault(cut_after=3, chunk_delay=0.05))
    got = []
    with pytest.raises(anthropic.APIStatusError) as ei:
        for ev in client(oa_gw).messages.create(model="gpt-4o-mini", max_tokens=50, stream=True,
                                                messages=[{"role": "user", "content": "a b c d e"}]):
            got.append(ev.type)
    assert got[0] == "message_start" and "message_stop" not in got
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "api_error"
    assert "stream broke" in ei.value.body["error"]["message"]
    fake_openai.push(Fault(cut_after=3, chunk_delay=0.05))
    events = raw_events(oa_gw, {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "a b"}]})
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
    assert [e["type"] for e in events].count("message_stop") == 0


# -- mock provider ---------------------------------------------------------------------------------------

def test_mock_provider_stream_matches_non_stream(mock_gw):
    c = client(mock_gw)
    kw = dict(model="mock-1", max_tokens=100, system="s", messages=[{"role": "user", "content": "hello mock"}])
    a = c.messages.create(**kw)
    b = c.messages.create(**kw)
    assert a.content[0].text == b.content[0].text and a.content[0].text.startswith("Mock")
    assert a.stop_reason == "end_turn" and a.usage.output_tokens == 6
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert final.content[0].text == a.content[0].text
    assert final.usage.output_tokens == 6 and final.usage.input_tokens == a.usage.input_tokens
    events = raw_events(mock_gw, kw)
    check_order(events)
    assert fold(events)["content"][0]["text"] == a.content[0].text
    short = c.messages.create(**{**kw, "max_tokens": 2})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_mock_accepts_anthropic_only_features(mock_gw):
    m = client(mock_gw).messages.create(
        model="mock-1", max_tokens=3000, extra_body={"top_k": 3}, thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}])
    assert m.content[0].text.startswith("Mock")


# -- reasoning from an OpenAI-compatible upstream (DeepSeek's reasoning_content) ----------------------------

@pytest.fixture
def ds_gw(make_gateway, fake_openai):
    return make_gateway({"providers": [fake_openai.provider("ds", type="deepseek", models=["deepseek-reasoner"])]})


def test_deepseek_reasoning_becomes_thinking_block(ds_gw, fake_openai):
    """reasoning_content deltas reach an Anthropic client as a thinking block before the text.  DeepSeek signs
    nothing: the block's ``signature`` is "" (the SDK type requires the field, a string) and no
    signature_delta is sent."""
    thought = "Reasoning about 'a b' first."
    body = {"model": "deepseek-reasoner", "max_tokens": 50, "messages": [{"role": "user", "content": "a b"}]}
    events = raw_events(ds_gw, body)
    check_order(events)
    assert not any(e["type"] == "content_block_delta" and e["delta"]["type"] == "signature_delta" for e in events)
    msg = fold(events)
    Message.model_validate(msg)
    assert msg["content"] == [{"type": "thinking", "thinking": thought, "signature": ""},
                              {"type": "text", "text": "echo:a echo:b"}]
    with client(ds_gw).messages.stream(**body) as s:
        final = s.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == msg["content"]
    # non-streamed: the same blocks
    m = client(ds_gw).messages.create(**body)
    assert [b.model_dump(exclude_none=True) for b in m.content] == msg["content"]
    # OpenAI clients get DeepSeek's reasoning_content deltas through unchanged, as valid chunks
    import openai
    from openai.types.chat import ChatCompletionChunk
    oc = openai.OpenAI(base_url=ds_gw.url + "/v1", api_key="k", max_retries=0, timeout=20)
    chunks = list(oc.chat.completions.create(model="deepseek-reasoner", stream=True,
                                             messages=[{"role": "user", "content": "a b"}]))
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
    assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices) == thought
    # the next turn sends the unsigned block back (as Claude Code does): dropped, the conversation goes on
    m2 = client(ds_gw).messages.create(model="deepseek-reasoner", max_tokens=50, messages=[
        {"role": "user", "content": "a b"}, {"role": "assistant", "content": msg["content"]},
        {"role": "user", "content": "c"}])
    assert m2.content[-1].text == "echo:c"
    sent = fake_openai.calls[-1]["body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": "echo:a echo:b"}
