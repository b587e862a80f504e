"""OpenAI wire format: OpenAI, DeepSeek and any OpenAI-compatible server (vLLM, Ollama, Groq, Mistral,
OpenRouter).  ``base_url`` is what the OpenAI SDK takes (``https://api.openai.com/v1``); paths are
appended to it.  The canonical model *is* the OpenAI shape, so requests and responses pass through
with their unknown fields untouched."""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..canonical import ChatRequest, ChatResponse, EmbeddingRequest, EmbeddingResponse, Usage, replay_chunks
from ..config import HTTPConfig, ProviderConfig
from ..errors import GatewayError
from .base import MappedProvider, extract_error, iter_chunks
from .checks import check_chat, check_embedding
from .sse import sse_from_chunks


class OpenAIProvider(MappedProvider):
    wire = "openai"

    def __init__(self, cfg: ProviderConfig, http: HTTPConfig):
        super().__init__(cfg, http)
        h = {"content-type": "application/json", "accept": "application/json"}
        if cfg.api_key:
            h["authorization"] = f"Bearer {cfg.api_key}"
        h.update(cfg.headers)
        self.headers = h
        self.url_chat = f"{cfg.base_url}/chat/completions"
        self.url_completions = f"{cfg.base_url}/completions"
        self.url_embeddings = f"{cfg.base_url}/embeddings"
        self.url_responses = f"{cfg.base_url}/responses"

    def serves(self, model: str) -> bool:
        if self.cfg.models:
            return model in self.cfg.models
        if self.cfg.type == "openai_compatible":
            return True  # a bare compatible server takes any model name
        return super().serves(model)  # openai / deepseek: the catalogue's models

    # -- request mapping ---------------------------------------------------------------------------
    def body(self, req: ChatRequest, stream: bool) -> bytes:
        check_chat(req)
        if self.cfg.type == "openai" and req.params.get("top_k") is not None:
            raise self.unsupported("top_k", "top_k")  # OpenAI's API refuses it; compatible servers take it
        b = dict(req.params)
        b["model"] = req.model
        if req.endpoint == "completion":  # legacy completions go natively to /completions
            b["prompt"] = req.prompt
        else:
            b["messages"] = req.messages
        if stream:
            b["stream"] = True
            so = dict(b.get("stream_options") or {})
            so["include_usage"] = True  # always ask: usage is how budgets settle and records count
            b["stream_options"] = so
        else:
            b.pop("stream", None)
            b.pop("stream_options", None)
        return orjson.dumps(b)

    def prepare(self, req: Any, op: str) -> Any:
        if op != "embed" and self.native_responses(req):
            return NativeResponses(self.responses_body(req, op == "stream"))
        if op == "embed":
            check_embedding(req)
            b = dict(req.params)
            b["model"] = req.model
            b["input"] = req.input
            return orjson.dumps(b)
        return self.body(req, op == "stream")

    # -- operations --------------------------------------------------------------------------------
    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        res: EmbeddingResponse = await self.send(req, "embed", self.prepare(req, "embed"))
        return res

    async def send(self, req: Any, op: str, wire: Any) -> Any:
        if isinstance(wire, NativeResponses):
            return await self.responses(req, op == "stream", wire.body)
        if op == "embed":
            return await self._embed(req, wire)
        url = self.url_completions if req.endpoint == "completion" else self.url_chat
        if op == "stream":
            resp = await self.open_sse(url, wire, self.headers)
            if self.is_json_answer(resp):  # the upstream ignored stream: true and answered whole
                return iter_chunks(self.read_answer(self._json_chunks, await self.json_answer(resp), req))
            return self._chunks(resp)
        body, _, _ = await self.post_json(url, wire, self.headers)
        return self.read_answer(self._response, body, req)

    def _response(self, body: dict[str, Any], req: ChatRequest) -> ChatResponse:
        if "choices" not in body:
            raise self.bad_body()
        if req.endpoint == "completion":
            body = _legacy_to_chat(body)
        return ChatResponse(body, Usage.from_openai(body.get("usage")), self.name, body.get("model") or req.model)

    def _json_chunks(self, body: Any, req: ChatRequest) -> list[dict[str, Any]]:
        """A whole (chat or legacy) completion answered to a streamed request, as canonical chunks."""
        if isinstance(body, dict) and "error" in body and "choices" not in body:
            msg, _ = extract_error(orjson.dumps(body))
            raise self.upstream_error(500, b"", None, message=msg or "error", etype=None)
        if not isinstance(body, dict):
            raise self.bad_body()
        resp = self._response(body, req)
        out = replay_chunks(resp)
        b = resp.body
        if b.get("usage"):
            out.append({"id": b.get("id", ""), "object": "chat.completion.chunk", "created": b.get("created", 0),
                        "model": b.get("model") or req.model, "choices": [], "usage": b["usage"]})
        return out

    async def _chunks(self, resp: Any) -> AsyncIterator[dict[str, Any]]:
        done = False
        events = sse_from_chunks(resp.chunks())
        try:
            async for _event, data in events:
                if data == b"[DONE]":
                    done = True
                    break
                chunk = self.stream_event(data)
                if not isinstance(chunk, dict):
                    raise self.stream_error("sent a stream event that is not an object")
                if "error" in chunk and "choices" not in chunk:
                    msg, _ = extract_error(data)
                    raise self.stream_error(self.scrub(msg or "stream error"), sep=": ")
                u = chunk.get("usage")
                if u is not None and not isinstance(u, dict):
                    raise self.stream_error("sent a stream event with a malformed usage object")
                if chunk.get("object") == "text_completion":
                    chunk = self.read_answer(_legacy_chunk_to_chat, chunk)
                yield chunk
        finally:
            await events.aclose()  # a break leaves the generators suspended: close them now
            resp.close()
        if not done:
            raise self.stream_error("ended the stream without [DONE]")

    async def _embed(self, req: EmbeddingRequest, wire: bytes) -> EmbeddingResponse:
        try:
            body, _, _ = await self.post_json(self.url_embeddings, wire, self.headers)
        except GatewayError as exc:
            if exc.kind == "bad_upstream_body":
                raise self.bad_body("an unexpected embeddings body") from None
            raise
        items = body.get("data")
        if not isinstance(items, list) or len(items) != len(req.input) or not all(
                isinstance(d, dict) and isinstance(d.get("embedding"), (list, str)) for d in items):
            raise self.bad_body("an unexpected embeddings body")
        return EmbeddingResponse(body, Usage.from_openai(body.get("usage")), self.name)

    # -- the Responses API, natively (see NATIVE below) --------------------------------------------------
    def native_responses(self, req: Any) -> bool:
        return self.cfg.type == "openai" and getattr(req, "endpoint", "") == "responses" and isinstance(
            getattr(req, "native", None), dict)

    def responses_body(self, req: Any, stream: bool) -> bytes:
        b = dict(req.native)
        b["model"] = req.model
        if stream:
            b["stream"] = True
        else:
            b.pop("stream", None)
            b.pop("stream_options", None)
        return orjson.dumps(b)

    async def responses(self, req: Any, stream: bool, wire: bytes) -> Any:
        if not stream:
            body, _, _ = await self.post_json(self.url_responses, wire, self.headers)
            if not isinstance(body.get("output"), list):
                raise self.bad_body("a responses body without output")
            return self.read_answer(native_to_canonical, body, self.name, req.model)
        resp = await self.open_sse(self.url_responses, wire, self.headers)
        if self.is_json_answer(resp):
            body = await self.json_answer(resp)
            if not isinstance(body, dict) or not isinstance(body.get("output"), list):
                raise self.bad_body("a responses body without output")
            res = self.read_answer(native_to_canonical, body, self.name, req.model)
            chunks = replay_chunks(res)
            chunks.append({"id": body.get("id", ""), "object": "chat.completion.chunk", "created": 0,
                           "model": res.model, "choices": [], "usage": res.usage.to_openai()})
            return iter_chunks(chunks)
        return self._native_events(resp, req.model)

    async def _native_events(self, resp: Any, model: str) -> AsyncIterator[dict[str, Any]]:
        """Upstream Responses events -> canonical chunks, each carrying its event under NATIVE."""
        done = False
        calls: dict[int, int] = {}   # output_index -> canonical tool call index
        rid = ""
        events = sse_from_chunks(resp.chunks())
        try:
            async for _event, data in events:
                if data == b"[DONE]":
                    break
                ev = self.stream_event(data)
                if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
                    raise self.stream_error("sent a stream event that is not a Responses event")
                t = ev["type"]
                if t == "error" or t == "response.failed":
                    err = ev.get("error") if t == "error" else (ev.get("response") or {}).get("error")
                    msg = ev.get("message") if t == "error" else (err or {}).get("message")
                    raise self.stream_error(str(msg or "the response failed"), sep=": ")
                delta: dict[str, Any] = {}
                finish = None
                usage = None
                if t == "response.created":
                    rid = (ev.get("response") or {}).get("id") or ""
                    delta = {"role": "assistant", "content": ""}
                elif t == "response.output_text.delta":
                    delta = {"content": ev.get("delta") or ""}
                elif t == "response.reasoning_summary_text.delta":
                    delta = {"reasoning_content": ev.get("delta") or ""}
                elif t == "response.output_item.added" and (ev.get("item") or {}).get("type") == "function_call":
                    it = ev["item"]
                    k = calls[int(ev.get("output_index") or 0)] = len(calls)
                    delta = {"tool_calls": [{"index": k, "id": it.get("call_id") or "", "type": "function",
                                             "function": {"name": it.get("name") or "",
                                                          "arguments": it.get("arguments") or ""}}]}
                elif t == "response.function_call_arguments.delta":
                    k = calls.get(int(ev.get("output_index") or 0), 0)
                    delta = {"tool_calls": [{"index": k, "function": {"arguments": ev.get("delta") or ""}}]}
                elif t in ("response.completed", "response.incomplete"):
                    r = ev.get("response") or {}
                    _msg, finish = native_message(r)
                    usage = _native_usage(r.get("usage")).to_openai()
                    done = True
                chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": model,
                                         "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}] if delta or finish else [],
                                         NATIVE: ev}
                if usage is not None:
                    chunk["usage"] = usage
                yield chunk
                if done:
                    break
        finally:
            await events.aclose()  # a break leaves the generators suspended: close them now
            resp.close()
        if not done:
            raise self.stream_error("ended the stream without response.completed")


def _legacy_to_chat(b: dict[str, Any]) -> dict[str, Any]:
    """text_completion -> canonical chat.completion (text becomes the assistant message)."""
    out = dict(b)
    out["object"] = "chat.completion"
    out["choices"] = [{"index": c.get("index", 0), "message": {"role": "assistant", "content": c.get("text", "")},
                       "logprobs": c.get("logprobs"), "finish_reason": c.get("finish_reason")}
                      for c in b.get("choices") or ()]
    return out


def _legacy_chunk_to_chat(c: dict[str, Any]) -> dict[str, Any]:
    out = dict(c)
    out["object"] = "chat.completion.chunk"
    out["choices"] = [{"index": ch.get("index", 0), "delta": {"content": ch.get("text", "")},
                       "logprobs": ch.get("logprobs"), "finish_reason": ch.get("finish_reason")}
                      for ch in c.get("choices") or ()]
    return out


# -- the Responses API, natively (POST {base_url}/responses) ---------------------------------------------
# A request that came to /v1/responses (``req.native`` holds the client's body) goes as is to the real
# OpenAI; its answer rides back on the canonical shapes (records, usage, cache read those) with the
# upstream's own object / events under ``NATIVE``, which the Responses client format relays untouched.

NATIVE = "_responses_native"


class NativeResponses:
    __slots__ = ("body",)

    def __init__(self, body: bytes):
        self.body = body


def _native_usage(u: Any) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    i, o = int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0)
    d = u.get("input_tokens_details") or {}
    return Usage(i, o, int(u.get("total_tokens") or i + o), int(d.get("cached_tokens") or 0),
                 int(d.get("cache_write_tokens") or 0))


def native_message(resp: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A ``response`` object's output -> (canonical assistant message, finish reason)."""
    text = ""
    calls = []
    reasoning = ""
    for it in resp.get("output") or ():
        t = it.get("type")
        if t == "message":
            for c in it.get("content") or ():
                if c.get("type") == "output_text":
                    text += c.get("text") or ""
                elif c.get("type") == "refusal":
                    text += c.get("refusal") or ""
        elif t == "function_call":
            calls.append({"id": it.get("call_id") or "", "type": "function",
                          "function": {"name": it.get("name") or "", "arguments": it.get("arguments") or ""}})
        elif t == "reasoning":
            reasoning += "".join(s.get("text") or "" for s in it.get("summary") or ())
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        msg["tool_calls"] = calls
    if reasoning:
        msg["reasoning_content"] = reasoning
    inc = (resp.get("incomplete_details") or {}).get("reason")
    finish = ("length" if inc == "max_output_tokens" else "content_filter" if inc == "content_filter"
              else "tool_calls" if calls else "stop")
    return msg, finish


def native_to_canonical(resp: dict[str, Any], provider: str, model: str) -> ChatResponse:
    msg, finish = native_message(resp)
    usage = _native_usage(resp.get("usage"))
    body = {"id": resp.get("id") or "", "object": "chat.completion", "created": int(resp.get("created_at") or 0),
            "model": resp.get("model") or model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
            "usage": usage.to_openai(), NATIVE: resp}
    return ChatResponse(body, usage, provider, resp.get("model") or model)
