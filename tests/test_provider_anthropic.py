"""Anthropic provider: the official openai SDK -> gateway -> fake Claude (real HTTP), the official
anthropic SDK against the fake itself, error mapping, unsupported features, stream faults, and
round-trip property tests of the Anthropic <-> canonical mapping."""
from __future__ import annotations

import json
from typing import Any, Iterator

import anthropic
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from fakes.anthropic_upstream import FakeAnthropic, Fault
from helixagent.canonical import ChatRequest, StreamAccumulator
from helixagent.errors import GatewayError
from helixagent.api.anthropic_format import StreamTranslator, canonical_response_to_anthropic
from helixagent.providers.anthropic_mapping import (AnthropicStreamDecoder, anthropic_response_to_canonical,
                                                    canonical_to_anthropic_request)
from support.anthropic_inverse import anthropic_request_to_canonical

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                          "required": ["q"]}}}]


@pytest.fixture(scope="module")
def fake_session() -> Iterator[FakeAnthropic]:
    f = FakeAnthropic()
    yield f
    f.close()


@pytest.fixture
def fake(fake_session: FakeAnthropic) -> Iterator[FakeAnthropic]:
    fake_session.reset()
    yield fake_session
    fake_session.reset()


@pytest.fixture
def gw(make_gateway, fake):
    return make_gateway({"providers": [fake.provider(max_retries=0)],
                         "routing": {"retries": {"max_attempts": 1}}})


def oai(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=20)


# -- the fake is faithful: the official anthropic SDK accepts it ----------------------------------------
def test_anthropic_sdk_accepts_fake(fake):
    c = anthropic.Anthropic(base_url=fake.url, api_key=fake.api_key, max_retries=0)
    msg = c.messages.create(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi you"}])
    assert isinstance(msg, anthropic.types.Message)
    assert msg.content[0].text == "echo:hi echo:you" and msg.stop_reason == "end_turn"
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "weather Oslo"}],
                           tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}]) as s:
        events = list(s)
        final = s.get_final_message()
    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    assert {e.type for e in events} >= {"message_start", "content_block_start", "content_block_delta", "message_stop"}
    for e in events:
        if e.type in ("message_start", "content_block_start", "content_block_delta", "content_block_stop",
                      "message_delta", "message_stop"):
            adapter.validate_python(e.model_dump())
    tool = [b for b in final.content if b.type == "tool_use"][0]
    assert tool.input == {"q": "weather Oslo"} and final.stop_reason == "tool_use"
    fake.push(Fault(status=529))
    with pytest.raises(anthropic.APIStatusError) as ei:
        c.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 529 and ei.value.body["error"]["type"] == "overloaded_error"
    # the fake validates like the API
    with pytest.raises(anthropic.BadRequestError):
        c.messages.create(model="claude-sonnet-4-5", max_tokens=5, extra_body={"temperature": 1.5},
                          messages=[{"role": "user", "content": "x"}])


# -- openai SDK -> gateway -> Claude --------------------------------------------------------------------
def test_chat_non_stream(gw, fake):
    fake.cache_read, fake.cache_creation = 40, 10
    raw = oai(gw).chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5", user="u-1", stop=["zzz"], temperature=0.3,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No lists."},
                  {"role": "user", "content": "hello there"}])
    body = orjson.loads(raw.content)
    resp = ChatCompletion.model_validate(body)
    assert resp.choices[0].message.content == "echo:hello echo:there"
    assert resp.choices[0].finish_reason == "stop"
    up = fake.calls[0]["body"]
    assert up["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No lists."}]
    assert up["messages"] == [{"role": "user", "content": "hello there"}]
    assert up["max_tokens"] == 4096 and up["metadata"] == {"user_id": "u-1"} and up["stop_sequences"] == ["zzz"]
    assert up["temperature"] == 0.3
    h = fake.calls[0]["headers"]
    assert h["x-api-key"] == fake.api_key and h["anthropic-version"] == "2023-06-01"
    # prompt_tokens counts cache reads and writes, as OpenAI does
    in_tokens = 2 + 3
    assert resp.usage.prompt_tokens == in_tokens + 40 + 10
    assert resp.usage.prompt_tokens_details.cached_tokens == 40
    assert resp.usage.completion_tokens == 2


def test_chat_stream_text(gw):
    chunks = list(oai(gw).chat.completions.create(model="claude-sonnet-4-5", stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "a b c"}]))
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "echo:a echo:b echo:c"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_max_tokens_and_stop_sequence(gw, fake):
    r = oai(gw).chat.completions.create(model="claude-sonnet-4-5", max_tokens=2,
                                        messages=[{"role": "user", "content": "one two three"}])
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "echo:one echo:two"
    assert fake.calls[-1]["body"]["max_tokens"] == 2


def test_tools_non_stream(gw, fake):
    r = oai(gw).chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, messages=[{"role": "user", "content": "weather in Paris"}])
    resp = ChatCompletion.model_validate(orjson.loads(r.content))
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"q": "weather in Paris"}
    assert msg.content == "Let me check."
    up = fake.calls[0]["body"]
    assert up["tools"] == [{"name": "get_weather", "description": "Weather for a city",
                            "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert up["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


def test_tools_stream(gw):
    chunks = list(oai(gw).chat.completions.create(model="claude-sonnet-4-5", stream=True, tools=TOOLS,
                                                  tool_choice="required",
                                                  messages=[{"role": "user", "content": "weather in Rome"}]))
    acc = StreamAccumulator()
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
        acc.add(ch.model_dump(exclude_none=True))
    msg = acc.response().body["choices"][0]
    assert msg["finish_reason"] == "tool_calls"
    call = msg["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("toolu_")
    assert json.loads(call["function"]["arguments"]) == {"q": "weather in Rome"}
    # argument deltas arrive in several pieces, all at tool index 0
    pieces = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or ()]
    assert len(pieces) > 2 and all(p.index == 0 for p in pieces)


def test_multi_turn_tool_results_and_images(gw, fake):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"q":"Oslo"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"q":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "warm"},
        {"role": "user", "content": "thanks"},
    ]
    r = oai(gw).chat.completions.create(model="claude-sonnet-4-5", messages=msgs, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == "echo:thanks"
    up = fake.calls[0]["body"]["messages"]
    assert up[0]["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                               "data": "iVBORw0KGgo="}}
    assert up[0]["content"][2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
    assert up[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"q": "Oslo"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"q": "Rome"}}]}
    assert up[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "warm"},
        {"type": "text", "text": "thanks"}]}
    assert fake.calls[0]["body"]["tool_choice"] == {"type": "none"}


# -- errors ----------------------------------------------------------------------------------------------
def test_overloaded_maps_to_503(gw, fake):
    fake.push(Fault(status=529))
    with pytest.raises(openai.InternalServerError) as ei:
        oai(gw).chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 503
    assert "Overloaded" in ei.value.message and fake.api_key not in ei.value.message


def test_rate_limit_keeps_retry_after(gw, fake):
    fake.push(Fault(status=429, headers={"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as ei:
        oai(gw).chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])
    assert ei.value.response.headers["retry-after"] == "7"
    assert "per-minute rate limit" in ei.value.message


def test_upstream_invalid_request_is_400(gw, fake):
    fake.push(Fault(status=400, message="messages.0.content: prompt is too long"))
    with pytest.raises(openai.BadRequestError) as ei:
        oai(gw).chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])
    assert "prompt is too long" in ei.value.message
    assert ei.value.body["type"] == "invalid_request_error"


def test_upstream_auth_failure_is_not_the_clients_fault(make_gateway, fake):
    g = make_gateway({"providers": [fake.provider(api_key="sk-ant-wrong-key-0000000000", max_retries=0)]})
    with pytest.raises(openai.APIStatusError) as ei:
        oai(g).chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 502 and "sk-ant-wrong" not in ei.value.message


@pytest.mark.parametrize("kw,param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"temperature": 1.5}, "temperature"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_features_are_400(gw, fake, kw, param):
    with pytest.raises(openai.BadRequestError) as ei:
        oai(gw).chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}], **kw)
    assert ei.value.body["code"] == "unsupported_feature" and ei.value.body["param"] == param
    assert fake.calls == []  # never reached the upstream


def test_harmless_params_are_accepted(gw, fake):
    oai(gw).chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "x"}], n=1,
                                    seed=7, presence_penalty=0, logprobs=False, store=False,
                                    extra_body={"top_k": 5})
    up = fake.calls[0]["body"]
    assert up["top_k"] == 5 and "seed" not in up and "store" not in up


def test_stream_error_event_midway(gw, fake):
    fake.push(Fault(error_after=5, error_type="overloaded_error", message="Overloaded"))
    got = []
    with pytest.raises(openai.APIError) as ei:
        for ch in oai(gw).chat.completions.create(model="claude-sonnet-4-5", stream=True,
                                                  messages=[{"role": "user", "content": "one two three four"}]):
            got.append(ch)
    assert "Overloaded" in str(ei.value)


def test_stream_cut_midway(gw, fake):
    fake.push(Fault(cut_after=6))
    with pytest.raises(openai.APIError) as ei:  # a status error if it broke before the head went out
        for _ in oai(gw).chat.completions.create(model="claude-sonnet-4-5", stream=True,
                                                 messages=[{"role": "user", "content": "one two three four"}]):
            pass
    assert "stream broke" in str(ei.value) or "without message_stop" in str(ei.value)


def test_stream_error_before_first_chunk_is_a_status(gw, fake):
    fake.push(Fault(error_after=0, error_type="overloaded_error", message="Overloaded"))
    with pytest.raises(openai.APIStatusError) as ei:
        list(oai(gw).chat.completions.create(model="claude-sonnet-4-5", stream=True,
                                             messages=[{"role": "user", "content": "x"}]))
    assert ei.value.status_code == 503


def test_catalogue_models_when_none_configured(make_gateway, fake):
    p = fake.provider(max_retries=0)
    p.pop("models")
    g = make_gateway({"providers": [p]})
    ids = {m.id for m in oai(g).models.list()}
    assert "claude-sonnet-4-5" in ids and "claude-3-5-haiku-latest" in ids
    # a dated snapshot of a catalogue model is served without configuration
    r = oai(g).chat.completions.create(model="claude-3-5-haiku-20241022", messages=[{"role": "user", "content": "q"}])
    assert r.choices[0].message.content == "echo:q"


# -- round-trip property tests -----------------------------------------------------------------------------
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_ident = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
_json_obj = st.dictionaries(_ident, st.one_of(st.integers(-5, 5), _text, st.booleans()), max_size=3)


@st.composite
def canonical_requests(draw) -> ChatRequest:
    """Canonical requests in the normal form the Anthropic mapping preserves exactly: system first,
    alternating user/assistant turns, tool results right after the tool calls."""
    msgs: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 2))):
        msgs.append({"role": "system", "content": draw(_text)})
    n = 0
    after_tool = False
    for _turn in range(draw(st.integers(1, 4))):
        # a user turn right after tool results shares their Anthropic turn, so it comes back as parts
        if not after_tool and draw(st.booleans()):
            msgs.append({"role": "user", "content": draw(_text)})
        else:
            parts: list[dict[str, Any]] = [{"type": "text", "text": draw(_text)}]
            if draw(st.booleans()):
                parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + draw(
                    st.from_regex(r"[A-Za-z0-9+/]{4,12}", fullmatch=True))}})
            msgs.append({"role": "user", "content": parts})
        calls = []
        for _ in range(draw(st.integers(0, 2))):
            n += 1
            calls.append({"id": f"toolu_{n}", "type": "function",
                          "function": {"name": draw(_ident), "arguments": orjson.dumps(draw(_json_obj)).decode()}})
        text = draw(st.one_of(st.none(), _text)) if calls else draw(_text)
        if calls:
            msgs.append({"role": "assistant", "content": text, "tool_calls": calls})
            for c in calls:
                msgs.append({"role": "tool", "tool_call_id": c["id"], "content": draw(_text)})
            after_tool = True
        else:
            msgs.append({"role": "assistant", "content": text})
            after_tool = False
    params: dict[str, Any] = {"max_tokens": draw(st.integers(1, 9000))}
    if draw(st.booleans()):
        params["temperature"] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        params["top_p"] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        params["stop"] = draw(st.lists(_text, min_size=1, max_size=3))
    if draw(st.booleans()):
        params["user"] = draw(_ident)
    if draw(st.booleans()):
        params["tools"] = [{"type": "function", "function": {
            "name": draw(_ident), "description": draw(_text),
            "parameters": {"type": "object", "properties": {draw(_ident): {"type": "string"}}}}}]
        params["tool_choice"] = draw(st.sampled_from(["auto", "none", "required"]))
    return ChatRequest(model="claude-x", messages=msgs, params=params)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(canonical_requests())
def test_roundtrip_canonical_anthropic_canonical(req):
    body = canonical_to_anthropic_request(req)
    json.dumps(body)  # plain JSON
    back = anthropic_request_to_canonical(body)
    # the system messages come back one per message, the rest exactly
    assert back.messages == req.messages
    assert back.params == req.params
    # and translating again gives the same Anthropic body (a fixpoint)
    assert canonical_to_anthropic_request(back) == body


@settings(max_examples=100, deadline=None)
@given(canonical_requests())
def test_roundtrip_anthropic_canonical_anthropic(req):
    body = canonical_to_anthropic_request(req)
    assert canonical_to_anthropic_request(anthropic_request_to_canonical(body)) == body


@st.composite
def anthropic_messages(draw) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if draw(st.booleans()):
        content.append({"type": "text", "text": draw(_text)})
    for i in range(draw(st.integers(0, 2))):
        content.append({"type": "tool_use", "id": f"toolu_{i}", "name": draw(_ident), "input": draw(_json_obj)})
    stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else draw(
        st.sampled_from(["end_turn", "max_tokens", "refusal"]))
    return {"id": "msg_" + draw(_ident), "type": "message", "role": "assistant", "model": "claude-x",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": draw(st.integers(0, 1000)), "output_tokens": draw(st.integers(0, 1000)),
                      "cache_creation_input_tokens": draw(st.integers(0, 100)),
                      "cache_read_input_tokens": draw(st.integers(0, 100))}}


def _events_for(msg: dict[str, Any]) -> list[dict[str, Any]]:
    evs = [{"type": "message_start", "message": dict(msg, content=[], stop_reason=None,
                                                     usage=dict(msg["usage"], output_tokens=1))}]
    for i, b in enumerate(msg["content"]):
        if b["type"] == "text":
            evs.append({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
            t = b["text"]
            for k in range(0, len(t), 3):
                evs.append({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": t[k:k + 3]}})
        else:
            evs.append({"type": "content_block_start", "index": i,
                        "content_block": {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}})
            a = orjson.dumps(b["input"]).decode()
            for k in range(0, len(a), 4):
                evs.append({"type": "content_block_delta", "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": a[k:k + 4]}})
        evs.append({"type": "content_block_stop", "index": i})
        evs.append({"type": "ping"})
    evs.append({"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": msg["usage"]["output_tokens"]}})
    evs.append({"type": "message_stop"})
    return evs


@settings(max_examples=150, deadline=None)
@given(anthropic_messages())
def test_roundtrip_response_and_stream(msg):
    anthropic.types.Message.model_validate(msg)
    body, usage = anthropic_response_to_canonical(msg)
    ChatCompletion.model_validate(body)
    back = canonical_response_to_anthropic(body, usage)
    assert back == msg
    # the stream decodes to the same completion as the whole message
    dec = AnthropicStreamDecoder("claude-x", created=body["created"])
    acc = StreamAccumulator()
    for ev in _events_for(msg):
        for ch in dec.feed(ev):
            ChatCompletionChunk.model_validate(ch)
            acc.add(ch)
    assert dec.done
    assert acc.response().usage == usage and dec.usage() == usage
    streamed = acc.response().body
    assert streamed["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    sm, bm = streamed["choices"][0]["message"], body["choices"][0]["message"]
    assert (sm["content"] or None) == (bm["content"] or None)
    assert sm.get("tool_calls") == bm.get("tool_calls")
    # and canonical chunks encode back into an Anthropic event stream the SDK accepts
    enc = StreamTranslator("claude-x")
    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    dec2 = AnthropicStreamDecoder("claude-x", created=body["created"])
    acc2 = StreamAccumulator()
    dec_chunks = []
    dec = AnthropicStreamDecoder("claude-x", created=body["created"])
    for ev in _events_for(msg):
        dec_chunks.extend(dec.feed(ev))
    sse = b"".join(enc.feed(c) for c in dec_chunks) + enc.end()
    events = [(fr.split(b"\n")[0][7:].decode(), orjson.loads(fr.split(b"\n")[1][6:]))
              for fr in sse.split(b"\n\n") if fr]
    for _name, data in events:
        assert data["type"] == _name
        adapter.validate_python(data)
        for ch in dec2.feed(data):
            acc2.add(ch)
    again = acc2.response().body
    assert again["choices"] == streamed["choices"]
    assert dec2.usage() == usage


def test_unsupported_mapping_errors():
    base = [{"role": "user", "content": "x"}]
    for params in ({"n": 3}, {"logit_bias": {"1": 2}}, {"audio": {"voice": "x"}}, {"temperature": 1.2}):
        with pytest.raises(GatewayError) as ei:
            canonical_to_anthropic_request(ChatRequest("m", base, params))
        assert ei.value.status == 400 and ei.value.code == "unsupported_feature"
    with pytest.raises(GatewayError):
        canonical_to_anthropic_request(ChatRequest("m", [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]))


# -- anthropic SDK -> gateway (/v1/messages) -> Claude and Gemini fakes ------------------------------
def test_anthropic_sdk_through_gateway_to_claude(gw, fake):
    c = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=20)
    msg = c.messages.create(model="claude-sonnet-4-5", max_tokens=64, system="Be brief.",
                            messages=[{"role": "user", "content": "hi there"}])
    anthropic.types.Message.model_validate(msg.model_dump())
    assert msg.content[0].text == "echo:hi echo:there" and msg.stop_reason == "end_turn"
    assert fake.calls[-1]["body"]["system"] == "Be brief."
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=64,
                           tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {
                               "q": {"type": "string"}}}}],
                           messages=[{"role": "user", "content": "weather Oslo"}]) as s:
        final = s.get_final_message()
    tool = [b for b in final.content if b.type == "tool_use"][0]
    assert tool.name == "get_weather" and tool.input == {"q": "weather Oslo"} and final.stop_reason == "tool_use"


def test_anthropic_sdk_through_gateway_to_gemini(make_gateway):
    from fakes.gemini_upstream import FakeGemini
    g = FakeGemini()
    try:
        gw2 = make_gateway({"providers": [g.provider(max_retries=0)]})
        c = anthropic.Anthropic(base_url=gw2.url, api_key="unused", max_retries=0, timeout=20)
        msg = c.messages.create(model="gemini-2.0-flash", max_tokens=64,
                                tools=[{"name": "lookup", "input_schema": {"type": "object", "properties": {
                                    "q": {"type": "string"}}}}],
                                messages=[{"role": "user", "content": "find cats"}])
        tool = [b for b in msg.content if b.type == "tool_use"][0]
        assert tool.input == {"q": "find cats"} and msg.stop_reason == "tool_use"
        with c.messages.stream(model="gemini-2.0-flash", max_tokens=64,
                               messages=[{"role": "user", "content": "a b"}]) as s:
            text = "".join(s.text_stream)
        assert text == "echo:a echo:b"
    finally:
        g.close()


# -- extended thinking in streams, anthropic-beta forwarding ------------------------------------------
EVENT = TypeAdapter(anthropic.types.RawMessageStreamEvent)
THINK = {"type": "enabled", "budget_tokens": 1024}


def _raw_events(gw, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    import httpx
    out: list[dict[str, Any]] = []
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", gw.url + "/v1/messages", json=dict(body, stream=True),
                      headers={"x-api-key": "k", "anthropic-version": "2023-06-01", **(headers or {})}) as r:
            assert r.status_code == 200, r.read()
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = orjson.loads(line[6:])
                    assert data["type"] == event
                    EVENT.validate_python(data)
                    out.append(data)
    return out


def test_thinking_stream_to_anthropic_client(gw, fake):
    """Claude's thinking_delta / signature_delta reach an Anthropic client as a thinking block, in order,
    before the text; the signed block is accepted by Claude when sent back in the next turn."""
    thought = "The user wrote 'hi there'; answer by echoing."
    body = {"model": "claude-sonnet-4-5", "max_tokens": 2048, "thinking": THINK,
            "messages": [{"role": "user", "content": "hi there"}]}
    events = _raw_events(gw, body)
    types = [(e["type"], (e.get("content_block") or e.get("delta") or {}).get("type")) for e in events]
    assert types[:6] == [("message_start", None), ("content_block_start", "thinking"),
                         ("content_block_delta", "thinking_delta"), ("content_block_delta", "thinking_delta"),
                         ("content_block_delta", "thinking_delta"), ("content_block_delta", "thinking_delta")]
    i_sig = types.index(("content_block_delta", "signature_delta"))
    assert types[i_sig + 1] == ("content_block_stop", None) and events[i_sig + 1]["index"] == 0
    assert types[i_sig + 2] == ("content_block_start", "text") and events[i_sig + 2]["index"] == 1
    from fakes.anthropic_upstream import signature
    assert events[i_sig]["delta"]["signature"] == signature(thought)
    assert "".join(e["delta"]["thinking"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "thinking_delta") == thought
    # the SDK's own accumulator builds the same message
    c = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=20)
    with c.messages.stream(**body) as s:
        thinking_text = "".join(e.thinking for e in s if e.type == "thinking")
        final = s.get_final_message()
    anthropic.types.Message.model_validate(final.model_dump())
    assert thinking_text == thought
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == thought and final.content[0].signature == signature(thought)
    assert final.content[1].text == "echo:hi echo:there"
    # multi-turn: the streamed, signed block goes back to Claude unchanged (the fake checks the signature)
    msg2 = c.messages.create(model="claude-sonnet-4-5", max_tokens=2048, thinking=THINK, messages=[
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": "again"}])
    assert msg2.content[-1].text == "echo:again"
    sent = fake.calls[-1]["body"]["messages"][1]["content"][0]
    assert sent == {"type": "thinking", "thinking": thought, "signature": signature(thought)}


def test_thinking_stream_redacted_block(gw, fake):
    events = _raw_events(gw, {"model": "claude-sonnet-4-5", "max_tokens": 2048, "thinking": THINK,
                              "messages": [{"role": "user", "content": "please redact"}]})
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "redacted_thinking", "text"]
    assert starts[1]["data"] == "RWNyeXB0ZWQgcmVhc29uaW5n"


def test_thinking_stream_openai_client_and_record_fold(gw, fake):
    """OpenAI clients see reasoning_content deltas (valid ChatCompletionChunks); the accumulated response
    (what records and the cache keep) has the thinking blocks with their signatures."""
    from fakes.anthropic_upstream import signature
    chunks = list(oai(gw).chat.completions.create(
        model="claude-sonnet-4-5", max_tokens=2048, stream=True, extra_body={"thinking": THINK},
        messages=[{"role": "user", "content": "hi there"}], stream_options={"include_usage": True}))
    acc = StreamAccumulator()
    for ch in chunks:
        d = ch.model_dump(exclude_unset=True)
        ChatCompletionChunk.model_validate(d)
        acc.add(d)
    thought = "The user wrote 'hi there'; answer by echoing."
    assert "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices) == thought
    m = acc.response().body["choices"][0]["message"]
    assert m["reasoning_content"] == thought and m["content"] == "echo:hi echo:there"
    assert m["thinking_blocks"] == [{"type": "thinking", "thinking": thought, "signature": signature(thought)}]
    # the same as the non-streamed answer
    ns = oai(gw).chat.completions.create(model="claude-sonnet-4-5", max_tokens=2048, extra_body={"thinking": THINK},
                                         messages=[{"role": "user", "content": "hi there"}])
    assert ns.choices[0].message.model_dump()["thinking_blocks"] == m["thinking_blocks"]


def test_thinking_stream_cut_midway_is_error_event(gw, fake):
    fake.push(Fault(cut_after=4))  # inside the thinking block
    import httpx
    with httpx.Client(timeout=20) as h:
        r = h.post(gw.url + "/v1/messages", headers={"x-api-key": "k"},
                   json={"model": "claude-sonnet-4-5", "max_tokens": 2048, "thinking": THINK, "stream": True,
                         "messages": [{"role": "user", "content": "hi there"}]})
    frames = [orjson.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert frames[1]["content_block"]["type"] == "thinking"
    assert frames[-1]["type"] == "error" and "message_stop" not in [f["type"] for f in frames]


def test_anthropic_beta_forwarded_to_claude_only(make_gateway, fake, fake_openai):
    g = make_gateway({"providers": [fake.provider(max_retries=0, headers={"anthropic-beta": "configured-1"}),
                                    fake_openai.provider()],
                      "routing": {"retries": {"max_attempts": 1}}})
    c = anthropic.Anthropic(base_url=g.url, api_key="unused", max_retries=0, timeout=20)
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14, configured-1"}
    c.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "a"}],
                      extra_headers=beta)
    assert fake.calls[-1]["headers"]["anthropic-beta"] == "configured-1,interleaved-thinking-2025-05-14"
    with c.messages.stream(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "b"}],
                           extra_headers=beta) as s:
        s.get_final_message()
    assert fake.calls[-1]["headers"]["anthropic-beta"] == "configured-1,interleaved-thinking-2025-05-14"
    # without the client header only the configured one; an OpenAI provider never gets it
    c.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "c"}])
    assert fake.calls[-1]["headers"]["anthropic-beta"] == "configured-1"
    c.messages.create(model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "d"}],
                      extra_headers=beta)
    assert "anthropic-beta" not in {k.lower() for k in fake_openai.calls[-1]["headers"]}
