"""OpenAI wire format: OpenAI, DeepSeek and any OpenAI-compatible server (vLLM, Ollama, Groq, Mistral,
OpenRouter).  ``base_url`` is what the OpenAI SDK takes (``https://api.openai.com/v1``); paths are
appended to it.  The canonical model *is* the OpenAI shape, so requests and responses pass through
with their unknown fields untouched."""
from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from ..canonical import ChatRequest, ChatResponse, EmbeddingRequest, EmbeddingResponse, Usage
from ..config import HTTPConfig, ProviderConfig
from ..errors import GatewayError
from .base import Provider, extract_error
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

    # -- operations --------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> ChatResponse:
        legacy = req.endpoint == "completion"
        url = self.url_completions if legacy else self.url_chat
        body, _, _ = await self.post_json(url, self.body(req, False), self.headers)
        if "choices" not in body:
            raise self.bad_body()
        if legacy:
            body = _legacy_to_chat(body)
        return ChatResponse(body, Usage.from_openai(body.get("usage")), self.name, body.get("model") or req.model)

    async def stream(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        url = self.url_completions if req.endpoint == "completion" else self.url_chat
        return self._chunks(await self.open_sse(url, self.body(req, True), self.headers))

    async def _chunks(self, resp: Any) -> AsyncIterator[dict[str, Any]]:
        done = False
        try:
            async for _event, data in sse_from_chunks(resp.chunks()):
                if data == b"[DONE]":
                    done = True
                    break
                chunk = self.stream_event(data)
                if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                    msg, _ = extract_error(data)
                    raise self.stream_error(self.scrub(msg or "stream error"), sep=": ")
                if chunk.get("object") == "text_completion":
                    chunk = _legacy_chunk_to_chat(chunk)
                yield chunk
        finally:
            resp.close()
        if not done:
            raise self.stream_error("ended the stream without [DONE]")

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        b = dict(req.params)
        b["model"] = req.model
        b["input"] = req.input
        try:
            body, _, _ = await self.post_json(self.url_embeddings, orjson.dumps(b), self.headers)
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
