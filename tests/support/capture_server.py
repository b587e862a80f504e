"""A recording stand-in for the vendors' APIs, to see what real clients send and to script their turns.

:class:`CaptureServer` (aiohttp, 127.0.0.1, any path) records every request -- method, path, query,
headers (secrets redacted) and body -- and answers with a minimal valid vendor response:

* ``POST .../v1/messages`` (Claude Code, the Anthropic SDK): an Anthropic ``message``, or its SSE event
  sequence when ``"stream": true``; ``POST .../v1/messages/count_tokens``: ``{"input_tokens": N}``
* ``POST .../responses`` (Codex CLI, the OpenAI Agents SDK): the OpenAI Responses event stream in its
  documented order (``response.created``, ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta``/``.done``, ``response.content_part.done``,
  ``response.function_call_arguments.delta``/``.done``, ``response.output_item.done``,
  ``response.completed``, each with its ``sequence_number``), or the ``response`` object when not streamed
* ``POST .../models/{m}:generateContent`` / ``:streamGenerateContent`` (Gemini CLI): a ``candidates`` answer
* ``GET .../models``: a one-model list; anything else: 404 in Anthropic's error shape (and recorded)

What a turn answers is a :class:`Script`: when the request offers one of the script's tools and its
conversation holds no tool result yet, the "model" calls that tool with the script's arguments; otherwise it
answers text -- ``Script.reply`` with ``{tool_output}`` replaced by the last tool result in the
conversation.  Deciding from the conversation (not from a queue) keeps the script right when a client
makes side calls (titles, quota probes) between its turns.

``python tests/support/capture_server.py [--out tests/data/captured]`` runs the installed Claude Code and
Codex CLI (tests/clients/node_modules/.bin) against it and writes their requests as fixtures.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

if __name__ == "__main__":  # run as a script: make `support.*` importable like under pytest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.servers import AiohttpServer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLIENT_BIN = REPO / "tests" / "clients" / "node_modules" / ".bin"
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "cookie", "proxy-authorization"})
REDACTED = "<redacted>"
# headers that describe one connection or one body, not the client: never compared or replayed
HOP_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive"})


def redact_headers(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers.items():
        k = k.lower()
        out[k] = REDACTED if k in SECRET_HEADERS else v
    return out


def redact_query(query: Any) -> dict[str, str]:
    return {k: (REDACTED if k.lower() in ("key", "api_key", "api-key") else v) for k, v in query.items()}


@dataclass
class Script:
    """What the stand-in model does.  ``tools`` maps a tool name to the arguments to call it with (the first
    name the request offers wins); ``reply`` is the text answer (``{tool_output}`` = last tool result)."""
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    reply: str = "hi"

    def decide_anthropic(self, body: dict[str, Any]) -> tuple[str, Any]:
        offered = [t.get("name") for t in body.get("tools") or () if isinstance(t, dict)]
        results = [b for m in body.get("messages") or () if m.get("role") == "user" and isinstance(m.get("content"), list)
                   for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
        if not results:
            for name, args in self.tools.items():
                if name in offered:
                    return "tool", (name, args)
        out = ""
        if results:
            c = results[-1].get("content")
            out = c if isinstance(c, str) else "".join(x.get("text", "") for x in c or () if isinstance(x, dict))
        return "text", self.reply.replace("{tool_output}", out.strip())

    def decide_responses(self, body: dict[str, Any]) -> tuple[str, Any]:
        offered = [t.get("name") or t.get("type") for t in body.get("tools") or () if isinstance(t, dict)]
        items = body.get("input")
        items = items if isinstance(items, list) else []
        results = [i for i in items if isinstance(i, dict)
                   and i.get("type") in ("function_call_output", "custom_tool_call_output", "local_shell_call_output")]
        if not results:
            for name, args in self.tools.items():
                if name in offered:
                    return "tool", (name, args)
        out = ""
        if results:
            o = results[-1].get("output")
            if isinstance(o, list):
                o = "".join(x.get("text", "") for x in o if isinstance(x, dict))
            out = o if isinstance(o, str) else orjson.dumps(o).decode()
        return "text", self.reply.replace("{tool_output}", out.strip())


def _sse(name: str | None, data: dict[str, Any]) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


# -- Anthropic Messages ------------------------------------------------------------------------------------
def anthropic_message(body: dict[str, Any], decision: tuple[str, Any], n: int) -> dict[str, Any]:
    kind, what = decision
    if kind == "tool":
        name, args = what
        content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_capture{n:04d}", "name": name, "input": args}]
        stop = "tool_use"
    else:
        content, stop = [{"type": "text", "text": what}], "end_turn"
    return {"id": f"msg_capture{n:04d}", "type": "message", "role": "assistant", "model": body.get("model", "x"),
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}


def anthropic_events(msg: dict[str, Any]) -> list[bytes]:
    """Anthropic's documented SSE sequence for ``msg``."""
    out = [_sse("message_start", {"type": "message_start", "message": dict(
        msg, content=[], stop_reason=None, stop_sequence=None, usage=dict(msg["usage"], output_tokens=1))})]
    for i, b in enumerate(msg["content"]):
        if b["type"] == "text":
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i,
                                                    "content_block": {"type": "text", "text": ""}}))
            out.append(_sse("ping", {"type": "ping"}))
            words = b["text"].split(" ")
            for k, w in enumerate(words):
                out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                    "type": "text_delta", "text": w if k == 0 else " " + w}}))
        else:
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}}))
            args = orjson.dumps(b["input"]).decode()
            for k in range(0, len(args), 16):
                out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                    "type": "input_json_delta", "partial_json": args[k:k + 16]}}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"],
                                                                         "stop_sequence": None},
                                      "usage": {"output_tokens": msg["usage"]["output_tokens"]}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return out


# -- OpenAI Responses --------------------------------------------------------------------------------------
def responses_events(body: dict[str, Any], decision: tuple[str, Any], n: int) -> tuple[list[bytes], dict[str, Any]]:
    """The Responses stream for one answer (and the final ``response`` object)."""
    rid = f"resp_capture{n:04d}{uuid.uuid4().hex[:8]}"
    base: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model", "x"), "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": body.get("store", True), "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "top_p": 1.0, "truncation": "disabled", "usage": None, "user": None,
        "metadata": {}}
    seq = 0
    events: list[bytes] = []

    def emit(etype: str, **data: Any) -> None:
        nonlocal seq
        events.append(_sse(etype, {"type": etype, "sequence_number": seq, **data}))
        seq += 1

    emit("response.created", response=base)
    emit("response.in_progress", response=base)
    kind, what = decision
    if kind == "tool":
        name, args = what
        arguments = orjson.dumps(args).decode()
        item: dict[str, Any] = {"id": f"fc_capture{n:04d}", "type": "function_call", "status": "in_progress",
                                "arguments": "", "call_id": f"call_capture{n:04d}", "name": name}
        emit("response.output_item.added", output_index=0, item=item)
        for k in range(0, len(arguments), 16):
            emit("response.function_call_arguments.delta", item_id=item["id"], output_index=0,
                 delta=arguments[k:k + 16])
        emit("response.function_call_arguments.done", item_id=item["id"], output_index=0, arguments=arguments)
        item = dict(item, arguments=arguments, status="completed")
        emit("response.output_item.done", output_index=0, item=item)
    else:
        text = what
        item = {"id": f"msg_capture{n:04d}", "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}
        emit("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": []}
        emit("response.content_part.added", item_id=item["id"], output_index=0, content_index=0, part=part)
        for k, w in enumerate(text.split(" ")):
            emit("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                 delta=w if k == 0 else " " + w, logprobs=[])
        emit("response.output_text.done", item_id=item["id"], output_index=0, content_index=0, text=text, logprobs=[])
        part = dict(part, text=text)
        emit("response.content_part.done", item_id=item["id"], output_index=0, content_index=0, part=part)
        item = dict(item, status="completed", content=[part])
        emit("response.output_item.done", output_index=0, item=item)
    final = dict(base, status="completed", output=[item], usage={
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15})
    emit("response.completed", response=final)
    return events, final


class CaptureServer:
    """Record every request; answer as the vendor would (see the module docstring)."""

    def __init__(self, script: Script | None = None, api_key: str | None = None) -> None:
        self.script = script or Script()
        self.api_key = api_key  # when set, a request without it (bearer, x-api-key, x-goog-api-key) is a 401
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = AiohttpServer(app)

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.close()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: Any
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        rec = {"method": request.method, "path": request.path, "query": redact_query(request.query),
               "headers": redact_headers(request.headers), "body": body}
        with self._lock:
            self.requests.append(rec)
            n = len(self.requests)
        if self.api_key is not None:
            rec["authorized"] = self.api_key in (
                request.headers.get("authorization", "").removeprefix("Bearer "), request.headers.get("x-api-key"),
                request.headers.get("x-goog-api-key"), request.query.get("key"))
            if not rec["authorized"]:
                return web.json_response({"error": {"message": "Incorrect API key provided", "param": None,
                                                    "type": "invalid_request_error", "code": "invalid_api_key"}},
                                         status=401)
        path = request.path
        if request.method == "POST" and path.endswith("/messages/count_tokens"):
            return web.json_response({"input_tokens": 10})
        if request.method == "POST" and path.endswith("/messages") and isinstance(body, dict):
            msg = anthropic_message(body, self.script.decide_anthropic(body), n)
            if not body.get("stream"):
                return web.json_response(msg, headers={"request-id": f"req_capture{n}"})
            return await self._stream(request, anthropic_events(msg), {"request-id": f"req_capture{n}"})
        if request.method == "POST" and path.endswith("/responses") and isinstance(body, dict):
            events, final = responses_events(body, self.script.decide_responses(body), n)
            if not body.get("stream"):
                return web.json_response(final, headers={"x-request-id": f"req_capture{n}"})
            return await self._stream(request, events, {"x-request-id": f"req_capture{n}"})
        if request.method == "POST" and (":generateContent" in path or ":streamGenerateContent" in path):
            answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": self.script.reply}]},
                                      "finishReason": "STOP", "index": 0}],
                      "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
                      "modelVersion": path.rsplit("/", 1)[-1].split(":")[0]}
            if ":streamGenerateContent" in path:
                return await self._stream(request, [_sse(None, answer)], {})
            return web.json_response(answer)
        if request.method == "GET" and path.rstrip("/").endswith("/models"):
            return web.json_response({"object": "list", "data": [
                {"id": "capture-model", "object": "model", "created": 0, "owned_by": "capture"}]})
        return web.json_response({"type": "error", "error": {"type": "not_found_error",
                                                             "message": f"capture: no {request.method} {path}"}},
                                 status=404)

    @staticmethod
    async def _stream(request: web.Request, events: list[bytes], headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                           "cache-control": "no-cache", **headers})
        await resp.prepare(request)
        for e in events:
            await resp.write(e)
        await resp.write_eof()
        return resp


# -- the clients' environments ------------------------------------------------------------------------------
def client_bin(name: str) -> str:
    """The project-local client executable (installed by scripts/test-setup.sh)."""
    return str(CLIENT_BIN / name)


def claude_env(home: str, base_url: str, api_key: str) -> dict[str, str]:
    """Claude Code pointed at ``base_url``: a private HOME, no telemetry, no update checks, no side traffic."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "OPENAI_"))}
    env.update({"HOME": home, "XDG_CONFIG_HOME": os.path.join(home, ".config"), "ANTHROPIC_BASE_URL": base_url,
                "ANTHROPIC_API_KEY": api_key, "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
                "DISABLE_ERROR_REPORTING": "1", "DISABLE_BUG_COMMAND": "1",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
                "CI": "1", "NO_COLOR": "1"})
    return env


def codex_home(home: str, base_url: str, key_env: str = "HELIX_CODEX_KEY", model: str = "gpt-5.1",
               openai_tools: bool = True) -> str:
    """A CODEX_HOME whose config.toml points Codex at ``base_url`` (``.../v1``) with the Responses wire API
    (every key is accepted by ``codex exec --strict-config``).  ``openai_tools=False`` drops the tools only
    an OpenAI upstream serves: the built-in ``web_search`` and the ``namespace`` tool of the sub-agents."""
    ch = os.path.join(home, "codex")
    os.makedirs(ch, exist_ok=True)
    Path(ch, "config.toml").write_text(f'''model = "{model}"
model_provider = "helixagent"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false
{'' if openai_tools else 'web_search = "disabled"'}

[analytics]
enabled = false

[model_providers.helixagent]
name = "HelixAgent"
base_url = "{base_url}"
env_key = "{key_env}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 60000
{'' if openai_tools else '[agents]' + chr(10) + 'enabled = false'}
''')
    return ch


def codex_env(home: str, base_url: str, api_key: str, key_env: str = "HELIX_CODEX_KEY",
              model: str = "gpt-5.1", openai_tools: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_", "ANTHROPIC_"))}
    env.update({"HOME": home, "CODEX_HOME": codex_home(home, base_url, key_env, model, openai_tools),
                key_env: api_key, "NO_COLOR": "1", "RUST_LOG": "error"})
    return env


def gemini_env(home: str, base_url: str, api_key: str) -> dict[str, str]:
    """Gemini CLI pointed at ``base_url`` (it appends ``/v1beta/models/...``): API-key auth, no telemetry,
    no update checks, the working directory trusted (headless runs refuse an untrusted one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "GOOGLE_"))}
    os.makedirs(os.path.join(home, ".gemini"), exist_ok=True)
    Path(home, ".gemini", "settings.json").write_bytes(orjson.dumps({
        "privacy": {"usageStatisticsEnabled": False}, "telemetry": {"enabled": False},
        "general": {"disableAutoUpdate": True, "disableUpdateNag": True},
        "security": {"auth": {"selectedType": "gemini-api-key"}}}))
    env.update({"HOME": home, "GEMINI_API_KEY": api_key, "GOOGLE_GEMINI_BASE_URL": base_url,
                "GEMINI_CLI_TRUST_WORKSPACE": "true", "GEMINI_CLI_NO_RELAUNCH": "true", "NO_COLOR": "1"})
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def capture(out_dir: Path) -> None:
    """Run each installed client against a CaptureServer and write what it sent to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, Script, list[str], str]] = [
        ("claude_code_say_hi", Script(), ["-p", "say hi", "--output-format", "json"], "claude"),
        ("claude_code_tool_turn", Script(tools={"Bash": {"command": "echo helix-$((6*7))",
                                                         "description": "Print a number"}},
                                         reply="The tool said: {tool_output}"),
         ["-p", "run the shell command `echo helix-$((6*7))`", "--output-format", "json",
          "--allowedTools", "Bash(echo:*)"], "claude"),
        ("codex_say_hi", Script(), ["exec", "--skip-git-repo-check", "say hi"], "codex"),
        ("codex_tool_turn", Script(tools=dict(CODEX_SHELL_CALLS), reply="The tool said: {tool_output}"),
         ["exec", "--skip-git-repo-check", "run the shell command `echo helix-$((6*7))`"], "codex"),
        ("gemini_cli_say_hi", Script(), ["-m", "gemini-2.5-flash", "-p", "say hi", "--output-format", "json"],
         "gemini"),
    ]
    for name, script, args, client in runs:
        srv = CaptureServer(script)
        with tempfile.TemporaryDirectory(prefix="helix-capture-") as home:
            work = os.path.join(home, "work")
            os.makedirs(work)
            if client == "claude":
                env = claude_env(home, srv.url, "sk-ant-capture-placeholder")
            elif client == "gemini":
                env = gemini_env(home, srv.url, "capture-placeholder")
            else:
                env = codex_env(home, srv.url + "/v1", "sk-capture-placeholder")
            try:
                proc = _run([client_bin(client), *args], env, work)
                print(f"{name}: exit {proc.returncode}\n  stdout: {proc.stdout[-800:]!r}\n  stderr: {proc.stderr[-800:]!r}")
            finally:
                srv.close()
        reqs = srv.requests
        (out_dir / f"{name}.json").write_bytes(orjson.dumps(
            {"client": client, "version": client_version(client), "argv": args, "requests": reqs},
            option=orjson.OPT_INDENT_2) + b"\n")
        print(f"  {len(reqs)} requests: " + ", ".join(f"{r['method']} {r['path']}" for r in reqs))


# the shell tool under each name Codex has offered it (arguments shaped for each)
CODEX_SHELL_CALLS: dict[str, dict[str, Any]] = {
    "shell": {"command": ["bash", "-lc", "echo helix-$((6*7))"]},
    "shell_command": {"command": "echo helix-$((6*7))"},
    "exec_command": {"cmd": "echo helix-$((6*7))"},
}


def client_version(client: str) -> str:
    proc = subprocess.run([client_bin(client), "--version"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HOME=tempfile.gettempdir()), stdin=subprocess.DEVNULL)
    return proc.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "tests" / "data" / "captured"))
    capture(Path(ap.parse_args().out))


if __name__ == "__main__":
    main()
