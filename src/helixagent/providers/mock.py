"""The built-in ``mock`` provider: deterministic answers with no upstream.

Served when no upstream key is configured, so a fresh install answers at once.  The text depends only
on the model and the conversation, so the same request always gets the same answer; ``latency_ms``
delays the first token and ``tokens_per_second`` paces a stream.
"""
from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from typing import Any, AsyncIterator

from ..canonical import (ChatRequest, ChatResponse, EmbeddingRequest, EmbeddingResponse, Usage,
                         new_chunk, new_completion, text_of, usage_chunk)
from ..tokens import estimate_messages, estimate_text
from .base import Provider
from .checks import check_chat, check_embedding

_WORDS = ("helix", "gateway", "routes", "your", "request", "through", "a", "deterministic", "mock",
          "provider", "with", "no", "upstream", "key", "configured", "answer", "stream", "token",
          "model", "fast", "correct", "the", "of", "and", "to", "is")


class MockProvider(Provider):
    wire = "mock"

    def serves(self, model: str) -> bool:
        return not self.cfg.models or model in self.cfg.models

    def models(self) -> list[str]:
        return list(self.cfg.models) or ["mock-1"]

    def prepare(self, req: Any, op: str) -> Any:
        """No wire format, but the same type checks as every mapping (what the answer reads)."""
        if op == "embed":
            check_embedding(req)
        else:
            check_chat(req)
        return None

    def _tokens(self, req: ChatRequest) -> list[str]:
        last = ""
        for m in reversed(req.messages):
            if m.get("role") == "user":
                last = text_of(m.get("content"))
                break
        seed = hashlib.sha256(f"{req.model}\x00{last}\x00{len(req.messages)}".encode()).digest()
        n = self.cfg.mock_tokens
        mt = req.max_tokens
        if mt is not None:
            n = max(0, min(n, mt))
        out = []
        for i in range(n):
            out.append(_WORDS[seed[i % len(seed)] % len(_WORDS)] if i else "Mock")
        return out

    def _usage(self, req: ChatRequest, n: int) -> Usage:
        p = estimate_messages(req.messages)
        return Usage(p, n, p + n)

    def _finish(self, req: ChatRequest, n: int) -> str:
        mt = req.max_tokens
        return "length" if mt is not None and n >= mt and mt < self.cfg.mock_tokens else "stop"

    async def chat(self, req: ChatRequest) -> ChatResponse:
        toks = self._tokens(req)
        delay = self.cfg.latency_ms / 1000.0
        if self.cfg.tokens_per_second:
            delay += len(toks) / self.cfg.tokens_per_second
        if delay:
            await asyncio.sleep(delay)
        text = " ".join(toks)
        usage = self._usage(req, len(toks))
        rid = "chatcmpl-mock-" + hashlib.sha1(text.encode()).hexdigest()[:20]
        body = new_completion(rid, req.model, {"role": "assistant", "content": text, "refusal": None},
                              self._finish(req, len(toks)), usage)
        return ChatResponse(body, usage, self.name, req.model)

    async def stream(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        if self.cfg.latency_ms:
            await asyncio.sleep(self.cfg.latency_ms / 1000.0)
        return self._gen(req)

    async def _gen(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        toks = self._tokens(req)
        created = int(time.time())
        rid = "chatcmpl-mock-" + hashlib.sha1(" ".join(toks).encode()).hexdigest()[:20]
        pace = 1.0 / self.cfg.tokens_per_second if self.cfg.tokens_per_second else 0.0
        yield new_chunk(rid, req.model, created, {"role": "assistant", "content": ""})
        for i, t in enumerate(toks):
            if pace:
                await asyncio.sleep(pace)
            yield new_chunk(rid, req.model, created, {"content": t if i == 0 else " " + t})
        yield new_chunk(rid, req.model, created, {}, self._finish(req, len(toks)))
        yield usage_chunk(rid, req.model, created, self._usage(req, len(toks)))

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResponse:
        dims = int(req.params.get("dimensions") or 16)
        data = []
        tokens = 0
        for i, item in enumerate(req.input):
            if isinstance(item, str):
                text = item
                tokens += max(1, estimate_text(text))
            else:  # a token array: its own key space (never the vector of the text "1 2 3"), exact count
                text = "\x00tokens:" + ",".join(map(str, item))
                tokens += len(item)
            vec = _vector(text, dims)
            data.append({"object": "embedding", "index": i, "embedding": vec})
        usage = Usage(tokens, 0, tokens)
        body = {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return EmbeddingResponse(body, usage, self.name)


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector derived from the text."""
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        h = hashlib.sha256(f"{counter}\x00{text}".encode()).digest()
        for j in range(0, 32, 4):
            (v,) = struct.unpack(">I", h[j:j + 4])
            out.append(v / 2**31 - 1.0)
        counter += 1
    out = out[:dims]
    norm = sum(x * x for x in out) ** 0.5 or 1.0
    return [round(x / norm, 8) for x in out]
