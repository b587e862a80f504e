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
from .base import Provider, extract_error, iter_chunks
from .checks import check_chat, check_embedding
from .sse import sse_from_chunks


class OpenAIProvider(Provider):
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
        if op == "embed":
            check_embedding(req)
            b = dict(req.params)
            b["model"] = req.model
            b["input"] = req.input
            return orjson.dumps(b)
        return self.body(req, op == "stream")

    # -- operations --------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> ChatResponse:
        res: ChatResponse = await self.send(req, "chat", self.prepare(req, "chat"))
        return res

    async def stream(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        res: AsyncIterator[dict[str, Any]] = await self.send(req, "stream", self.prepare(req, "stream"))
        return res

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        res: EmbeddingResponse = await self.send(req, "embed", self.prepare(req, "embed"))
        return res

    async def send(self, req: Any, op: str, wire: Any) -> Any:
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
        try:
            async for _event, data in sse_from_chunks(resp.chunks()):
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
