"""The Anthropic Messages API ingress (/v1/messages) driven by the official `anthropic` SDK, against the fake
OpenAI upstream and the mock provider, validated strictly with the SDK's own types."""
from __future__ import annotations

import base64
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from fakes.openai_upstream import Fault
from helixagent.api import anthropic_format as afmt
from helixagent.providers.anthropic_mapping import canonical_to_anthropic_request
from helixagent.canonical import StreamAccumulator, new_chunk, replay_chunks, usage_chunk, Usage

EVENT = TypeAdapter(RawMessageStreamEvent)
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


def check_order(events: list[dict[str, Any]]) -> None:
    """message_start first; blocks start/delta*/stop nested in index order; message_delta, message_stop last."""
    types = [e["type"] for e in events]
    assert types[0] == "message_start"
    assert types[-2:] == ["message_delta", "message_stop"]
    assert types.count("message_start") == 1 and types.count("message_delta") == 1
    open_index = None
    next_index = 0
    for e in events[1:-2]:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == next_index
            open_index = e["index"]
            next_index += 1
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
        else:
            raise AssertionError(f"unexpected event {e['type']} inside the message")
    assert open_index is None


def fold(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the message from raw events (independently of the SDK's accumulator)."""
    msg = dict(events[0]["message"])
    msg["content"] = []
    partial: dict[int, str] = {}
    for e in events[1:]:
        if e["type"] == "content_block_start":
            msg["content"].append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            d = e["delta"]
            if d["type"] == "text_delta":
                assert msg["content"][e["index"]]["type"] == "text"
                msg["content"][e["index"]]["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                assert msg["content"][e["index"]]["type"] == "thinking"
                msg["content"][e["index"]]["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                assert msg["content"][e["index"]]["type"] == "thinking"
                msg["content"][e["index"]]["signature"] += d["signature"]
            else:
                assert d["type"] == "input_json_delta" and msg["content"][e["index"]]["type"] == "tool_use"
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
        elif e["type"] == "message_delta":
            msg.update(e["delta"])
            msg["usage"] = {**msg["usage"], **e["usage"]}
    for i, s in partial.items():
        msg["content"][i]["input"] = orjson.loads(s)
    return msg


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


# -- property tests --------------------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_cc = st.one_of(st.none(), st.just({"type": "ephemeral"}))
_id = st.from_regex(r"toolu_[A-Za-z0-9]{4,10}", fullmatch=True)
_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,20}", fullmatch=True)
_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text,
                     lambda ch: st.lists(ch, max_size=3) | st.dictionaries(_name, ch, max_size=3), max_leaves=6)


def _with_cc(block: dict[str, Any], cc: Any) -> dict[str, Any]:
    if cc is not None:
        block["cache_control"] = cc
    return block


text_block = st.builds(lambda t, cc: _with_cc({"type": "text", "text": t}, cc), _text, _cc)
image_block = st.builds(lambda d, mt, cc: _with_cc({"type": "image", "source": {"type": "base64", "media_type": mt,
                                                                                  "data": d}}, cc),
                        st.from_regex(r"[A-Za-z0-9+/]{4,16}", fullmatch=True),
                        st.sampled_from(sorted(afmt.IMAGE_TYPES)), _cc) | \
    st.builds(lambda u: {"type": "image", "source": {"type": "url", "url": "https://img.example/" + u}},
              st.from_regex(r"[a-z]{1,8}\.png", fullmatch=True))
user_content = st.one_of(_text, st.lists(text_block | image_block, min_size=1, max_size=3))


@st.composite
def conversation(draw: Any) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 3))):
        msgs.append({"role": "user", "content": draw(user_content)})
        texts = draw(st.lists(st.builds(lambda t: {"type": "text", "text": t}, _text), max_size=1))
        calls = draw(st.lists(st.builds(lambda i, n, inp: {"type": "tool_use", "id": i, "name": n, "input": inp},
                                        _id, _name, st.dictionaries(_name, _json, max_size=3)),
                              max_size=2, unique_by=lambda b: b["id"]))
        if not texts and not calls:
            msgs.append({"role": "assistant", "content": draw(_text)})
            continue
        msgs.append({"role": "assistant", "content": texts + calls})
        if calls:
            results = [_with_cc({"type": "tool_result", "tool_use_id": c["id"],
                                 "content": draw(st.one_of(_text, st.lists(text_block, min_size=1, max_size=2)))},
                                draw(_cc)) for c in calls]
            for r in results:
                if draw(st.booleans()):
                    r["is_error"] = True
            tail = draw(st.lists(text_block, max_size=1))
            msgs.append({"role": "user", "content": results + tail})
            msgs.append({"role": "assistant", "content": draw(_text)})
    msgs.append({"role": "user", "content": draw(user_content)})
    return msgs


@st.composite
def anthropic_request(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m-" + draw(_name), "max_tokens": draw(st.integers(1, 100000)),
                            "messages": draw(conversation())}
    sysv = draw(st.one_of(st.none(), _text, st.lists(text_block, min_size=1, max_size=2)))
    if sysv is not None:
        body["system"] = sysv
    if draw(st.booleans()):
        body["stop_sequences"] = draw(st.lists(_text, min_size=1, max_size=4))
    for k in ("temperature", "top_p"):
        if draw(st.booleans()):
            body[k] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        body["top_k"] = draw(st.integers(0, 500))
    if draw(st.booleans()):
        body["metadata"] = {"user_id": draw(_text)}
    if draw(st.booleans()):
        names = draw(st.lists(_name, min_size=1, max_size=3, unique=True))
        body["tools"] = [_with_cc({"name": n, "description": draw(_text),
                                   "input_schema": {"type": "object", "properties": {draw(_name): {"type": "string"}}}},
                                  draw(_cc)) for n in names]
        choice = draw(st.sampled_from(["auto", "any", "none", "tool"]))
        tc: dict[str, Any] = {"type": choice}
        if choice == "tool":
            tc["name"] = names[0]
        if choice != "none" and draw(st.booleans()):
            tc["disable_parallel_tool_use"] = True
        body["tool_choice"] = tc
    if draw(st.booleans()):
        body["cache_control"] = {"type": "ephemeral"}
    if draw(st.booleans()):
        body["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
        if draw(st.booleans()):
            body["output_config"]["effort"] = draw(st.sampled_from(["low", "high", "max"]))
    if draw(st.booleans()):
        body["stream"] = True
    return body


def _norm_content(c: Any) -> Any:
    if isinstance(c, str):
        return [{"type": "text", "text": c}] if c else []
    out = []
    for b in c:
        if b["type"] == "tool_result":
            b = dict(b, content=_norm_content(b["content"]))
        out.append(b)
    return out


def normalize(body: dict[str, Any]) -> dict[str, Any]:
    """Equivalent spellings (a string vs one text block) compare equal."""
    out = dict(body)
    if "system" in out:
        out["system"] = _norm_content(out["system"])
    out["messages"] = [{"role": m["role"], "content": _norm_content(m["content"])} for m in body["messages"]]
    if out.get("tool_choice", {}).get("disable_parallel_tool_use") is False:
        out["tool_choice"] = {k: v for k, v in out["tool_choice"].items() if k != "disable_parallel_tool_use"}
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anthropic_request())
def test_roundtrip_anthropic_canonical_anthropic(body):
    req, helix = afmt.parse_messages(orjson.dumps(body), {})
    back = canonical_to_anthropic_request(req)
    assert normalize(back) == normalize(body)
    # the canonical request is plain OpenAI shape apart from the documented extensions
    for m in req.messages:
        assert m["role"] in ("system", "user", "assistant", "tool")
    has_cc = "cache_control" in _keys(body)  # as a key: a text may well say "cache_control" or "is_error"
    has_err = any(isinstance(m["content"], list) and any(b.get("is_error") for b in m["content"])
                  for m in body["messages"])
    assert helix["anthropic"]["lower"] == (has_cc or has_err)
    afmt.lower_for_openai(req)
    left = _keys(req.messages)
    assert "cache_control" not in left and "is_error" not in left


def _keys(v: Any) -> set[str]:
    """Every dict key anywhere in a JSON value."""
    out: set[str] = set()
    todo = [v]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            out.update(x)
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return out


# canonical chunk streams -> Anthropic events: valid, ordered, and meaning-preserving
@st.composite
def chunk_stream(draw: Any) -> tuple[list[dict[str, Any]], bool]:
    cid, model, created = "chatcmpl-p1", "gpt-x", 1700000000
    chunks = [new_chunk(cid, model, created, {"role": "assistant", "content": ""})]
    mode = draw(st.sampled_from(["none", "reasoning_content", "blocks"]))
    if mode == "reasoning_content":  # DeepSeek / vLLM: text only, no block boundaries, no signature
        for piece in draw(st.lists(_text, max_size=3)):
            chunks.append(new_chunk(cid, model, created, {"reasoning_content": piece}))
    elif mode == "blocks":  # Anthropic: blocks with signatures, redacted blocks
        for k in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                chunks.append(new_chunk(cid, model, created, {"thinking_blocks": [{"index": k, "type": "thinking"}]}))
                for piece in draw(st.lists(_text, max_size=3)):
                    chunks.append(new_chunk(cid, model, created, {"reasoning_content": piece}))
                sig = draw(st.text("abcXYZ019+/=", max_size=12))
                if sig:
                    chunks.append(new_chunk(cid, model, created, {"thinking_blocks": [{"index": k, "signature": sig}]}))
            else:
                chunks.append(new_chunk(cid, model, created, {"thinking_blocks": [
                    {"index": k, "type": "redacted_thinking", "data": draw(st.text("abcXYZ019", min_size=1, max_size=8))}]}))
    for piece in draw(st.lists(_text, max_size=4)):
        chunks.append(new_chunk(cid, model, created, {"content": piece}))
    ncalls = draw(st.integers(0, 3))
    for ti in range(ncalls):
        args = orjson.dumps(draw(st.dictionaries(_name, _json, max_size=3))).decode()
        chunks.append(new_chunk(cid, model, created, {"tool_calls": [{"index": ti, "id": f"call_{ti}", "type": "function",
                                                                      "function": {"name": draw(_name), "arguments": ""}}]}))
        step = draw(st.integers(1, 9))
        for i in range(0, len(args), step):
            chunks.append(new_chunk(cid, model, created, {"tool_calls": [{"index": ti, "function": {"arguments": args[i:i + step]}}]}))
    finish = "tool_calls" if ncalls else draw(st.sampled_from(["stop", "length", "content_filter"]))
    chunks.append(new_chunk(cid, model, created, {}, finish))
    with_usage = draw(st.booleans())
    if with_usage:
        chunks.append(usage_chunk(cid, model, created, Usage(11, 7, 18, cache_read_tokens=3)))
    return chunks, with_usage


def _parse_frames(data: bytes) -> list[dict[str, Any]]:
    out = []
    for fr in data.split(b"\n\n"):
        if not fr:
            continue
        ev, dl = fr.split(b"\n")
        assert ev.startswith(b"event: ") and dl.startswith(b"data: ")
        d = orjson.loads(dl[6:])
        assert d["type"] == ev[7:].decode()
        out.append(d)
    return out


@settings(max_examples=200, deadline=None)
@given(chunk_stream())
def test_stream_translation_property(sample):
    chunks, with_usage = sample
    tr = afmt.StreamTranslator("gpt-x", [{"role": "user", "content": "hi"}])
    data = b"".join(tr.feed(c) for c in chunks) + tr.end()
    events = _parse_frames(data)
    for e in events:
        EVENT.validate_python(e)
    check_order(events)
    msg = fold(events)
    Message.model_validate(msg)
    acc = StreamAccumulator()
    for c in chunks:
        acc.add(c)
    expect = afmt.render_message(acc.response("p"), "gpt-x")
    assert msg["content"] == expect["content"]
    # a cache hit replays the accumulated response: the same events again
    tr2 = afmt.StreamTranslator("gpt-x", [{"role": "user", "content": "hi"}])
    replayed = _parse_frames(b"".join(tr2.feed(c) for c in replay_chunks(acc.response("p"))) + tr2.end())
    assert fold(replayed)["content"] == msg["content"]
    assert msg["stop_reason"] == expect["stop_reason"] and msg["id"] == expect["id"]
    if with_usage:
        assert msg["usage"] == expect["usage"] == {"input_tokens": 8, "output_tokens": 7,
                                                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3}


def test_error_mid_stream_translation():
    from helixagent.errors import GatewayError
    tr = afmt.StreamTranslator("m", None)
    data = tr.feed(new_chunk("c1", "m", 1, {"content": "hi"})) + tr.end(GatewayError(502, "upstream broke"))
    events = _parse_frames(data)
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "upstream broke"}}


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
