"""The OpenAI Agents SDK (`openai-agents`), used unchanged as an outsider would: an ``AsyncOpenAI`` client
pointed at the gateway, an ``Agent`` with a ``@function_tool``, ``Runner.run`` / ``Runner.run_streamed``.
Each run is a real tool loop: the model asks for ``get_weather`` -> the SDK runs it -> the model answers with
the tool's output.  Upstreams: the OpenAI fake (``/v1/responses`` served natively), the scripted Anthropic
fake and the Gemini fake (both translated), in the SDK's default Responses mode and in its Chat Completions
mode (``OpenAIChatCompletionsModel``).  Checked: the final output carries the tool's result, the upstream's
second call carried the tool result, and the gateway recorded every call in its database."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any, Iterator

import orjson
import pytest
from agents import (Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool,
                    set_default_openai_client, set_tracing_disabled)
from openai import AsyncOpenAI

from fakes.anthropic_upstream import ScriptedAnthropic
from fakes.gemini_upstream import FakeGemini
from support.capture_server import Script

WEATHER = "sunny-21C-in-Paris"   # one word, so the echoing fakes repeat it whole
MODEL = {"openai": "gpt-4o-mini", "claude": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}
ENDPOINT = {"responses": "responses", "chat": "chat"}

set_tracing_disabled(True)   # its traces would go to OpenAI's platform, not through the gateway


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name.
    """
    ran.append(city)
    return WEATHER if city == "Paris" else f"no weather for {city}"


ran: list[str] = []   # the cities the SDK ran get_weather for, in this test


@pytest.fixture(scope="module")
def claude_session() -> Iterator[ScriptedAnthropic]:
    f = ScriptedAnthropic(Script(tools={"get_weather": {"city": "Paris"}}, reply="Claude says: {tool_output}"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def gemini_session() -> Iterator[FakeGemini]:
    f = FakeGemini()
    yield f
    f.close()


@pytest.fixture
def up(request: Any, make_gateway: Any, fake_openai: Any, claude_session: ScriptedAnthropic,
       gemini_session: FakeGemini, tmp_path: Any) -> Iterator[tuple[str, Any, Any, str]]:
    claude_session.reset()
    gemini_session.reset()
    ran.clear()
    fake_openai.tool_args = {"city": "Paris"}
    gemini_session.tool_args = {"city": "Paris"}
    fake = {"openai": fake_openai, "claude": claude_session, "gemini": gemini_session}[request.param]
    gw = make_gateway({"providers": [fake.provider(max_retries=0)], "routing": {"retries": {"max_attempts": 1}}})
    yield request.param, gw, fake, str(tmp_path / "helix-0.db")
    gemini_session.reset()


@pytest.fixture
async def sdk_client() -> Any:
    """``sdk_client(gw)``: an ``AsyncOpenAI`` client pointed at the gateway, closed after the test."""
    made: list[AsyncOpenAI] = []

    def make(gw: Any) -> AsyncOpenAI:
        made.append(AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-any-client-key", max_retries=0, timeout=20))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def agent(model: Any) -> Agent[Any]:
    return Agent(name="weather", instructions="Answer with the weather; use the tool.", model=model,
                 tools=[get_weather])


def tool_result_seen(name: str, call: dict[str, Any]) -> str:
    """The tool result the upstream saw in a call, in its own wire format ('' when there is none)."""
    body = call["body"]
    if name == "claude":
        return " ".join(orjson.dumps(b.get("content")).decode() for m in body["messages"]
                        if isinstance(m.get("content"), list) for b in m["content"] if b.get("type") == "tool_result")
    if name == "gemini":
        return " ".join(orjson.dumps(p["functionResponse"]).decode() for c in body["contents"] for p in c["parts"]
                        if "functionResponse" in p)
    if call["path"].endswith("/responses"):
        return " ".join(str(i.get("output")) for i in body.get("input") or [] if isinstance(i, dict)
                        and i.get("type") == "function_call_output")
    return " ".join(str(m.get("content")) for m in body["messages"] if m.get("role") == "tool")


def records(db: str, n: int) -> list[tuple[Any, ...]]:
    """The gateway's completion records (written behind the response: polled for a bounded time)."""
    deadline = time.time() + 10
    rows: list[tuple[Any, ...]] = []
    while time.time() < deadline:
        try:
            with sqlite3.connect(db) as con:
                rows = con.execute("select endpoint, status, provider, model, streamed, completion_tokens "
                                   "from completions order by created_at").fetchall()
        except sqlite3.OperationalError:   # the table is created by the gateway's first write
            rows = []
        if len(rows) >= n:
            break
        time.sleep(0.1)
    return rows


def check_loop(name: str, fake: Any, db: str, output: str, endpoint: str, streamed: bool) -> None:
    assert WEATHER in output, output
    assert ran == ["Paris"]     # the SDK ran the tool once, with the arguments the model chose
    assert len(fake.calls) == 2, [c["body"] for c in fake.calls]
    assert tool_result_seen(name, fake.calls[0]) == ""
    assert WEATHER in tool_result_seen(name, fake.calls[1])
    if name == "openai":        # Responses is served natively, chat completions as chat completions
        want = "/v1/responses" if endpoint == "responses" else "/v1/chat/completions"
        assert [c["path"] for c in fake.calls] == [want, want]
    assert all(bool(c["body"].get("stream")) == streamed for c in fake.calls if name != "gemini")
    if name == "gemini":
        assert all(("stream" in c["path"]) == streamed for c in fake.calls), [c["path"] for c in fake.calls]
    rows = records(db, 2)
    assert len(rows) == 2, rows
    for ep, status, provider, model, was_streamed, out_tokens in rows:
        assert (ep, status, provider, model) == (ENDPOINT[endpoint], 200, name, MODEL[name])
        assert bool(was_streamed) == streamed and out_tokens > 0


@pytest.mark.parametrize("up", ["openai", "claude", "gemini"], indirect=True)
async def test_agent_tool_loop_responses_default_client(up: tuple[str, Any, Any, str], sdk_client: Any) -> None:
    """The SDK's default: ``set_default_openai_client`` and a model name -> the Responses API."""
    name, gw, fake, db = up
    set_default_openai_client(sdk_client(gw), use_for_tracing=False)
    result = await Runner.run(agent(MODEL[name]), "What is the weather in Paris?")
    check_loop(name, fake, db, str(result.final_output), "responses", streamed=False)


@pytest.mark.parametrize("up", ["openai", "claude", "gemini"], indirect=True)
async def test_agent_tool_loop_responses_streamed(up: tuple[str, Any, Any, str], sdk_client: Any) -> None:
    name, gw, fake, db = up
    model = OpenAIResponsesModel(model=MODEL[name], openai_client=sdk_client(gw))
    run = Runner.run_streamed(agent(model), "What is the weather in Paris?")
    kinds: list[str] = []
    text: list[str] = []
    async for ev in run.stream_events():
        kinds.append(ev.type)
        if ev.type == "raw_response_event" and ev.data.type == "response.output_text.delta":
            text.append(ev.data.delta)
        if ev.type == "run_item_stream_event":
            kinds.append(ev.name)
    assert "tool_called" in kinds and "tool_output" in kinds and "message_output_created" in kinds, kinds
    assert kinds.index("tool_called") < kinds.index("tool_output") < kinds.index("message_output_created")
    assert WEATHER in "".join(text)
    check_loop(name, fake, db, str(run.final_output), "responses", streamed=True)


@pytest.mark.parametrize("up", ["openai", "claude", "gemini"], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
async def test_agent_tool_loop_chat_completions_mode(up: tuple[str, Any, Any, str], stream: bool, sdk_client: Any) -> None:
    """The SDK's Chat Completions mode (``OpenAIChatCompletionsModel``) through /v1/chat/completions."""
    name, gw, fake, db = up
    model = OpenAIChatCompletionsModel(model=MODEL[name], openai_client=sdk_client(gw))
    if stream:
        run = Runner.run_streamed(agent(model), "What is the weather in Paris?")
        async for _ev in run.stream_events():
            pass
        output = str(run.final_output)
    else:
        output = str((await Runner.run(agent(model), "What is the weather in Paris?")).final_output)
    check_loop(name, fake, db, output, "chat", streamed=stream)


@pytest.mark.parametrize("up", ["openai"], indirect=True)
async def test_agent_runs_concurrently(up: tuple[str, Any, Any, str], sdk_client: Any) -> None:
    """Several agents at once over one client: every loop completes with its own tool result."""
    name, gw, fake, db = up
    model = OpenAIResponsesModel(model=MODEL[name], openai_client=sdk_client(gw))
    results = await asyncio.gather(*(Runner.run(agent(model), f"Weather in Paris? ({i})") for i in range(12)))
    assert all(WEATHER in str(r.final_output) for r in results)
    assert ran == ["Paris"] * 12 and len(fake.calls) == 24
    assert len(records(db, 24)) == 24


@pytest.mark.parametrize("up", ["claude", "gemini"], indirect=True)
async def test_agent_second_turn_by_previous_response_id(up: tuple[str, Any, Any, str], sdk_client: Any) -> None:
    """A follow-up run chained with ``previous_response_id`` (the SDK sends only the new input): the gateway's
    response store gives a translated upstream the whole earlier conversation, tool call and result included."""
    name, gw, fake, db = up
    model = OpenAIResponsesModel(model=MODEL[name], openai_client=sdk_client(gw))
    first = await Runner.run(agent(model), "What is the weather in Paris?")
    assert first.last_response_id and WEATHER in str(first.final_output)
    second = await Runner.run(agent(model), "And tomorrow?", previous_response_id=first.last_response_id)
    assert second.final_output
    sent = fake.calls[-1]
    assert sent["body"] is not None and len(fake.calls) == 3
    assert WEATHER in tool_result_seen(name, sent)      # the first turn's tool result, from the store
    assert "What is the weather in Paris?" in orjson.dumps(sent["body"]).decode()
    assert "And tomorrow?" in orjson.dumps(sent["body"]).decode()
    assert len(records(db, 3)) == 3
