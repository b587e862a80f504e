"""A fake Anthropic Messages API, written to the documented wire format, served over real HTTP.

``POST /v1/messages`` checks ``x-api-key`` and ``anthropic-version``, validates the request the way the
API does (model, max_tokens, messages, roles, temperature 0..1, tool_result placement), and answers a
``message`` object or the SSE event sequence (message_start, content_block_start/delta/stop with
text_delta and input_json_delta, ping, message_delta, message_stop).  When the request has tools and
tool_choice is not none, the model "calls" the first (or the forced) tool with ``{"q": <last user text>}``;
otherwise it echoes the last user text.  With ``thinking`` enabled/adaptive the answer starts with a
signed ``thinking`` block (streamed as an empty block, ``thinking_delta`` events, one ``signature_delta``,
as documented), plus a ``redacted_thinking`` block when the user text contains "redact"; thinking blocks
sent back in the history must carry the signature the fake issued.  Each request is recorded in ``calls``
exactly as it came (``raw`` bytes, parsed ``body``, ``query`` string, ``headers``).  Errors use Anthropic's body ``{"type": "error", "error": {...}}``.

Faults (queued with :meth:`FakeAnthropic.push`):

* ``Fault(status=529)`` -> overloaded_error; ``Fault(status=429, headers={"retry-after": "3"})``
* ``Fault(error_after=3, error_type="overloaded_error")`` -> an ``error`` event after 3 events
* ``Fault(cut_after=3)`` -> the connection drops after 3 events; ``Fault(reset=True)``, ``Fault(delay=..)``
* ``Fault(json_answer=True)`` -> a streamed request is answered with the plain JSON ``message``
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from fakes.openai_upstream import Fault as _BaseFault
from support.servers import AiohttpServer

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}
ERROR_MESSAGES = {529: "Overloaded", 429: "Number of request tokens has exceeded your per-minute rate limit",
                  500: "Internal server error"}


@dataclass
class Fault(_BaseFault):
    error_after: int | None = None
    error_type: str = "overloaded_error"


def signature(thinking: str) -> str:
    """The fake's thinking-block signature (Anthropic's is opaque; ours is checkable when it comes back)."""
    return base64.b64encode(hashlib.sha256(b"fake-claude:" + thinking.encode()).digest()).decode()


def error_body(status: int, message: str | None = None, etype: str | None = None) -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype or ERROR_TYPES.get(status, "api_error"),
                                       "message": message or ERROR_MESSAGES.get(status, f"error {status}")},
            "request_id": "req_fake"}


class FakeAnthropic:
    def __init__(self, api_key: str = "sk-ant-test-upstream-key-123456", words: int = 5):
        self.api_key = api_key
        self.words = words
        self.calls: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.cache_read = 0          # reported as usage.cache_read_input_tokens
        self.cache_creation = 0
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        self.server = AiohttpServer(app)

    @property
    def url(self) -> str:
        return self.server.url

    def push(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.calls.clear()
        self.faults.clear()
        self.cache_read = self.cache_creation = 0

    def close(self) -> None:
        self.server.close()

    def provider(self, name: str = "claude", **extra: Any) -> dict[str, Any]:
        d = {"name": name, "type": "anthropic", "base_url": self.url, "api_key": self.api_key,
             "models": ["claude-3-5-haiku-latest", "claude-sonnet-4-5"], "priority": 1}
        d.update(extra)
        return d

    # -- validation (what the real API rejects) ------------------------------------------------------
    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body: Input should be an object"
        for k in ("model", "max_tokens", "messages"):
            if k not in body:
                return f"{k}: Field required"
        if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            return "max_tokens: Input should be a positive integer"
        t = body.get("temperature")
        if t is not None and not 0 <= t <= 1:
            return "temperature: Input should be less than or equal to 1"
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "messages: at least one message is required"
        tool_ids: set[str] = set()
        for i, m in enumerate(msgs):
            if m.get("role") not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            c = m.get("content")
            if isinstance(c, str):
                continue
            if not isinstance(c, list):
                return f"messages.{i}.content: Input should be a valid list"
            seen_other = False
            for j, b in enumerate(c):
                bt = b.get("type")
                if bt not in ("text", "image", "tool_use", "tool_result", "document", "thinking", "redacted_thinking",
                              "server_tool_use", "web_search_tool_result", "search_result", "container_upload"):
                    return f"messages.{i}.content.{j}.type: Input tag '{bt}' found does not match any of the expected tags"
                if bt == "text" and not b.get("text"):
                    return "messages: text content blocks must be non-empty"
                if bt == "tool_use":
                    if m["role"] != "assistant" or not isinstance(b.get("input"), dict):
                        return f"messages.{i}.content.{j}: invalid tool_use block"
                    tool_ids.add(b.get("id"))
                if bt == "tool_result":
                    if m["role"] != "user" or seen_other:
                        return f"messages.{i}.content.{j}: tool_result blocks must come first in a user message"
                    if b.get("tool_use_id") not in tool_ids:
                        return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                                f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                                "`tool_use` block in the previous message.")
                else:
                    seen_other = True
                if bt == "thinking" and (m["role"] != "assistant" or b.get("signature") != signature(b.get("thinking", ""))):
                    return f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                if bt == "redacted_thinking" and (m["role"] != "assistant" or not b.get("data")):
                    return f"messages.{i}.content.{j}: invalid redacted_thinking block"
                if bt == "image":
                    src = b.get("source") or {}
                    if src.get("type") not in ("base64", "url", "file"):
                        return f"messages.{i}.content.{j}.source: invalid image source"
        th = body.get("thinking")
        if th is not None:
            if th.get("type") not in ("enabled", "adaptive", "disabled"):
                return "thinking.type: Input tag found does not match any of the expected tags"
            if th["type"] == "enabled" and not (1024 <= int(th.get("budget_tokens") or 0) < body["max_tokens"]):
                return "thinking.enabled.budget_tokens: must be >= 1024 and less than max_tokens"
        s = body.get("system")
        if s is not None and not isinstance(s, (str, list)):
            return "system: Input should be a valid string or list"
        for k, t in enumerate(body.get("tools") or ()):
            if "name" not in t or ("input_schema" not in t and "type" not in t):
                return f"tools.{k}: name and input_schema are required"
        oc = body.get("output_config")
        if oc is not None:
            if set(oc) - {"format", "effort"}:
                return "output_config: Extra inputs are not permitted"
            if oc.get("format") is not None and (oc["format"].get("type") != "json_schema"
                                                 or not isinstance(oc["format"].get("schema"), dict)):
                return "output_config.format: expected {type: json_schema, schema}"
            if oc.get("effort") not in (None, "low", "medium", "high", "xhigh", "max"):
                return "output_config.effort: invalid"
        tc = body.get("tool_choice")
        if tc is not None and tc.get("type") not in ("auto", "any", "tool", "none"):
            return "tool_choice.type: invalid"
        for k in ("n", "logprobs", "presence_penalty", "frequency_penalty", "seed", "response_format", "stop",
                  "user", "tool_calls"):
            if k in body:
                return f"{k}: Extra inputs are not permitted"
        return None

    @staticmethod
    def _last_user_text(body: dict[str, Any]) -> str:
        for m in reversed(body["messages"]):
            if m["role"] != "user":
                continue
            c = m["content"]
            if isinstance(c, str):
                return c
            texts = [b.get("text", "") for b in c if b.get("type") == "text"]
            if texts:
                return " ".join(texts)
            res = [b for b in c if b.get("type") == "tool_result"]
            if res:
                rc = res[0].get("content")
                return rc if isinstance(rc, str) else " ".join(x.get("text", "") for x in rc or ())
        return ""

    def _error(self, status: int, message: str | None = None, headers: dict[str, str] | None = None,
               etype: str | None = None) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(error_body(status, message, etype)),
                            content_type="application/json", headers=headers or {})

    # -- endpoint --------------------------------------------------------------------------------------
    async def messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(400, "There was an issue with the format or content of your request.")
        # the exact request: raw bytes, parsed body, query string and headers
        self.calls.append({"path": request.path, "query": request.query_string, "raw": raw, "body": body,
                           "headers": {k.lower(): v for k, v in request.headers.items()}, "t": time.time()})
        # API keys go in x-api-key; newer SDKs send them as a Bearer token, which the API accepts too
        if request.headers.get("x-api-key") != self.api_key and \
                request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required")
        fault = self.faults.pop(0) if self.faults else None
        if fault is not None:
            if fault.hang:
                await asyncio.sleep(3600)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
            if fault.status:
                return self._error(fault.status, fault.message, fault.headers)
        problem = self._invalid(body)
        if problem:
            return self._error(400, problem)
        if body["model"] == "missing-model":
            return self._error(404, f"model: {body['model']}")

        text = self._last_user_text(body)
        words = [f"echo:{w}" for w in text.split()][: self.words] or ["ok"]
        stop_reason, stop_seq = "end_turn", None
        for s in body.get("stop_sequences") or ():
            for k, w in enumerate(words):
                if s in w:
                    words, stop_reason, stop_seq = words[:k], "stop_sequence", s
                    break
            if stop_seq:
                break
        if len(words) > body["max_tokens"]:
            words, stop_reason = words[: body["max_tokens"]], "max_tokens"
        tools = body.get("tools") or []
        oc = body.get("output_config")
        if oc is not None:
            if set(oc) - {"format", "effort"}:
                return "output_config: Extra inputs are not permitted"
            if oc.get("format") is not None and (oc["format"].get("type") != "json_schema"
                                                 or not isinstance(oc["format"].get("schema"), dict)):
                return "output_config.format: expected {type: json_schema, schema}"
            if oc.get("effort") not in (None, "low", "medium", "high", "xhigh", "max"):
                return "output_config.effort: invalid"
        tc = body.get("tool_choice") or {"type": "auto"}
        tool = None
        if tools and tc.get("type") != "none":
            tool = next((t for t in tools if t["name"] == tc.get("name")), tools[0]) if tc.get("type") == "tool" else tools[0]
        content: list[dict[str, Any]] = []
        if (body.get("thinking") or {}).get("type") in ("enabled", "adaptive"):
            # extended thinking: a signed thinking block first (and a redacted one when asked to)
            thought = f"The user wrote {text!r}; answer by echoing."
            content.append({"type": "thinking", "thinking": thought, "signature": signature(thought)})
            if "redact" in text:
                content.append({"type": "redacted_thinking", "data": "RWNyeXB0ZWQgcmVhc29uaW5n"})
        if tool is not None:
            content.append({"type": "text", "text": "Let me check."})
            content.append({"type": "tool_use", "id": f"toolu_fake{len(self.calls):04d}", "name": tool["name"],
                            "input": {"q": text}})
            stop_reason, stop_seq = "tool_use", None
        elif words:
            content.append({"type": "text", "text": " ".join(words)})
        in_tokens = sum(len(str(m.get("content")).split()) for m in body["messages"]) + 3
        out_tokens = len(words) if tool is None else 20
        usage = {"input_tokens": in_tokens, "output_tokens": out_tokens,
                 "cache_creation_input_tokens": self.cache_creation, "cache_read_input_tokens": self.cache_read}
        msg = {"id": f"msg_fake{len(self.calls):04d}", "type": "message", "role": "assistant", "model": body["model"],
               "content": content, "stop_reason": stop_reason, "stop_sequence": stop_seq, "usage": usage}
        if not body.get("stream") or (fault is not None and fault.json_answer):
            return web.json_response(msg, dumps=lambda o: orjson.dumps(o).decode(),
                                     headers={"request-id": "req_fake"})

        events: list[tuple[str, dict[str, Any]]] = []
        start = dict(msg, content=[], stop_reason=None, stop_sequence=None,
                     usage=dict(usage, output_tokens=1))
        events.append(("message_start", {"type": "message_start", "message": start}))
        for i, b in enumerate(content):
            if b["type"] == "thinking":  # Anthropic's documented sequence: empty block, thinking_delta*, signature_delta
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "thinking", "thinking": "", "signature": ""}}))
                parts = b["thinking"].split(" ")
                for k, w in enumerate(parts):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "thinking_delta", "thinking": w if k == 0 else " " + w}}))
                events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                    "type": "signature_delta", "signature": b["signature"]}}))
            elif b["type"] == "redacted_thinking":
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": b}))
            elif b["type"] == "text":
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "text", "text": ""}}))
                if i == 0:
                    events.append(("ping", {"type": "ping"}))
                parts = b["text"].split(" ")
                for k, w in enumerate(parts):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "text_delta", "text": w if k == 0 else " " + w}}))
            else:
                events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                    "type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}}))
                args = orjson.dumps(b["input"]).decode()
                events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "input_json_delta", "partial_json": ""}}))
                for k in range(0, len(args), 6):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "input_json_delta", "partial_json": args[k:k + 6]}}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop_reason, "stop_sequence": stop_seq},
                                         "usage": {"output_tokens": out_tokens}}))
        events.append(("message_stop", {"type": "message_stop"}))

        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                           "cache-control": "no-cache", "request-id": "req_fake"})
        await resp.prepare(request)
        for i, (name, data) in enumerate(events):
            if fault is not None and fault.cut_after is not None and i >= fault.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if fault is not None and fault.error_after is not None and i >= fault.error_after:
                err = error_body(529, fault.message, fault.error_type)
                err.pop("request_id")
                await resp.write(b"event: error\ndata: " + orjson.dumps(err) + b"\n\n")
                await resp.write_eof()
                return resp
            if fault is not None and fault.chunk_delay:
                await asyncio.sleep(fault.chunk_delay)
            await resp.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")
        await resp.write_eof()
        return resp


class ScriptedAnthropic(FakeAnthropic):
    """Scripted mode, for the real-client tests (tests/test_real_clients.py): the same server, key check and
    request validation as :class:`FakeAnthropic`, but each turn is answered from a
    :class:`support.capture_server.Script` -- a ``tool_use`` of a tool the client offers (e.g. Claude Code's
    ``Bash``) while the conversation has no ``tool_result``, then text quoting the tool's output -- so a real
    agent runs a whole tool loop.  ``calls`` entries also carry the ``query`` (``?beta=true``).

    Claude Code sends ``role: "system"`` entries inside ``messages`` (environment notes between turns), which
    the Messages API accepts; the validation here lets them through and checks everything else as the base
    class does."""

    def __init__(self, script: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.script = script

    async def messages(self, request: web.Request) -> web.StreamResponse:
        from support.capture_server import anthropic_events, anthropic_message
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(400, "There was an issue with the format or content of your request.")
        self.calls.append({"path": request.path, "query": dict(request.query), "body": body, "t": time.time(),
                           "headers": {k.lower(): v for k, v in request.headers.items()}})
        if request.headers.get("x-api-key") != self.api_key and \
                request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self._error(400, "anthropic-version: header is required")
        checked = body
        if isinstance(body, dict) and isinstance(body.get("messages"), list):
            rest = [m for m in body["messages"] if not (isinstance(m, dict) and m.get("role") == "system")]
            checked = dict(body, messages=rest)
            bad = next((m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "system"
                        and not isinstance(m.get("content"), (str, list))), None)
            if bad is not None:
                return self._error(400, "messages: a system message needs string or list content")
        problem = self._invalid(checked)
        if problem:
            return self._error(400, problem)
        msg = anthropic_message(body, self.script.decide_anthropic(body), len(self.calls))
        if not body.get("stream"):
            return web.json_response(msg, dumps=lambda o: orjson.dumps(o).decode(),
                                     headers={"request-id": "req_fake"})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8",
                                           "cache-control": "no-cache", "request-id": "req_fake"})
        await resp.prepare(request)
        for event in anthropic_events(msg):
            await resp.write(event)
        await resp.write_eof()
        return resp
