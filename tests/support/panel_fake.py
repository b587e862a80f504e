"""A fake OpenAI-compatible upstream for ensemble tests: one real HTTP server, one base URL per provider
(``<url>/<name>/v1``), each answering as its :class:`Script` says -- a fixed or computed answer, token
logprobs or none, a delay, an error status, a tool call -- non-streamed or as ``chat.completion.chunk`` SSE
(with the usage chunk when asked).  Every request is kept in :attr:`PanelFake.calls` by provider name."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from aiohttp import web

from support.servers import AiohttpServer

API_KEY = "sk-panel-fake-key-123456"


@dataclass
class Script:
    answer: str | Callable[[dict[str, Any]], str] = "ok"
    logprob: float | None = None          # each token's logprob; None: the answer has no logprobs
    delay: float = 0.0                    # before the response head
    status: int | None = None             # answer this error status instead
    tool_call: dict[str, Any] | None = None   # {"name": ..., "arguments": "..."}
    chunk_delay: float = 0.0              # streamed: pause between chunks
    cut_after: int | None = None          # streamed: the connection drops after this many chunks


class PanelFake:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.cancelled: dict[str, int] = {}
        app = web.Application()
        app.router.add_post("/{name}/v1/chat/completions", self.chat)
        self.server = AiohttpServer(app)

    def close(self) -> None:
        self.server.close()

    def reset(self) -> None:
        self.scripts.clear()
        self.calls.clear()
        self.cancelled.clear()

    def provider(self, name: str, models: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"name": name, "type": "openai_compatible", "base_url": f"{self.server.url}/{name}/v1",
                             "api_key": API_KEY, "models": models or [f"{name}-model"], "max_retries": 0}
        d.update(extra)
        return d

    def count(self, name: str) -> int:
        return len(self.calls.get(name, ()))

    def total(self) -> int:
        return sum(len(v) for v in self.calls.values())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = orjson.loads(await request.read())
        self.calls.setdefault(name, []).append(body)
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401)
        sc = self.scripts.get(name, Script())
        if sc.delay:
            try:
                await asyncio.sleep(sc.delay)
            except asyncio.CancelledError:
                self.cancelled[name] = self.cancelled.get(name, 0) + 1
                raise
        if sc.status:
            return web.json_response({"error": {"message": f"fake {name} error", "type": "server_error",
                                                "param": None, "code": None}}, status=sc.status)
        text = sc.answer(body) if callable(sc.answer) else sc.answer
        words = text.split(" ")
        model = body.get("model")
        cid = f"chatcmpl-{name}-{len(self.calls[name])}"
        created = int(time.time())
        usage = {"prompt_tokens": 10, "completion_tokens": len(words), "total_tokens": 10 + len(words)}
        lp = None
        if body.get("logprobs") and sc.logprob is not None:
            lp = {"content": [{"token": w, "logprob": sc.logprob, "bytes": None, "top_logprobs": []} for w in words],
                  "refusal": None}
        tc = None
        if sc.tool_call is not None:
            tc = {"id": "call_1", "type": "function", "function": dict(sc.tool_call)}
        finish = "tool_calls" if tc else "stop"
        if not body.get("stream"):
            msg: dict[str, Any] = {"role": "assistant", "content": None if tc else text}
            if tc:
                msg["tool_calls"] = [tc]
            return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                      "choices": [{"index": 0, "message": msg, "logprobs": lp,
                                                   "finish_reason": finish}], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], fr: str | None = None) -> bytes:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": fr}]}
            return b"data: " + orjson.dumps(c) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": ""}))
        for i, w in enumerate(words):
            if sc.chunk_delay:
                await asyncio.sleep(sc.chunk_delay)
            if sc.cut_after is not None and i + 1 >= sc.cut_after:
                await asyncio.sleep(0.05)  # let the chunks written reach the peer, then drop the connection
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(chunk({"content": w if i == 0 else " " + w}))
        await resp.write(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                                       "model": model, "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
