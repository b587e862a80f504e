"""The clients people put in front of a gateway, unchanged, through HelixAgent (issue 14).

(a) Replays: the requests Claude Code, Codex CLI and Gemini CLI really send (captured by
    tests/support/capture_server.py into tests/data/captured/) are sent to the gateway byte for byte --
    body, headers, query -- with fake upstreams behind it, and the answer must be a 2xx in the client's own
    format, every streamed event validated with the vendor SDK's types.
(b) Real clients: the installed programs (scripts/test-setup.sh puts them in tests/clients/node_modules)
    run non-interactively against the gateway and complete a tool-using turn: the scripted upstream asks
    for a shell command, the client runs it, and the answer quotes its output (``helix-42``, which only the
    shell's arithmetic produces).  Each run is bounded by a 120 s timeout.

A missing client program is a failure naming the set-up step, never a skip.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import orjson
import pytest
from anthropic.types import RawMessageStreamEvent
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from fakes.anthropic_upstream import ScriptedAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from support.capture_server import (HOP_HEADERS, REDACTED, CaptureServer, Script, claude_env, client_bin,
                                    codex_env, gemini_env)
from support.servers import GatewayServer

DATA = Path(__file__).parent / "data" / "captured"
KEY = "sk-helix-master-real-clients-0123456789"
RUN_TIMEOUT = 120
SHELL = "echo helix-$((6*7))"          # prints helix-42: the answer can only quote it if the command ran
CLAUDE_BASH = {"command": SHELL, "description": "Print a number"}
CODEX_EXEC = {"cmd": SHELL}
ANTHROPIC_EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def load(name: str) -> dict[str, Any]:
    return dict(orjson.loads((DATA / f"{name}.json").read_bytes()))


def binary(name: str) -> str:
    path = client_bin(name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run scripts/test-setup.sh (npm ci in tests/clients)")
    return path


def no_family_models(provider: dict[str, Any]) -> dict[str, Any]:
    """A provider entry with no ``models:`` list, so model names route by family (``claude-*``, ``gpt-*``)."""
    provider = dict(provider)
    provider.pop("models", None)
    return provider


@pytest.fixture
def scripted_anthropic() -> Iterator[Callable[[Script], ScriptedAnthropic]]:
    made: list[ScriptedAnthropic] = []

    def make(script: Script) -> ScriptedAnthropic:
        up = ScriptedAnthropic(script)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


@pytest.fixture
def capture_upstream() -> Iterator[Callable[[Script], CaptureServer]]:
    made: list[CaptureServer] = []

    def make(script: Script) -> CaptureServer:
        up = CaptureServer(script, api_key="sk-test-upstream-openai-0123456789")
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def gateway_for(make_gateway: Callable[..., GatewayServer], *providers: dict[str, Any]) -> GatewayServer:
    return make_gateway({"providers": [no_family_models(p) for p in providers], "auth": {"master_key": KEY}})


def openai_capture_provider(up: CaptureServer) -> dict[str, Any]:
    return {"name": "openai", "type": "openai", "base_url": up.url + "/v1", "api_key": up.api_key, "priority": 1}


# -- replaying what the clients sent --------------------------------------------------------------------
def replay(gw: GatewayServer, rec: dict[str, Any]) -> httpx.Response:
    """Send a captured request to the gateway as the client did, its redacted secret replaced by our key."""
    headers: dict[str, str] = {}
    for k, v in rec["headers"].items():
        if k in HOP_HEADERS:
            continue
        if v == REDACTED:
            v = f"Bearer {KEY}" if k == "authorization" else KEY
        headers[k] = v
    with httpx.Client(timeout=60) as h:
        r = h.request(rec["method"], gw.url + rec["path"], params=rec["query"], headers=headers,
                      content=orjson.dumps(rec["body"]))
        r.read()
        return r


def sse(r: httpx.Response) -> list[tuple[str | None, dict[str, Any]]]:
    assert r.headers["content-type"].startswith("text/event-stream"), (r.status_code, r.text[:2000])
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in r.text.replace("\r\n", "\n").split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            out.append((event, orjson.loads("\n".join(data))))
    return out


def anthropic_stream_text(r: httpx.Response) -> tuple[list[str], str]:
    events = sse(r)
    names = []
    text = ""
    for name, data in events:
        assert name == data["type"], (name, data)
        assert name != "error", data
        names.append(name)
        if name == "ping":   # documented keep-alive, not one of the SDK's message events
            continue
        ANTHROPIC_EVENT.validate_python(data)
        if name == "content_block_delta" and data["delta"]["type"] == "text_delta":
            text += data["delta"]["text"]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    return names, text


def responses_stream(r: httpx.Response) -> list[dict[str, Any]]:
    """Every event validated with the openai SDK's ResponseStreamEvent; the documented order checked."""
    events = []
    for name, data in sse(r):
        assert name == data["type"], (name, data)
        RESPONSES_EVENT.validate_python(data)
        events.append(data)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    seqs = [e["sequence_number"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    return events


CLAUDE_REPLAYS = [("claude_code_say_hi", 0), ("claude_code_tool_turn", 0), ("claude_code_tool_turn", 1)]


@pytest.mark.parametrize("fixture,index", CLAUDE_REPLAYS)
def test_replay_claude_code_to_anthropic(make_gateway: Callable[..., GatewayServer],
                                         scripted_anthropic: Callable[[Script], ScriptedAnthropic],
                                         fixture: str, index: int) -> None:
    """Claude Code's own request (``?beta=true``, its ``anthropic-beta`` list, ``context_management``,
    adaptive ``thinking``, a ``system`` entry inside ``messages``, a model newer than the catalogue) is
    answered, and reaches the Anthropic upstream with the betas and unknown fields untouched."""
    rec = load(fixture)["requests"][index]
    up = scripted_anthropic(Script(tools={"Bash": CLAUDE_BASH}, reply="The tool said: {tool_output}"))
    gw = gateway_for(make_gateway, up.provider())
    r = replay(gw, rec)
    assert r.status_code == 200, r.text[:2000]
    names, text = anthropic_stream_text(r)
    if index == 1:   # the history holds Bash's tool_result: the answer quotes it
        assert "helix-42" in text, text
    else:
        assert "tool_use" in r.text, names
    call = up.calls[-1]
    assert call["query"] == rec["query"] == {"beta": "true"}
    assert call["headers"]["anthropic-beta"] == rec["headers"]["anthropic-beta"]
    for field in ("model", "context_management", "thinking", "output_config", "metadata", "max_tokens"):
        assert call["body"][field] == rec["body"][field], field
    assert [t["name"] for t in call["body"]["tools"]] == [t["name"] for t in rec["body"]["tools"]]


CODEX_REPLAYS = [("codex_say_hi", 0), ("codex_tool_turn", 0), ("codex_tool_turn", 1)]


@pytest.mark.parametrize("fixture,index", CODEX_REPLAYS)
def test_replay_codex_to_openai(make_gateway: Callable[..., GatewayServer], fake_openai: FakeOpenAI,
                                fixture: str, index: int) -> None:
    """Codex CLI's request (``store: false``, ``include: [reasoning.encrypted_content]``, ``client_metadata``,
    ``prompt_cache_key``, a built-in ``web_search`` and a ``namespace`` tool, function_call/-_output items)
    goes natively to the OpenAI upstream's ``/v1/responses`` and is answered with the Responses event
    stream, every event an SDK ``ResponseStreamEvent`` in the documented order."""
    rec = load(fixture)["requests"][index]
    gw = gateway_for(make_gateway, fake_openai.provider())
    r = replay(gw, rec)
    assert r.status_code == 200, r.text[:2000]
    events = responses_stream(r)
    assert events[-1]["response"]["status"] == "completed"
    call = fake_openai.calls[-1]
    assert call["path"] == "/v1/responses"
    for field in ("model", "input", "tools", "store", "include", "client_metadata", "prompt_cache_key",
                  "reasoning", "parallel_tool_calls", "tool_choice"):
        assert call["body"][field] == rec["body"][field], field


def test_replay_gemini_cli_to_gemini(make_gateway: Callable[..., GatewayServer]) -> None:
    """Gemini CLI's request (``:streamGenerateContent?alt=sse``, the key in ``x-goog-api-key``, tools,
    ``systemInstruction``, ``generationConfig``) is answered in Gemini's own SSE shape."""
    rec = load("gemini_cli_say_hi")["requests"][0]
    up = FakeGemini()
    try:
        gw = gateway_for(make_gateway, up.provider())
        r = replay(gw, rec)
        assert r.status_code == 200, r.text[:2000]
        chunks = [data for _, data in sse(r)]
        assert chunks and all("candidates" in c or "usageMetadata" in c for c in chunks), chunks
        assert any(c.get("candidates", [{}])[0].get("finishReason") for c in chunks), chunks
    finally:
        up.close()


# -- the real programs ------------------------------------------------------------------------------------
def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def claude_result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    out = dict(orjson.loads(proc.stdout.strip().splitlines()[-1]))
    assert out["type"] == "result" and out["subtype"] == "success" and out["is_error"] is False, out
    return out


def test_claude_code_tool_turn_through_gateway(make_gateway: Callable[..., GatewayServer],
                                               scripted_anthropic: Callable[[Script], ScriptedAnthropic],
                                               tmp_path: Path) -> None:
    """``claude -p`` with its default model, pointed at the gateway by ANTHROPIC_BASE_URL with a HelixAgent
    key: the upstream asks for Bash, Claude Code runs it and sends the tool_result, the answer quotes it."""
    up = scripted_anthropic(Script(tools={"Bash": CLAUDE_BASH}, reply="The tool said: {tool_output}"))
    gw = gateway_for(make_gateway, up.provider())
    work = tmp_path / "work"
    work.mkdir()
    proc = run([binary("claude"), "-p", f"run the shell command `{SHELL}`", "--output-format", "json",
                "--allowedTools", "Bash(echo:*)"], claude_env(str(tmp_path), gw.url, KEY), work)
    out = claude_result(proc)
    assert out["result"] == "The tool said: helix-42", out["result"]
    assert out["num_turns"] == 2, out
    turns = [c for c in up.calls if c["body"].get("tools")]
    assert len(turns) == 2, [c["body"].get("model") for c in up.calls]
    results = [b for m in turns[1]["body"]["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert results and "helix-42" in orjson.dumps(results).decode()
    assert all(c["query"] == {"beta": "true"} for c in up.calls)
    assert KEY not in orjson.dumps(up.calls).decode()   # the client's gateway key never reaches the vendor


def test_claude_code_say_hi_through_gateway(make_gateway: Callable[..., GatewayServer],
                                            scripted_anthropic: Callable[[Script], ScriptedAnthropic],
                                            tmp_path: Path) -> None:
    up = scripted_anthropic(Script(reply="hi from helix"))
    gw = gateway_for(make_gateway, up.provider())
    proc = run([binary("claude"), "-p", "say hi", "--output-format", "json"],
               claude_env(str(tmp_path), gw.url, KEY), tmp_path)
    assert claude_result(proc)["result"] == "hi from helix"


def codex_last_message(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout.strip()


def test_codex_exec_tool_turn_through_gateway_to_openai(make_gateway: Callable[..., GatewayServer],
                                                        capture_upstream: Callable[[Script], CaptureServer],
                                                        tmp_path: Path) -> None:
    """``codex exec`` with a model provider whose base_url is the gateway's ``/v1`` (wire_api responses):
    the OpenAI upstream (Responses wire format) asks for ``exec_command``, Codex runs it, sends the
    function_call_output, and prints the answer that quotes it."""
    up = capture_upstream(Script(tools={"exec_command": CODEX_EXEC}, reply="The tool said: {tool_output}"))
    gw = gateway_for(make_gateway, openai_capture_provider(up))
    work = tmp_path / "work"
    work.mkdir()
    proc = run([binary("codex"), "exec", "--skip-git-repo-check", f"run the shell command `{SHELL}`"],
               codex_env(str(tmp_path), gw.url + "/v1", KEY, model="gpt-5.1"), work)
    answer = codex_last_message(proc)
    assert answer.startswith("The tool said:") and "helix-42" in answer, answer
    turns = [r for r in up.requests if r["path"] == "/v1/responses"]
    assert len(turns) == 2 and all(r["authorized"] for r in turns), turns
    call, output = [i for i in turns[1]["body"]["input"] if i.get("type") in ("function_call", "function_call_output")]
    assert call["name"] == "exec_command" and output["call_id"] == call["call_id"]
    assert "helix-42" in output["output"]
    # natively to OpenAI: what Codex relies on arrives as it sent it
    assert turns[0]["body"]["store"] is False and turns[0]["body"]["include"] == ["reasoning.encrypted_content"]
    assert "client_metadata" in turns[0]["body"] and "web_search" in [t["type"] for t in turns[0]["body"]["tools"]]


def test_codex_exec_tool_turn_through_gateway_to_anthropic(make_gateway: Callable[..., GatewayServer],
                                                           scripted_anthropic: Callable[[Script], ScriptedAnthropic],
                                                           tmp_path: Path) -> None:
    """``codex exec`` with a Claude model: the Responses request is translated to Anthropic Messages (with
    Codex's OpenAI-only built-in tools turned off in its config), Claude's tool_use becomes a
    function_call Codex runs, and its output goes back as a tool_result."""
    up = scripted_anthropic(Script(tools={"exec_command": CODEX_EXEC}, reply="The tool said: {tool_output}"))
    gw = gateway_for(make_gateway, up.provider())
    work = tmp_path / "work"
    work.mkdir()
    proc = run([binary("codex"), "exec", "--skip-git-repo-check", f"run the shell command `{SHELL}`"],
               codex_env(str(tmp_path), gw.url + "/v1", KEY, model="claude-sonnet-4-5", openai_tools=False), work)
    answer = codex_last_message(proc)
    assert answer.startswith("The tool said:") and "helix-42" in answer, answer
    assert len(up.calls) == 2, [c["path"] for c in up.calls]
    second = up.calls[1]["body"]
    uses = [b for m in second["messages"] if m["role"] == "assistant" and isinstance(m["content"], list)
            for b in m["content"] if b.get("type") == "tool_use"]
    results = [b for m in second["messages"] if m["role"] == "user" and isinstance(m["content"], list)
               for b in m["content"] if b.get("type") == "tool_result"]
    assert uses and uses[0]["name"] == "exec_command" and uses[0]["input"] == CODEX_EXEC
    assert results and results[0]["tool_use_id"] == uses[0]["id"] and "helix-42" in orjson.dumps(results).decode()


def test_gemini_cli_through_gateway(make_gateway: Callable[..., GatewayServer],
                                    scripted_anthropic: Callable[[Script], ScriptedAnthropic],
                                    tmp_path: Path) -> None:
    """``gemini -p`` pointed at the gateway by GOOGLE_GEMINI_BASE_URL with a HelixAgent key as
    GEMINI_API_KEY, asking for a Claude model: Gemini's own API in, Anthropic behind it."""
    up = scripted_anthropic(Script(reply="hi from helix"))
    gw = gateway_for(make_gateway, up.provider())
    proc = run([binary("gemini"), "-m", "claude-sonnet-4-5", "-p", "say hi", "--output-format", "json"],
               gemini_env(str(tmp_path), gw.url, KEY), tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    start = proc.stdout.index("{")
    out = orjson.loads(proc.stdout[start:])
    assert out["response"].strip() == "hi from helix", out
    assert up.calls and all(c["body"]["model"] == "claude-sonnet-4-5" for c in up.calls)
