"""A fake OpenAI API server, written to the documented wire format, served over real HTTP.

It answers ``POST /v1/chat/completions`` (JSON and SSE with ``data: [DONE]``, ``stream_options.include_usage``,
tool calls streamed as argument deltas), ``POST /v1/completions`` (legacy), ``POST /v1/embeddings`` and
``GET /v1/models``, ``POST /v1/responses`` (the Responses API: a ``response`` object, or with ``stream``
the documented event sequence -- created, in_progress, output_item.added, content_part.added,
output_text.delta..., the .done events, completed -- with sequence numbers; function tools answered with a
``function_call`` item streamed as argument deltas; a ``reasoning`` item with encrypted_content when
``include`` asks for it; built-in tools accepted and named in ``call["body"]``), checks the bearer key, reasons like DeepSeek for a model whose name contains
"reasoner" (``reasoning_content`` on the message, streamed as ``reasoning_content`` deltas before the
content), and returns OpenAI's error bodies.  Tests queue faults with
:meth:`FakeOpenAI.push`:

* ``Fault(status=429, headers={"retry-after": "1"})`` -- an error response with OpenAI's error body
* ``Fault(delay=2.0)`` -- wait before the response head (slow first byte)
* ``Fault(reset=True)`` -- close the connection without answering
* ``Fault(cut_after=3)`` -- a stream that breaks after 3 chunks (no [DONE])
* ``Fault(hang=True)`` -- never answer
* ``Fault(chunk_delay=0.2)`` -- a slow body: pause between stream chunks
* ``Fault(stall_after=2)`` -- a stream that sends 2 chunks and then goes silent (stays open)
* ``Fault(body_delay=0.2)`` -- a slow non-streamed body: the JSON is sent in 8 pieces, this far apart
* ``Fault(gate=threading.Event())`` -- hold the call until the test sets the event (or the client leaves)
* ``Fault(json_answer=True)`` -- answer a streamed request with the plain JSON completion (as some
  OpenAI-compatible servers do when they ignore ``stream: true``)

Scripted tool loop: set :attr:`FakeOpenAI.tool_args` (e.g. ``{"city": "Paris"}``) and the model calls the
first function tool with exactly those arguments while the conversation holds no tool result, then answers
text (the echo of ``tool said <output>``) once a ``tool`` message / ``function_call_output`` is there -- so
an agent framework runs a whole loop.  Unset (the default), it calls the tool with ``{"q": <last user text>}``
whenever tools are offered.

Each call is recorded in :attr:`FakeOpenAI.calls`; ``call["disconnected"]`` becomes True when the
gateway closed the connection while the fake was still waiting (a delay, a hang or a stall).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from support.servers import AiohttpServer

ERROR_TYPES = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
               403: ("invalid_request_error", "unsupported_country_region_territory"),
               404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
               500: ("server_error", None), 502: ("server_error", None), 503: ("server_error", None)}


@dataclass
class Fault:
    status: int | None = None
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False
    hang: bool = False
    cut_after: int | None = None
    chunk_delay: float = 0.0
    body: bytes | None = None
    stall_after: int | None = None
    body_delay: float = 0.0
    json_answer: bool = False
    gate: Any = None  # a threading.Event: the call waits until it is set


CALL = web.RequestKey("call", dict) if hasattr(web, "RequestKey") else "call"


def _gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


async def _wait(request: web.Request, call: dict[str, Any], seconds: float) -> bool:
    """Sleep up to ``seconds``; return False (and mark the call) as soon as the client goes away."""
    end = time.monotonic() + seconds
    while True:
        if _gone(request):
            call["disconnected"] = True
            return False
        left = end - time.monotonic()
        if left <= 0:
            return True
        await asyncio.sleep(min(0.02, left))


class FakeOpenAI:
    def __init__(self, api_key: str = "sk-test-upstream-key-123456", words: int = 5):
        self.api_key = api_key
        self.words = words
        self.calls: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.sticky: Fault | None = None  # applied to every call while set
        self.inflight = 0
        self.max_inflight = 0
        self.generation = 0
        self.tool_args: dict[str, Any] | None = None  # scripted tool loop (see the module docstring)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        self.server = AiohttpServer(app)

    # -- control ------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def push(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.generation += 1
        self.inflight = 0
        self.max_inflight = 0
        self.calls.clear()
        self.faults.clear()
        self.sticky = None
        self.tool_args = None

    def close(self) -> None:
        self.server.close()

    def provider(self, name: str = "openai", **extra: Any) -> dict[str, Any]:
        """A provider config entry pointing at this fake."""
        d = {"name": name, "type": "openai", "base_url": self.base_url, "api_key": self.api_key,
             "models": ["gpt-4o-mini", "gpt-4o"], "priority": 1}
        d.update(extra)
        return d

    # -- helpers ------------------------------------------------------------------------------------
    def reasoning(self, body: dict[str, Any]) -> str:
        return f"Reasoning about {self._last_user(body)!r} first."

    def _error(self, status: int, message: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        etype, code = ERROR_TYPES.get(status, ("server_error", None))
        body = {"error": {"message": message or f"fake upstream error {status}", "type": etype, "param": None,
                          "code": code}}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                            headers=headers or {})

    async def _intake(self, request: web.Request) -> tuple[dict[str, Any] | None, Fault | None, web.StreamResponse | None]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None, None, self._error(400, "We could not parse the JSON body of your request.")
        call = {"path": request.path, "body": body, "headers": dict(request.headers), "t": time.time(),
                "disconnected": False}
        self.calls.append(call)
        request[CALL] = call
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return body, None, self._error(401, "Incorrect API key provided: " + request.headers.get(
                "Authorization", "")[7:] + ". You can find your API key at https://platform.openai.com/account/api-keys.")
        fault = self.faults.pop(0) if self.faults else self.sticky
        if fault is not None:
            if fault.gate is not None:
                while not fault.gate.is_set():
                    if _gone(request):
                        call["disconnected"] = True
                        return body, fault, web.Response(status=500)
                    await asyncio.sleep(0.01)
            if fault.hang:
                await _wait(request, call, 3600)
                return body, fault, web.Response(status=500)
            if fault.delay and not await _wait(request, call, fault.delay):
                return body, fault, web.Response(status=500)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                return body, fault, web.Response(status=500)
            if fault.status:
                if fault.body is not None:
                    return body, fault, web.Response(status=fault.status, body=fault.body, headers=fault.headers)
                return body, fault, self._error(fault.status, fault.message, fault.headers)
        return body, fault, None

    @staticmethod
    def _last_user(body: dict[str, Any]) -> str:
        for m in reversed(body.get("messages") or []):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    return " ".join(p.get("text", "") for p in c if p.get("type") == "text")
                return c or ""
        return str(body.get("prompt", ""))

    def _answer(self, body: dict[str, Any]) -> list[str]:
        text = self._last_user(body)
        last = (body.get("messages") or [{}])[-1]
        if self.tool_args is not None and last.get("role") == "tool":   # scripted loop: answer from the result
            text = "tool said " + str(last.get("content"))
        words = [f"echo:{w}" for w in text.split()][: self.words] or ["ok"]
        mt = body.get("max_tokens") or body.get("max_completion_tokens")
        if mt:
            words = words[:mt]
        return words

    # -- endpoints ----------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        gen = self.generation  # requests left over from an earlier test do not count
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._chat(request)
        finally:
            if gen == self.generation:
                self.inflight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._intake(request)
        if early is not None:
            return early
        assert body is not None
        if not body.get("messages"):
            return self._error(400, "Missing required parameter: 'messages'.")
        model = body.get("model")
        if model == "missing-model":
            return self._error(404, f"The model `{model}` does not exist or you do not have access to it.")
        cid = "chatcmpl-fake" + str(len(self.calls))
        created = int(time.time())
        tools = body.get("tools")
        words = self._answer(body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in body["messages"])
        tool_call = None
        answered = self.tool_args is not None and any(m.get("role") == "tool" for m in body["messages"])
        if tools and body.get("tool_choice") != "none" and not answered:
            fn = tools[0]["function"]["name"]
            args = self.tool_args if self.tool_args is not None else {"q": self._last_user(body)}
            tool_call = {"id": "call_fake1", "type": "function",
                         "function": {"name": fn, "arguments": orjson.dumps(args).decode()}}
        completion_tokens = len(words) if tool_call is None else 12
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        finish = "tool_calls" if tool_call else ("length" if body.get("max_tokens") and len(words) >= body["max_tokens"] else "stop")
        if not body.get("stream") or (fault is not None and fault.json_answer):
            msg: dict[str, Any] = {"role": "assistant", "content": None if tool_call else " ".join(words),
                                   "refusal": None}
            if tool_call:
                msg["tool_calls"] = [tool_call]
            if "reasoner" in (model or ""):
                msg["reasoning_content"] = self.reasoning(body)
            payload = {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": "fp_fake", "service_tier": "default",
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
                "usage": usage}
            if fault is not None and fault.body_delay:
                raw = orjson.dumps(payload)
                slow = web.StreamResponse(headers={"content-type": "application/json",
                                                   "content-length": str(len(raw))})
                await slow.prepare(request)
                step = max(1, len(raw) // 8 + 1)
                for i in range(0, len(raw), step):
                    if not await _wait(request, request[CALL], fault.body_delay):
                        return slow
                    await slow.write(raw[i:i + step])
                await slow.write_eof()
                return slow
            return web.json_response(payload, dumps=lambda o: orjson.dumps(o).decode())
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": "fp_fake",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        chunks: list[dict[str, Any]] = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if "reasoner" in (model or ""):  # DeepSeek streams its reasoning first, with content null
            for i, w in enumerate(self.reasoning(body).split(" ")):
                chunks.append(chunk({"content": None, "reasoning_content": w if i == 0 else " " + w}))
        if tool_call:
            args = tool_call["function"]["arguments"]
            chunks.append(chunk({"tool_calls": [{"index": 0, "id": tool_call["id"], "type": "function",
                                                 "function": {"name": tool_call["function"]["name"], "arguments": ""}}]}))
            for i in range(0, len(args), 7):
                chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 7]}}]}))
        else:
            for i, w in enumerate(words):
                chunks.append(chunk({"content": w if i == 0 else " " + w}))
        chunks.append(chunk({}, finish))
        if include_usage:
            for c in chunks:
                c["usage"] = None
            chunks.append({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "system_fingerprint": "fp_fake", "choices": [], "usage": usage})
        for i, c in enumerate(chunks):
            if fault is not None and fault.cut_after is not None and i >= fault.cut_after:
                assert request.transport is not None
                if i:  # let the chunks already written reach the peer before the reset discards them
                    await asyncio.sleep(0.05)
                request.transport.abort()
                return resp
            if fault is not None and fault.stall_after is not None and i >= fault.stall_after:
                await _wait(request, request[CALL], 3600)
                return resp
            if fault is not None and fault.chunk_delay:
                if not await _wait(request, request[CALL], fault.chunk_delay):
                    return resp
            await resp.write(b"data: " + orjson.dumps(c) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._intake(request)
        if early is not None:
            return early
        assert body is not None
        model = body.get("model")
        cid = "cmpl-fake" + str(len(self.calls))
        created = int(time.time())
        words = self._answer(body)
        usage = {"prompt_tokens": len(str(body.get("prompt", "")).split()), "completion_tokens": len(words),
                 "total_tokens": len(str(body.get("prompt", "")).split()) + len(words)}
        if not body.get("stream"):
            return web.json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                                      "choices": [{"text": " ".join(words), "index": 0, "logprobs": None,
                                                   "finish_reason": "stop"}], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, w in enumerate(words):
            c = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"text": w if i == 0 else " " + w, "index": 0, "logprobs": None, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(c) + b"\n\n")
        c = {"id": cid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}
        await resp.write(b"data: " + orjson.dumps(c) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({"id": cid, "object": "text_completion", "created": created,
                                                       "model": model, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._intake(request)
        if early is not None:
            return early
        assert body is not None
        inp = body.get("input")
        items = [inp] if isinstance(inp, str) else inp
        dims = body.get("dimensions") or 8
        data = [{"object": "embedding", "index": i, "embedding": [round((len(str(x)) + j) / 100, 4) for j in range(dims)]}
                for i, x in enumerate(items)]
        tokens = sum(len(str(x).split()) for x in items)
        return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}]})

    # -- the Responses API ---------------------------------------------------------------------------
    @staticmethod
    def _responses_last_user(body: dict[str, Any]) -> str:
        inp = body.get("input")
        if isinstance(inp, str):
            return inp
        for it in reversed(inp or []):
            if it.get("type", "message") == "message" and it.get("role") == "user":
                c = it.get("content")
                if isinstance(c, list):
                    return " ".join(p.get("text", "") for p in c if p.get("type") == "input_text")
                return str(c or "")
            if it.get("type") == "function_call_output":
                return "tool said " + str(it.get("output"))
        return ""

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, fault, early = await self._intake(request)
        if early is not None:
            return early
        assert body is not None
        if "input" not in body and not body.get("previous_response_id"):
            return self._error(400, "Missing required parameter: 'input'.")
        model = body.get("model")
        if model == "missing-model":
            return self._error(404, f"The model `{model}` does not exist or you do not have access to it.")
        n = len(self.calls)
        rid = f"resp_fake{n:04d}"
        created = int(time.time())
        text = self._responses_last_user(body)
        words = [f"echo:{w}" for w in text.split()][: self.words] or ["ok"]
        mt = body.get("max_output_tokens")
        incomplete = bool(mt and len(words) > mt)
        if mt:
            words = words[:mt]
        fn_tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
        last = (body.get("input") or [{}])[-1] if isinstance(body.get("input"), list) else {}
        call = None
        answered = last.get("type") == "function_call_output"
        if self.tool_args is not None and isinstance(body.get("input"), list):
            answered = any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in body["input"])
        if fn_tools and body.get("tool_choice") != "none" and not answered:
            args = self.tool_args if self.tool_args is not None else {"q": text}
            call = {"id": f"fc_fake{n}", "type": "function_call", "status": "completed", "call_id": f"call_fake{n}",
                    "name": fn_tools[0]["name"], "arguments": orjson.dumps(args).decode()}
        out: list[dict[str, Any]] = []
        reasoning = None
        if (body.get("reasoning") or {}).get("effort") not in (None, "none"):
            reasoning = {"id": f"rs_fake{n}", "type": "reasoning",
                         "summary": [{"type": "summary_text", "text": f"Thinking about {text!r}."}]}
            if "reasoning.encrypted_content" in (body.get("include") or []):
                reasoning["encrypted_content"] = "gAAAAfake-openai-encrypted-" + str(n)
            out.append(reasoning)
        message = None
        if call is None:
            message = {"id": f"msg_fake{n}", "type": "message", "status": "incomplete" if incomplete else "completed",
                       "role": "assistant",
                       "content": [{"type": "output_text", "text": " ".join(words), "annotations": [], "logprobs": []}]}
            out.append(message)
        else:
            out.append(call)
        in_tok = len(orjson.dumps(body.get("input"))) // 4 + len(str(body.get("instructions") or "")) // 4
        out_tok = len(words) if call is None else 12
        usage = {"input_tokens": in_tok, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                 "output_tokens": out_tok, "output_tokens_details": {"reasoning_tokens": 3 if reasoning else 0},
                 "total_tokens": in_tok + out_tok}
        resp_obj: dict[str, Any] = {
            "id": rid, "object": "response", "created_at": created, "status": "completed", "background": False,
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": mt, "metadata": body.get("metadata") or {}, "model": model, "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
            "service_tier": "default", "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"), "usage": None,
            "user": body.get("user")}
        final = dict(resp_obj, output=out, usage=usage, status="incomplete" if incomplete else "completed",
                     incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                     completed_at=None if incomplete else int(time.time()))
        if not body.get("stream") or (fault is not None and fault.json_answer):
            return web.json_response(final, dumps=lambda o: orjson.dumps(o).decode())
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        events: list[dict[str, Any]] = [{"type": "response.created", "response": dict(resp_obj, status="in_progress")},
                                        {"type": "response.in_progress", "response": dict(resp_obj, status="in_progress")}]
        for oi, item in enumerate(out):
            if item["type"] == "reasoning":
                events.append({"type": "response.output_item.added", "output_index": oi,
                               "item": {"id": item["id"], "type": "reasoning", "summary": []}})
                s = item["summary"][0]
                events += [
                    {"type": "response.reasoning_summary_part.added", "item_id": item["id"], "output_index": oi,
                     "summary_index": 0, "part": {"type": "summary_text", "text": ""}},
                    {"type": "response.reasoning_summary_text.delta", "item_id": item["id"], "output_index": oi,
                     "summary_index": 0, "delta": s["text"]},
                    {"type": "response.reasoning_summary_text.done", "item_id": item["id"], "output_index": oi,
                     "summary_index": 0, "text": s["text"]},
                    {"type": "response.reasoning_summary_part.done", "item_id": item["id"], "output_index": oi,
                     "summary_index": 0, "part": s}]
            elif item["type"] == "message":
                events.append({"type": "response.output_item.added", "output_index": oi,
                               "item": dict(item, status="in_progress", content=[])})
                events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": oi,
                               "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [],
                                                            "logprobs": []}})
                for i, w in enumerate(words):
                    events.append({"type": "response.output_text.delta", "item_id": item["id"], "output_index": oi,
                                   "content_index": 0, "delta": w if i == 0 else " " + w, "logprobs": []})
                events.append({"type": "response.output_text.done", "item_id": item["id"], "output_index": oi,
                               "content_index": 0, "text": " ".join(words), "logprobs": []})
                events.append({"type": "response.content_part.done", "item_id": item["id"], "output_index": oi,
                               "content_index": 0, "part": item["content"][0]})
            else:
                events.append({"type": "response.output_item.added", "output_index": oi,
                               "item": dict(item, status="in_progress", arguments="")})
                args = item["arguments"]
                for i in range(0, len(args), 7):
                    events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                                   "output_index": oi, "delta": args[i:i + 7]})
                events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                               "output_index": oi, "arguments": args, "name": item["name"]})
            events.append({"type": "response.output_item.done", "output_index": oi, "item": item})
        events.append({"type": "response.incomplete" if incomplete else "response.completed", "response": final})
        for i, ev in enumerate(events):
            ev["sequence_number"] = i
            if fault is not None and fault.cut_after is not None and i >= fault.cut_after:
                assert request.transport is not None
                if i:
                    await asyncio.sleep(0.05)
                request.transport.abort()
                return resp
            if fault is not None and fault.chunk_delay:
                if not await _wait(request, request[CALL], fault.chunk_delay):
                    return resp
            await resp.write(b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
        await resp.write_eof()
        return resp
