"""Gemini provider: the official openai SDK -> gateway -> fake Gemini (real HTTP), streaming and not,
tools, safety blocks, embeddings, error mapping, stream faults, and round-trip property tests."""
from __future__ import annotations

import base64
import json
import struct
from typing import Any, Iterator

import openai
import orjson
import pytest
from hypothesis import given, settings, strategies as st
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fakes.anthropic_upstream import Fault
from fakes.gemini_upstream import FakeGemini
from helixagent.canonical import ChatRequest, StreamAccumulator
from helixagent.errors import GatewayError
from helixagent.providers.gemini_mapping import (GeminiStreamDecoder, canonical_to_gemini_request,
                                         gemini_request_to_canonical, gemini_response_to_canonical, sanitize_schema)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "properties": {"q": {"type": ["string", "null"]}},
                                                          "required": ["q"]}}}]


@pytest.fixture(scope="module")
def fake_session() -> Iterator[FakeGemini]:
    f = FakeGemini()
    yield f
    f.close()


@pytest.fixture
def fake(fake_session: FakeGemini) -> Iterator[FakeGemini]:
    fake_session.reset()
    yield fake_session
    fake_session.reset()


@pytest.fixture
def gw(make_gateway, fake):
    return make_gateway({"providers": [fake.provider(max_retries=0)], "routing": {"retries": {"max_attempts": 1}}})


def oai(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=20)


def test_chat_non_stream(gw, fake):
    fake.thoughts = 7
    raw = oai(gw).chat.completions.with_raw_response.create(
        model="gemini-2.0-flash", temperature=1.5, top_p=0.9, max_tokens=50, stop="zz", seed=3, user="u1",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}])
    resp = ChatCompletion.model_validate(orjson.loads(raw.content))
    assert resp.choices[0].message.content == "echo:hello echo:there"
    assert resp.choices[0].finish_reason == "stop"
    call = fake.calls[0]
    assert call["path"] == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert call["headers"]["x-goog-api-key"] == fake.api_key
    up = call["body"]
    assert up["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert up["contents"] == [{"role": "user", "parts": [{"text": "hello there"}]}]
    assert up["generationConfig"] == {"maxOutputTokens": 50, "temperature": 1.5, "topP": 0.9,
                                      "stopSequences": ["zz"], "seed": 3}
    # thinking tokens count as completion tokens, as OpenAI counts reasoning
    assert resp.usage.completion_tokens == 2 + 7
    assert resp.usage.completion_tokens_details.reasoning_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream(gw, fake):
    chunks = list(oai(gw).chat.completions.create(model="gemini-2.0-flash", stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "a b c"}]))
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "echo:a echo:b echo:c"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == 3
    assert fake.calls[0]["path"].endswith(":streamGenerateContent") and fake.calls[0]["query"] == {"alt": "sse"}


def test_tools_non_stream_and_multi_turn(gw, fake):
    fake.signature = "c2lnbmF0dXJl"
    r = oai(gw).chat.completions.create(model="gemini-2.5-flash", tools=TOOLS, tool_choice="required",
                                        messages=[{"role": "user", "content": "weather Oslo"}])
    ChatCompletion.model_validate(r.model_dump())
    tc = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and tc.function.name == "get_weather"
    assert json.loads(tc.function.arguments) == {"q": "weather Oslo"}
    up = fake.calls[0]["body"]
    assert up["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    # JSON Schema became Gemini's Schema: no additionalProperties, nullable instead of a type list
    assert up["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "nullable": True}},
                       "required": ["q"]}}]}]
    # second turn: the tool result goes back as a functionResponse with the function's name, and the
    # thought signature travels back with the call
    r2 = oai(gw).chat.completions.create(model="gemini-2.5-flash", tools=TOOLS, tool_choice="none", messages=[
        {"role": "user", "content": "weather Oslo"},
        {"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
        {"role": "tool", "tool_call_id": tc.id, "content": "sunny"}])
    assert r2.choices[0].message.content == "echo:sunny"
    contents = fake.calls[1]["body"]["contents"]
    assert contents[1]["role"] == "model"
    assert contents[1]["parts"][0]["thoughtSignature"] == "c2lnbmF0dXJl"
    assert contents[1]["parts"][0]["functionCall"]["name"] == "get_weather"
    fr = contents[2]["parts"][0]["functionResponse"]
    assert fr["name"] == "get_weather" and fr["response"] == {"content": "sunny"}


def test_tools_stream(gw):
    chunks = list(oai(gw).chat.completions.create(
        model="gemini-2.0-flash", stream=True, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "weather Rome"}]))
    acc = StreamAccumulator()
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch.model_dump())
        acc.add(ch.model_dump(exclude_none=True))
    ch0 = acc.response().body["choices"][0]
    assert ch0["finish_reason"] == "tool_calls"
    assert json.loads(ch0["message"]["tool_calls"][0]["function"]["arguments"]) == {"q": "weather Rome"}


def test_images_inline_and_url(gw, fake):
    r = oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]}])
    assert r.choices[0].message.content == "echo:see"
    assert fake.calls[0]["body"]["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}}
    with pytest.raises(openai.BadRequestError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert ei.value.body["code"] == "unsupported_feature"


def test_json_mode(gw, fake):
    oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {
                                        "type": "object", "properties": {"a": {"type": "integer"}},
                                        "additionalProperties": False}}})
    gc = fake.calls[0]["body"]["generationConfig"]
    assert gc["responseMimeType"] == "application/json"
    assert gc["responseSchema"] == {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_n_candidates(gw):
    r = oai(gw).chat.completions.create(model="gemini-2.0-flash", n=2, messages=[{"role": "user", "content": "hi"}])
    assert [c.index for c in r.choices] == [0, 1]


def test_safety(gw):
    with pytest.raises(openai.BadRequestError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "BLOCKME now"}])
    assert ei.value.body["code"] == "content_filter" and "SAFETY" in ei.value.message
    r = oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "UNSAFE x"}])
    assert r.choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.BadRequestError):
        list(oai(gw).chat.completions.create(model="gemini-2.0-flash", stream=True,
                                             messages=[{"role": "user", "content": "BLOCKME"}]))


@pytest.mark.parametrize("kw,param", [({"logprobs": True}, "logprobs"), ({"top_logprobs": 2, "logprobs": True}, "logprobs"),
                                      ({"logit_bias": {"5": 1}}, "logit_bias"), ({"stop": list("abcdef")}, "stop")])
def test_unsupported_is_400(gw, fake, kw, param):
    with pytest.raises(openai.BadRequestError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}], **kw)
    assert ei.value.body["code"] == "unsupported_feature" and ei.value.body["param"] == param
    assert fake.calls == []


def test_errors(gw, fake):
    fake.push(Fault(status=400, message="* GenerateContentRequest.contents: bad"))
    with pytest.raises(openai.BadRequestError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["type"] == "invalid_request_error" and "contents: bad" in ei.value.message
    fake.push(Fault(status=503))
    with pytest.raises(openai.InternalServerError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 503
    # last: the RetryInfo delay also benches gemini-2.0-flash for later requests (routing cooldown)
    fake.push(Fault(status=429))
    with pytest.raises(openai.RateLimitError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}])
    assert "Resource has been exhausted" in ei.value.message
    assert ei.value.response.headers["retry-after"] == "7"  # from Google's RetryInfo detail
    calls = len(fake.calls)
    with pytest.raises(openai.RateLimitError) as ei:
        oai(gw).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}])
    assert 6 <= int(ei.value.response.headers["retry-after"]) <= 7 and len(fake.calls) == calls


def test_bad_key_is_gateway_side(make_gateway, fake):
    g = make_gateway({"providers": [fake.provider(api_key="AIzaWRONGWRONGWRONGWRONGWRONG", max_retries=0)]})
    with pytest.raises(openai.APIStatusError) as ei:
        oai(g).chat.completions.create(model="gemini-2.0-flash", messages=[{"role": "user", "content": "x"}])
    assert ei.value.status_code == 502 and "AIzaWRONG" not in ei.value.message


def test_stream_error_and_cut(gw, fake):
    fake.push(Fault(error_after=2))
    with pytest.raises(openai.APIError) as ei:
        for _ in oai(gw).chat.completions.create(model="gemini-2.0-flash", stream=True,
                                                 messages=[{"role": "user", "content": "a b c d e"}]):
            pass
    assert "overloaded" in str(ei.value)
    fake.push(Fault(cut_after=2))
    with pytest.raises(openai.APIError):
        for _ in oai(gw).chat.completions.create(model="gemini-2.0-flash", stream=True,
                                                 messages=[{"role": "user", "content": "a b c d e"}]):
            pass


def test_embeddings(gw, fake):
    c = oai(gw)
    r = c.embeddings.with_raw_response.create(model="text-embedding-004", input=["hello", "big world"], dimensions=4,
                                              encoding_format="float")
    body = CreateEmbeddingResponse.model_validate(orjson.loads(r.content))
    assert [d.index for d in body.data] == [0, 1] and len(body.data[0].embedding) == 4
    assert body.usage.prompt_tokens > 0
    assert fake.calls[0]["path"].endswith(":batchEmbedContents")
    assert fake.calls[0]["body"]["requests"][1] == {"model": "models/text-embedding-004",
                                                    "content": {"parts": [{"text": "big world"}]},
                                                    "outputDimensionality": 4}
    # the SDK's default: base64 float32, decoded by the SDK -- must equal the float answer
    one = c.embeddings.create(model="text-embedding-004", input="hello", dimensions=4)
    assert fake.calls[1]["path"].endswith(":embedContent")
    assert fake.calls[1]["body"] == {"model": "models/text-embedding-004", "content": {"parts": [{"text": "hello"}]},
                                     "outputDimensionality": 4}
    assert one.data[0].embedding == pytest.approx(body.data[0].embedding, rel=1e-6)
    raw = c.embeddings.with_raw_response.create(model="text-embedding-004", input="hello", dimensions=4,
                                                encoding_format="base64")
    b = base64.b64decode(orjson.loads(raw.content)["data"][0]["embedding"])
    assert list(struct.unpack("<4f", b)) == pytest.approx(body.data[0].embedding, rel=1e-6)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="text-embedding-004", input=[[1, 2, 3]])


# -- round-trip property tests -------------------------------------------------------------------------
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_ident = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
_json_obj = st.dictionaries(_ident, st.one_of(st.integers(-5, 5), _text, st.booleans()), max_size=3)


@st.composite
def canonical_requests(draw) -> ChatRequest:
    """Canonical requests in the normal form Gemini preserves: system first, alternating turns, tool
    results right after the calls, single text parts as strings."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": draw(_text)} for _ in range(draw(st.integers(0, 2)))]
    n = 0
    after_tool = False
    for _ in range(draw(st.integers(1, 4))):
        if not after_tool:
            if draw(st.booleans()):
                msgs.append({"role": "user", "content": draw(_text)})
            else:
                msgs.append({"role": "user", "content": [
                    {"type": "text", "text": draw(_text)},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]})
        calls = []
        for _ in range(draw(st.integers(0, 2))):
            n += 1
            sig = draw(st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9+/]{4,16}", fullmatch=True)))
            calls.append({"id": f"call_{n}" + (f"~ts~{sig}" if sig else ""), "type": "function",
                          "function": {"name": f"fn_{n}", "arguments": orjson.dumps(draw(_json_obj)).decode()}})
        if calls:
            text = draw(st.one_of(st.none(), _text))
            msgs.append({"role": "assistant", "content": text, "tool_calls": calls})
            for c in calls:
                msgs.append({"role": "tool", "tool_call_id": c["id"].partition("~ts~")[0], "content": draw(_text)})
            after_tool = True
        else:
            msgs.append({"role": "assistant", "content": draw(_text)})
            after_tool = False
    params: dict[str, Any] = {"max_tokens": draw(st.integers(1, 9000))}
    for k, s in (("temperature", st.floats(0, 2)), ("top_p", st.floats(0, 1)), ("top_k", st.integers(1, 40)),
                 ("n", st.integers(1, 3)), ("seed", st.integers(0, 99)), ("presence_penalty", st.floats(-2, 2)),
                 ("stop", st.lists(_text, min_size=1, max_size=5)),
                 ("reasoning_effort", st.sampled_from(["none", "low", "medium", "high"])),
                 ("response_format", st.just({"type": "json_object"}))):
        if draw(st.booleans()):
            params[k] = draw(s)
    if draw(st.booleans()):
        params["tools"] = [{"type": "function", "function": {
            "name": draw(_ident), "description": draw(_text),
            "parameters": {"type": "object", "properties": {draw(_ident): {"type": "string"}}}}}]
        params["tool_choice"] = draw(st.sampled_from(["auto", "none", "required"]))
    return ChatRequest(model="gemini-x", messages=msgs, params=params)


@settings(max_examples=150, deadline=None)
@given(canonical_requests())
def test_roundtrip_canonical_gemini_canonical(req):
    body = canonical_to_gemini_request(req)
    json.dumps(body)
    back = gemini_request_to_canonical(body, req.model)
    assert back.messages == req.messages
    assert back.params == req.params
    assert canonical_to_gemini_request(back) == body


@st.composite
def gemini_responses(draw) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    if draw(st.booleans()):
        parts.append({"text": draw(_text)})
    for _ in range(draw(st.integers(0, 2))):
        parts.append({"functionCall": {"name": draw(_ident), "args": draw(_json_obj)}})
    finish = draw(st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY", "RECITATION"]))
    usage = {"promptTokenCount": draw(st.integers(0, 500)), "candidatesTokenCount": draw(st.integers(0, 500)),
             "cachedContentTokenCount": draw(st.integers(0, 10))}
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
            "usageMetadata": usage, "responseId": "r1", "modelVersion": "gemini-x"}


@settings(max_examples=150, deadline=None)
@given(gemini_responses())
def test_response_and_stream_agree(resp):
    body, usage = gemini_response_to_canonical(resp, "gemini-x")
    ChatCompletion.model_validate(body)
    # split the same response into a stream: one event per part, the finish + usage on the last
    dec = GeminiStreamDecoder("gemini-x")
    acc = StreamAccumulator()
    parts = resp["candidates"][0]["content"]["parts"] or [{"text": ""}]
    for i, p in enumerate(parts):
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [p]}, "index": 0}
        ev: dict[str, Any] = {"candidates": [cand], "responseId": "r1", "modelVersion": "gemini-x"}
        if i == len(parts) - 1:
            cand["finishReason"] = resp["candidates"][0]["finishReason"]
            ev["usageMetadata"] = resp["usageMetadata"]
        for ch in dec.feed(ev):
            ChatCompletionChunk.model_validate(ch)
            acc.add(ch)
    assert dec.finished
    acc.add(dec.final())
    s = acc.response()
    assert s.usage == usage
    sc, bc = s.body["choices"][0], body["choices"][0]
    assert sc["finish_reason"] == bc["finish_reason"]
    assert (sc["message"]["content"] or None) == (bc["message"]["content"] or None)
    def strip(calls):
        return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls or ()]
    assert strip(sc["message"].get("tool_calls")) == strip(bc["message"].get("tool_calls"))


def test_schema_sanitizer():
    assert sanitize_schema({"type": "object", "$schema": "x", "additionalProperties": False,
                            "properties": {"a": {"const": 1}, "b": {"type": ["integer", "null"]},
                                           "c": {"type": "array", "items": {"type": "string", "examples": ["x"]}}}}) == {
        "type": "object", "properties": {"a": {"enum": [1]}, "b": {"type": "integer", "nullable": True},
                                         "c": {"type": "array", "items": {"type": "string"}}}}
    with pytest.raises(GatewayError):
        sanitize_schema({"$ref": "#/$defs/x"})
