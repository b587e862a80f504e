"""/v1/messages as Claude Code uses it, over real HTTP: the official anthropic SDK's beta client and raw
requests shaped like Claude Code's first calls (``?beta=true``, ``anthropic-beta``, system blocks with
cache_control, tools, thinking, ``metadata.user_id``, ``context_management`` and other fields HelixAgent does
not translate) against the fake Anthropic upstream (which records the exact request) and the fake OpenAI
upstream (reached through an alias), streamed events validated with the SDK's own types."""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterator

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import RawMessageStreamEvent
from anthropic.types.beta import BetaRawMessageStreamEvent
from pydantic import TypeAdapter

from fakes.anthropic_upstream import FakeAnthropic
from support.keys import MASTER, admin_create

EVENT = TypeAdapter(RawMessageStreamEvent)
BETA_EVENT = TypeAdapter(BetaRawMessageStreamEvent)
BETAS = "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"
CONTEXT_MANAGEMENT = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
CLAUDE_CODE_MODEL = "claude-sonnet-4-5-20250929"
TOOLS = [{"name": "Read", "description": "Read a file",
          "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}},
                           "required": ["file_path"], "additionalProperties": False,
                           "$schema": "http://json-schema.org/draft-07/schema#"}},
         {"name": "Bash", "description": "Run a command",
          "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
          "cache_control": {"type": "ephemeral"}}]
# fields HelixAgent has no canonical meaning for, as Claude Code and the API's newer features send them
UNKNOWN = {"context_management": CONTEXT_MANAGEMENT, "container": "container_011CQ",
           "service_tier": "auto", "a_field_from_next_year": {"nested": [1, 2.5, None, "x"], "deep": {"k": True}}}


def claude_code_body(stream: bool = False, **over: Any) -> dict[str, Any]:
    """A body shaped like Claude Code's first call."""
    body: dict[str, Any] = {
        "model": CLAUDE_CODE_MODEL, "max_tokens": 32000, "stream": stream,
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                    "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be concise.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>context</system-reminder>"},
            {"type": "text", "text": "list files", "cache_control": {"type": "ephemeral"}}]}],
        "tools": TOOLS, "thinking": {"type": "enabled", "budget_tokens": 4000},
        "metadata": {"user_id": "user_" + "ab" * 32 + "_account__session_0f3c5e2a-1111-2222-3333-444455556666"},
        "temperature": 1, **UNKNOWN}
    body.update(over)
    return body


def post(gw: Any, body: dict[str, Any], query: str = "?beta=true", betas: str = BETAS) -> httpx.Response:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "x-app": "cli",
               "user-agent": "claude-cli/2.0.0 (external, cli)", "content-type": "application/json"}
    if betas:
        headers["anthropic-beta"] = betas
    return httpx.post(gw.url + "/v1/messages" + query, content=orjson.dumps(body), headers=headers, timeout=20)


def sse(r: httpx.Response, adapter: TypeAdapter[Any] = EVENT) -> list[dict[str, Any]]:
    """The SSE events of a response, each validated with the SDK's event type."""
    out: list[dict[str, Any]] = []
    event = None
    for line in r.text.splitlines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = orjson.loads(line[6:])
            assert data["type"] == event, (event, data)
            adapter.validate_python(data)
            out.append(data)
    types = [e["type"] for e in out]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"], types
    return out


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
def claude_gw(make_gateway, fake):
    """An Anthropic provider with no models: list (any claude-* model), as a new user configures it."""
    p = fake.provider(max_retries=0)
    p.pop("models")
    return make_gateway({"providers": [p], "routing": {"retries": {"max_attempts": 1}}})


@pytest.fixture
def gpt_gw(make_gateway, fake_openai):
    """Claude Code's model names routed by aliases to a GPT backend."""
    return make_gateway({"providers": [fake_openai.provider(max_retries=0, models=["gpt-4o-mini", "gpt-5"])],
                         "routing": {"retries": {"max_attempts": 1}, "aliases": {
                             CLAUDE_CODE_MODEL: [{"provider": "openai", "model": "gpt-4o-mini"}],
                             "claude-opus-4-5": [{"provider": "openai", "model": "gpt-5"}]}}})


# -- to an Anthropic upstream: everything as sent ------------------------------------------------------------

def test_sdk_beta_client_reaches_anthropic_with_context_management(claude_gw, fake):
    c = anthropic.Anthropic(base_url=claude_gw.url, api_key="unused", max_retries=0, timeout=20)
    msg = c.beta.messages.create(model=CLAUDE_CODE_MODEL, max_tokens=2000, betas=BETAS.split(","),
                                 messages=[{"role": "user", "content": "hello there"}],
                                 extra_body={"context_management": CONTEXT_MANAGEMENT, "mcp_servers": [
                                     {"type": "url", "url": "https://mcp.example/sse", "name": "docs"}]})
    assert msg.content[-1].text == "echo:hello echo:there"
    call = fake.calls[-1]
    assert call["headers"]["anthropic-beta"] == BETAS
    assert call["body"]["context_management"] == CONTEXT_MANAGEMENT
    assert call["body"]["mcp_servers"] == [{"type": "url", "url": "https://mcp.example/sse", "name": "docs"}]


def test_claude_code_first_call_is_byte_faithful(claude_gw, fake):
    body = claude_code_body()
    r = post(claude_gw, body)
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "claude"
    assert "x-helixagent-dropped-params" not in r.headers
    msg = r.json()
    assert [b["type"] for b in msg["content"]] == ["thinking", "text", "tool_use"]
    call = fake.calls[-1]
    assert call["query"] == "beta=true" and call["headers"]["anthropic-beta"] == BETAS
    sent = call["body"]
    for k, v in UNKNOWN.items():  # the exact JSON value, bytes included
        assert sent[k] == v
        assert orjson.dumps(v) in call["raw"], k
    for k in ("system", "messages", "tools", "thinking", "metadata", "max_tokens", "model", "temperature"):
        assert sent[k] == body[k], k
    assert set(sent) == set(body) - {"stream"}


def test_history_blocks_and_server_tools_pass_through_in_place(claude_gw, fake):
    """Blocks HelixAgent does not translate (server_tool_use, web_search_tool_result, search_result, text
    citations, a Files API image) and newer tool types reach Anthropic as sent, in their place."""
    assistant = [{"type": "text", "text": "Searching."},
                 {"type": "server_tool_use", "id": "srvtoolu_01", "name": "web_search", "input": {"query": "x"}},
                 {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01", "content": [
                     {"type": "web_search_result", "url": "https://a.example", "title": "A",
                      "encrypted_content": "EqgfCioIARgBIiQ3", "page_age": None}]},
                 {"type": "text", "text": "Found it.", "citations": [
                     {"type": "web_search_result_location", "url": "https://a.example", "title": "A",
                      "encrypted_index": "Eo8BCioIAhgBIiQy", "cited_text": "x"}]},
                 {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {"file_path": "/a.png"}}]
    user = [{"type": "tool_result", "tool_use_id": "toolu_01", "content": [
                {"type": "text", "text": "an image"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "search_result", "source": "https://b.example", "title": "B",
                 "content": [{"type": "text", "text": "b text"}]}]},
            {"type": "image", "source": {"type": "file", "file_id": "file_011CN"}},
            {"type": "text", "text": "and now?"}]
    tools = TOOLS + [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                     {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
                     {"name": "Grep", "input_schema": {"type": "object"}, "defer_loading": True, "strict": True}]
    body = claude_code_body(messages=[{"role": "user", "content": "search"},
                                      {"role": "assistant", "content": assistant},
                                      {"role": "user", "content": user}], tools=tools)
    r = post(claude_gw, body)
    assert r.status_code == 200, r.text
    sent = fake.calls[-1]["body"]
    assert sent["tools"] == tools
    assert sent["messages"][0] == {"role": "user", "content": "search"}
    # tool_use moves after the other blocks (canonical order); everything else stays where it was
    assert sent["messages"][1]["content"] == assistant
    assert sent["messages"][2]["content"] == user


def test_system_message_inside_messages(claude_gw, fake, gpt_gw, fake_openai):
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Mode: plan.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "hi"}]
    r = post(claude_gw, claude_code_body(messages=msgs))
    assert r.status_code == 200, r.text
    sent = fake.calls[-1]["body"]
    assert sent["system"][-1] == {"type": "text", "text": "Mode: plan.", "cache_control": {"type": "ephemeral"}}
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    r = post(gpt_gw, {"model": CLAUDE_CODE_MODEL, "max_tokens": 100, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "system", "content": "now be brief"}, {"role": "user", "content": "c"}]})
    assert r.status_code == 200, r.text
    assert [m["role"] for m in fake_openai.calls[-1]["body"]["messages"]] == ["user", "assistant", "system", "user"]


# -- to a GPT backend through an alias: dropped and named, or mapped -----------------------------------------

def test_claude_code_first_call_to_gpt_via_alias(gpt_gw, fake_openai):
    r = post(gpt_gw, claude_code_body())
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "openai" and r.headers["x-helixagent-model"] == "gpt-4o-mini"
    dropped = r.headers["x-helixagent-dropped-params"].split(",")
    assert set(dropped) == {"cache_control", "thinking", *UNKNOWN}, dropped
    msg = anthropic.types.Message.model_validate(r.json())
    assert msg.content[0].type == "tool_use" and msg.stop_reason == "tool_use"
    sent = fake_openai.calls[-1]["body"]
    assert not {"thinking", "reasoning_effort", "cache_control", *UNKNOWN} & set(sent)
    assert "cache_control" not in orjson.dumps(sent).decode()
    assert sent["user"].startswith("user_") and [t["function"]["name"] for t in sent["tools"]] == ["Read", "Bash"]
    assert sent["messages"][0]["role"] == "system"


def test_thinking_maps_to_reasoning_effort_for_a_reasoning_model(gpt_gw, fake_openai):
    r = post(gpt_gw, claude_code_body(model="claude-opus-4-5", thinking={"type": "enabled", "budget_tokens": 20000}))
    assert r.status_code == 200, r.text
    assert "thinking" not in r.headers["x-helixagent-dropped-params"].split(",")
    sent = fake_openai.calls[-1]["body"]
    assert sent["model"] == "gpt-5" and sent["reasoning_effort"] == "high" and "thinking" not in sent
    r = post(gpt_gw, claude_code_body(model="claude-opus-4-5", thinking={"type": "adaptive"},
                                      output_config={"effort": "max"}))
    assert r.status_code == 200, r.text
    assert fake_openai.calls[-1]["body"]["reasoning_effort"] == "high"  # Anthropic's "max" is OpenAI's "high"


def test_what_would_change_the_meaning_is_refused_for_gpt(gpt_gw, fake_openai):
    for over, needle in [
        ({"mcp_servers": [{"type": "url", "url": "https://mcp.example/sse", "name": "docs"}]}, "mcp_servers"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"messages": [{"role": "user", "content": [{"type": "container_upload", "file_id": "file_1"}]}]},
         "container_upload"),
    ]:
        r = post(gpt_gw, claude_code_body(**over))
        assert r.status_code == 400, r.text
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
        assert needle in err["error"]["message"] and "openai" in err["error"]["message"]
    assert fake_openai.calls == []


def test_tool_result_images_move_to_a_user_message_for_gpt(gpt_gw, fake_openai):
    msgs = [{"role": "user", "content": "look"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                {"type": "text", "text": "the file"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}]
    r = post(gpt_gw, claude_code_body(messages=msgs, tools=TOOLS))
    assert r.status_code == 200, r.text
    sent = fake_openai.calls[-1]["body"]["messages"]
    assert sent[-2] == {"role": "tool", "tool_call_id": "toolu_1", "content": [{"type": "text", "text": "the file"}]}
    assert sent[-1] == {"role": "user", "content": [{"type": "image_url",
                                                     "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}


# -- a Claude newer than the catalogue ----------------------------------------------------------------------

def test_newer_claude_routes_by_family_and_is_priced(make_gateway, fake, fake_openai, caplog):
    p = fake.provider(max_retries=0)
    p.pop("models")
    gw = make_gateway({"auth": {"master_key": MASTER}, "rate_limits": {"cost": {"api_key": {"per_day": 0.003}}},
                       "providers": [fake_openai.provider(max_retries=0, priority=0), p]})
    key = admin_create(gw, user_id="claude-code")["key"]
    caplog.set_level(logging.WARNING, "helixagent.catalogue")
    prompt = " ".join(f"w{i}" for i in range(200))
    admitted = 0
    for _ in range(20):
        r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": key}, timeout=20, json={
            "model": "claude-sonnet-9-9", "max_tokens": 50, "messages": [{"role": "user", "content": prompt}]})
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "rate_limit_error" and "budget" in r.json()["error"]["message"]
            break
        assert r.status_code == 200, r.text
        assert r.headers["x-helixagent-provider"] == "claude"
        assert float(r.headers["x-helixagent-cost"]) > 0
        admitted += 1
    assert 1 <= admitted < 20  # priced like claude-sonnet-4-5: the dollar budget runs out
    assert fake_openai.calls == [] and fake.calls[-1]["body"]["model"] == "claude-sonnet-9-9"
    warnings = [r for r in caplog.records if "claude-sonnet-9-9" in r.getMessage()]
    assert len(warnings) == 1 and "claude-sonnet-4-5" in warnings[0].getMessage()


# -- streaming --------------------------------------------------------------------------------------------

def test_stream_sdk_beta_to_anthropic(claude_gw, fake):
    c = anthropic.Anthropic(base_url=claude_gw.url, api_key="unused", max_retries=0, timeout=20)
    with c.beta.messages.stream(model=CLAUDE_CODE_MODEL, max_tokens=8000, betas=BETAS.split(","),
                                thinking={"type": "enabled", "budget_tokens": 2000},
                                messages=[{"role": "user", "content": "stream me"}],
                                extra_body={"context_management": CONTEXT_MANAGEMENT}) as s:
        events = list(s)
        final = s.get_final_message()
    for e in events:
        if e.type in ("message_start", "message_delta", "message_stop", "content_block_start",
                      "content_block_delta", "content_block_stop"):
            BETA_EVENT.validate_python(e.model_dump())
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].signature
    call = fake.calls[-1]
    assert call["headers"]["anthropic-beta"] == BETAS and call["body"]["stream"] is True
    assert call["body"]["context_management"] == CONTEXT_MANAGEMENT


def test_stream_raw_claude_code_to_anthropic_and_to_gpt(claude_gw, fake, gpt_gw, fake_openai):
    body = claude_code_body(stream=True)
    r = post(claude_gw, copy.deepcopy(body))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = sse(r, BETA_EVENT)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    assert fake.calls[-1]["body"]["context_management"] == CONTEXT_MANAGEMENT
    r = post(gpt_gw, copy.deepcopy(body))
    assert r.status_code == 200, r.text
    assert set(r.headers["x-helixagent-dropped-params"].split(",")) == {"cache_control", "thinking", *UNKNOWN}
    events = sse(r)
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["tool_use"]
    assert "context_management" not in fake_openai.calls[-1]["body"]


def test_dropped_header_is_bounded_and_names_are_checked(gpt_gw):
    many = {f"field_{i}": i for i in range(50)}
    r = post(gpt_gw, {"model": CLAUDE_CODE_MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                      **many})
    assert r.status_code == 200, r.text
    names = r.headers["x-helixagent-dropped-params"].split(",")
    assert len(names) == 33 and names[-1] == "+18 more"
    r = post(gpt_gw, {"model": CLAUDE_CODE_MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                      "bad\r\nx-injected: 1": 1})
    assert r.status_code == 400 and "x-injected" not in r.headers
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_untranslated_fields_are_part_of_the_cache_key(make_gateway, fake):
    """Two requests that differ only in a field HelixAgent does not translate reach the upstream twice."""
    gw = make_gateway({"providers": [fake.provider(max_retries=0)], "cache": {"enabled": True}})
    body = {"model": "claude-sonnet-4-5", "max_tokens": 20, "temperature": 0,
            "messages": [{"role": "user", "content": "cache me"}]}
    hits = []
    for extra in ({"context_management": CONTEXT_MANAGEMENT}, {"context_management": CONTEXT_MANAGEMENT},
                  {"context_management": {"edits": []}}):
        r = post(gw, {**body, **extra}, query="", betas="")
        assert r.status_code == 200, r.text
        hits.append(r.headers.get("x-helixagent-cache"))
    assert hits[1] == "HIT" and hits[2] != "HIT", hits
    assert [c["body"]["context_management"] for c in fake.calls] == [CONTEXT_MANAGEMENT, {"edits": []}]


def test_effort_for_a_model_without_reasoning_is_dropped(gpt_gw, fake_openai):
    r = post(gpt_gw, claude_code_body(output_config={"effort": "high"}))
    assert r.status_code == 200, r.text
    assert {"thinking", "output_config.effort"} <= set(r.headers["x-helixagent-dropped-params"].split(","))
    assert "reasoning_effort" not in fake_openai.calls[-1]["body"]
