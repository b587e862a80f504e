"""The OpenAI Responses API (/v1/responses) driven by the official `openai` SDK against gateways with an
OpenAI fake (native pass-through), an Anthropic fake and a Gemini fake (translated) and the mock; every
streamed event validated strictly with the SDK's own types, in the documented order."""
from __future__ import annotations

import sqlite3
from typing import Any, Iterator

import httpx
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import Fault

EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
RESPONSE: TypeAdapter[Any] = TypeAdapter(Response)
MOCK = {"name": "mock", "type": "mock", "models": ["mock-1"], "mock_tokens": 6}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def claude_session() -> Iterator[FakeAnthropic]:
    f = FakeAnthropic()
    yield f
    f.close()


@pytest.fixture(scope="module")
def gemini_session() -> Iterator[FakeGemini]:
    f = FakeGemini()
    yield f
    f.close()


@pytest.fixture
def claude(claude_session: FakeAnthropic) -> Iterator[FakeAnthropic]:
    claude_session.reset()
    yield claude_session


@pytest.fixture
def gemini(gemini_session: FakeGemini) -> Iterator[FakeGemini]:
    gemini_session.reset()
    yield gemini_session


UPSTREAMS = ("openai", "claude", "gemini")
MODEL = {"openai": "gpt-4o-mini", "claude": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}


@pytest.fixture(params=UPSTREAMS)
def up(request: Any, make_gateway: Any, fake_openai: Any, claude: FakeAnthropic, gemini: FakeGemini) -> Any:
    fake = {"openai": fake_openai, "claude": claude, "gemini": gemini}[request.param]
    gw = make_gateway({"providers": [fake.provider(max_retries=0)], "routing": {"retries": {"max_attempts": 1}}})
    return request.param, gw, fake


def client(gw: Any, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def events(gw: Any, body: dict[str, Any], key: str = "k") -> list[dict[str, Any]]:
    """POST a streamed request; parse SSE by hand; validate every event strictly with the SDK's type."""
    out: list[dict[str, Any]] = []
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", gw.url + "/v1/responses", json=dict(body, stream=True),
                      headers={"authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = orjson.loads(line[6:])
                    assert name == data["type"], (name, data)
                    EVENT.validate_python(data, strict=True)
                    out.append(data)
    return out


def check_order(evs: list[dict[str, Any]]) -> None:
    """The documented grammar: created, in_progress, items (added ... done), then the terminal event."""
    assert [e["sequence_number"] for e in evs] == list(range(evs[0]["sequence_number"],
                                                             evs[0]["sequence_number"] + len(evs)))
    types = [e["type"] for e in evs]
    assert types[:2] == ["response.created", "response.in_progress"], types
    assert types[-1] in ("response.completed", "response.incomplete"), types
    open_item: int | None = None
    for e in evs[2:-1]:
        t = e["type"]
        if t == "response.output_item.added":
            assert open_item is None, types
            open_item = e["output_index"]
        elif t == "response.output_item.done":
            assert open_item == e["output_index"], types
            open_item = None
        else:
            assert open_item is not None and e["output_index"] == open_item, (t, types)
    assert open_item is None
    for kind in ("content_part", "reasoning_summary_part"):
        adds = [i for i, t in enumerate(types) if t == f"response.{kind}.added"]
        dones = [i for i, t in enumerate(types) if t == f"response.{kind}.done"]
        assert len(adds) == len(dones) and all(a < d for a, d in zip(adds, dones, strict=True))
    deltas = [i for i, t in enumerate(types) if t == "response.output_text.delta"]
    if deltas:
        assert types.index("response.content_part.added") < deltas[0]
        assert deltas[-1] < types.index("response.output_text.done")


# -- create / stream through each upstream ---------------------------------------------------------------

def test_create_text_every_upstream(up: Any) -> None:
    name, gw, fake = up
    r = client(gw).responses.create(model=MODEL[name], input="hello responses world", instructions="Be brief.",
                                    max_output_tokens=50, temperature=0.5, metadata={"t": "1"}, user="u1")
    RESPONSE.validate_python(r.model_dump(mode="json", exclude_unset=True), strict=True)
    assert r.status == "completed" and r.object == "response"
    assert "hello" in r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    call = fake.calls[-1]
    if name == "openai":   # native: the body went to /v1/responses as the client sent it
        assert call["path"] == "/v1/responses" and call["body"]["instructions"] == "Be brief."
        assert call["body"]["metadata"] == {"t": "1"} and call["body"]["max_output_tokens"] == 50
    else:
        assert "responses" not in call["path"]


def test_stream_every_upstream_validated_and_ordered(up: Any) -> None:
    name, gw, _fake = up
    evs = events(gw, {"model": MODEL[name], "input": "stream these words please"})
    check_order(evs)
    done = evs[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] > 0
    text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert "stream" in text
    assert done["output"][-1]["content"][0]["text"] == text
    # the SDK's own stream helper folds the same events into the final response
    with client(gw).responses.stream(model=MODEL[name], input="stream these words please") as s:
        final = s.get_final_response()
    assert final.output_text == text


def test_function_tool_round_trip_every_upstream(up: Any) -> None:
    name, gw, _fake = up
    c = client(gw)
    r = c.responses.create(model=MODEL[name], input="weather in Paris", tools=[WEATHER], tool_choice="auto",
                           parallel_tool_calls=False)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    evs = events(gw, {"model": MODEL[name], "input": "weather in Paris", "tools": [WEATHER]})
    check_order(evs)
    args = "".join(e["delta"] for e in evs if e["type"] == "response.function_call_arguments.delta")
    done = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert done and done[0]["arguments"] == args and orjson.loads(args)
    # the tool's output goes back as a function_call_output item, with the call itself
    r2 = c.responses.create(model=MODEL[name], tools=[WEATHER], input=[
        {"role": "user", "content": "weather in Paris"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny 21C"}])
    assert r2.status == "completed"


def test_previous_response_id_every_upstream(up: Any) -> None:
    name, gw, fake = up
    c = client(gw)
    r1 = c.responses.create(model=MODEL[name], input="first turn words")
    r2 = c.responses.create(model=MODEL[name], input="second turn", previous_response_id=r1.id)
    assert r2.previous_response_id == r1.id
    sent = orjson.dumps(fake.calls[-1]["body"]).decode()
    if name == "openai":   # OpenAI stored r1 itself: the id passes through
        assert fake.calls[-1]["body"]["previous_response_id"] == r1.id
    else:                  # rebuilt from the gateway's store: the earlier turn is in the upstream request
        assert "first turn words" in sent and r1.output_text.split()[0] in sent
    got = c.responses.retrieve(r2.id)
    assert got.id == r2.id and got.output_text == r2.output_text
    items = c.responses.input_items.list(r2.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "second turn"
    c.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r1.id)


def test_records_row_per_response(make_gateway: Any, tmp_path: Any) -> None:
    gw = make_gateway({"providers": [MOCK]})
    c = client(gw)
    ids = [c.responses.create(model="mock-1", input=f"record {i}").id for i in range(3)]
    with c.responses.stream(model="mock-1", input="streamed record") as s:
        ids.append(s.get_final_response().id)
    gw.flush_records() if hasattr(gw, "flush_records") else None
    import time
    deadline = time.time() + 10
    rows: list[Any] = []
    db = str(tmp_path / "helix-0.db")
    while time.time() < deadline:
        with sqlite3.connect(db) as con:
            rows = con.execute("select request_id, endpoint, status, streamed from completions "
                               "where endpoint = 'responses'").fetchall()
        if len(rows) >= 4:
            break
        time.sleep(0.1)
    assert sorted("resp_" + r[0] for r in rows) == sorted(ids)
    assert all(r[2] == 200 for r in rows) and sum(r[3] for r in rows) == 1


# -- native pass-through -------------------------------------------------------------------------------------

def test_native_passes_builtin_tools_and_unknown_fields(gateway: Any, fake_openai: Any) -> None:
    r = httpx.post(gateway.url + "/v1/responses", json={
        "model": "gpt-4o-mini", "input": "search something", "tools": [{"type": "web_search"}],
        "some_future_field": {"x": 1}, "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
        "store": False}, timeout=20)
    assert r.status_code == 200, r.text
    body = fake_openai.calls[-1]["body"]
    assert body["tools"] == [{"type": "web_search"}] and body["some_future_field"] == {"x": 1}
    out = r.json()
    assert out["id"].startswith("resp_fake") and out["output"][0]["encrypted_content"].startswith("gAAAA")


def test_native_stream_relayed_and_failure_midstream(gateway: Any, fake_openai: Any) -> None:
    evs = events(gateway, {"model": "gpt-4o-mini", "input": "relay me", "reasoning": {"effort": "low"}})
    check_order(evs)
    assert evs[0]["response"]["id"].startswith("resp_fake")
    assert any(e["type"] == "response.reasoning_summary_text.delta" for e in evs)
    fake_openai.push(Fault(cut_after=4))
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", gateway.url + "/v1/responses",
                      json={"model": "gpt-4o-mini", "input": "cut me off now", "stream": True}) as r:
            data = [orjson.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for d in data:
        EVENT.validate_python(d, strict=True)
    assert data[-1]["type"] == "response.failed" and data[-2]["type"] == "error"
    seqs = [d["sequence_number"] for d in data]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_translated_failure_midstream_is_error_then_failed(make_gateway: Any, fake_openai: Any) -> None:
    gw = make_gateway({"providers": [fake_openai.provider(type="openai_compatible", max_retries=0)]})
    fake_openai.push(Fault(cut_after=3))
    with httpx.Client(timeout=20) as h:
        with h.stream("POST", gw.url + "/v1/responses",
                      json={"model": "gpt-4o-mini", "input": "one two three four five", "stream": True}) as r:
            data = [orjson.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    for d in data:
        EVENT.validate_python(d, strict=True)
    assert [d["type"] for d in data[:2]] == ["response.created", "response.in_progress"]
    assert data[-2]["type"] == "error" and data[-1]["type"] == "response.failed"
    assert data[-1]["response"]["status"] == "failed"
    assert [d["sequence_number"] for d in data] == list(range(len(data)))


# -- translated requests: what only OpenAI serves is a clear 400 ---------------------------------------------

def test_builtin_tool_to_claude_is_400_naming_it(make_gateway: Any, claude: FakeAnthropic) -> None:
    gw = make_gateway({"providers": [claude.provider()]})
    with pytest.raises(openai.BadRequestError) as ei:
        client(gw).responses.create(model="claude-sonnet-4-5", input="hi",
                                    tools=[WEATHER, {"type": "web_search"}])  # type: ignore[list-item]
    err = ei.value.body
    assert isinstance(err, dict) and err["param"] == "tools[1].type" and "web_search" in err["message"]
    assert not claude.calls


@pytest.mark.parametrize("body,param", [
    ({"model": "mock-1", "input": 5}, "input"),
    ({"model": "mock-1", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "mock-1", "input": "x", "max_output_tokens": "9"}, "max_output_tokens"),
    ({"model": "mock-1", "input": "x", "store": "yes"}, "store"),
    ({"model": "mock-1", "input": "x", "tools": [{"name": "f"}]}, "tools[0].type"),
    ({"model": "mock-1", "input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}]},
     "input[0].content[0].text"),
    ({"model": "mock-1", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"model": "mock-1", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"model": "mock-1", "input": "x", "truncation": "sometimes"}, "truncation"),
    ({"model": "mock-1", "input": "x", "include": "reasoning.encrypted_content"}, "include"),
    ({"model": "mock-1"}, "input"),
    ({"input": "x"}, "model"),
])
def test_wrong_types_are_400_naming_the_param(make_gateway: Any, body: dict[str, Any], param: str) -> None:
    gw = make_gateway({"providers": [MOCK]})
    r = httpx.post(gw.url + "/v1/responses", json=body, timeout=20)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_json_schema_format_reaches_upstream(make_gateway: Any, fake_openai: Any) -> None:
    gw = make_gateway({"providers": [fake_openai.provider(type="openai_compatible")]})
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    client(gw).responses.create(model="gpt-4o-mini", input="json please", reasoning={"effort": "low"},
                                text={"format": {"type": "json_schema", "name": "out", "schema": schema,
                                                 "strict": True}})
    body = fake_openai.calls[-1]["body"]
    assert fake_openai.calls[-1]["path"] == "/v1/chat/completions"
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "out", "schema": schema, "strict": True}}
    assert body["reasoning_effort"] == "low"


def test_claude_thinking_round_trips_as_encrypted_reasoning(make_gateway: Any, claude: FakeAnthropic) -> None:
    """store: false + include reasoning.encrypted_content, as Codex CLI runs: the signed thinking comes back
    in the next input and reaches Anthropic with its signature (the fake rejects a wrong one)."""
    gw = make_gateway({"providers": [claude.provider(max_retries=0)]})
    c = client(gw)
    r = c.responses.create(model="claude-sonnet-4-5", input="think about this", reasoning={"effort": "high"},
                           include=["reasoning.encrypted_content"], store=False, max_output_tokens=4096)
    rs = [o for o in r.output if o.type == "reasoning"]
    assert rs and rs[0].encrypted_content and rs[0].summary
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)   # store: false keeps nothing
    nxt = [{"role": "user", "content": "think about this"}] + [o.model_dump(exclude_none=True) for o in r.output]
    nxt.append({"role": "user", "content": "and now more"})
    r2 = c.responses.create(model="claude-sonnet-4-5", input=nxt, reasoning={"effort": "high"},  # type: ignore[arg-type]
                            include=["reasoning.encrypted_content"], store=False, max_output_tokens=4096)
    assert r2.status == "completed"
    sent = claude.calls[-1]["body"]["messages"]
    blocks = [b for m in sent if m["role"] == "assistant" for b in m["content"] if isinstance(b, dict)]
    assert any(b["type"] == "thinking" and b["signature"] for b in blocks)
    evs = events(gw, {"model": "claude-sonnet-4-5", "input": "think streamed", "reasoning": {"effort": "high"},
                      "include": ["reasoning.encrypted_content"], "max_output_tokens": 4096})
    check_order(evs)
    done = [e["item"] for e in evs if e["type"] == "response.output_item.done" and e["item"]["type"] == "reasoning"]
    assert done and done[0]["encrypted_content"] and done[0]["summary"][0]["text"]


def test_input_tokens_and_cancel(make_gateway: Any) -> None:
    gw = make_gateway({"providers": [MOCK]})
    c = client(gw)
    r = httpx.post(gw.url + "/v1/responses/input_tokens", json={"model": "mock-1", "input": "count these tokens"})
    assert r.status_code == 200 and r.json()["object"] == "response.input_tokens" and r.json()["input_tokens"] > 0
    done = c.responses.create(model="mock-1", input="hi")
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(done.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.cancel("resp_nope")


def test_conversation_moves_from_claude_to_native_openai(make_gateway: Any, fake_openai: Any,
                                                         claude: FakeAnthropic) -> None:
    """A response Claude served, continued on OpenAI by previous_response_id: OpenAI does not know the id, so
    the stored items go as input -- without HelixAgent's item ids and its own reasoning items."""
    gw = make_gateway({"providers": [claude.provider(max_retries=0), fake_openai.provider(priority=2)]})
    c = client(gw)
    r1 = c.responses.create(model="claude-sonnet-4-5", input="ponder first", reasoning={"effort": "high"},
                            include=["reasoning.encrypted_content"], max_output_tokens=4096)
    assert any(o.type == "reasoning" for o in r1.output)
    r2 = c.responses.create(model="gpt-4o-mini", input="then this", previous_response_id=r1.id)
    assert r2.status == "completed"
    body = fake_openai.calls[-1]["body"]
    assert "previous_response_id" not in body
    assert [i.get("type", "message") for i in body["input"]] == ["message", "message", "message"]
    assert not any("id" in i for i in body["input"][:2]) and body["input"][0]["content"][0]["text"] == "ponder first"
