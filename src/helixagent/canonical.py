"""The canonical request / response / stream-event model.

Every client format (``api/``) translates into these and back; every provider (``providers/``)
translates these to and from its vendor's wire format.  Nothing else knows a vendor's shape.

The canonical shapes follow the OpenAI Chat Completions schema, the lingua franca of LLM APIs,
held as plain dicts/lists for speed (no per-field object allocation on the hot path):

* ``ChatRequest.messages`` -- OpenAI chat messages: ``{"role": "system"|"user"|"assistant"|"tool",
  "content": str | [parts], "tool_calls": [...], "tool_call_id": str, "name": str}``; content parts
  are ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url", "detail"}}``.
* ``ChatRequest.params`` -- every other request field under its OpenAI name (temperature, top_p,
  max_tokens, stop, tools, tool_choice, response_format, seed, n, logprobs, user, ...).  Fields
  unknown to HelixAgent stay here untouched so OpenAI-compatible upstreams receive them.
* ``ChatResponse.body`` -- an OpenAI ``chat.completion`` object.  Upstream fields are kept.
* stream events -- OpenAI ``chat.completion.chunk`` dicts.  A provider yields them; a client
  format renders them (OpenAI SSE as is, Anthropic SSE via a stateful translator).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0

    @classmethod
    def from_openai(cls, u: dict[str, Any] | None) -> "Usage":
        if not u:
            return cls()
        p = int(u.get("prompt_tokens") or 0)
        c = int(u.get("completion_tokens") or 0)
        details = u.get("prompt_tokens_details") or {}
        return cls(p, c, int(u.get("total_tokens") or (p + c)),
                   int(details.get("cached_tokens") or u.get("cache_read_input_tokens") or 0),
                   int(u.get("cache_creation_input_tokens") or 0))

    def to_openai(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                             "total_tokens": self.total_tokens or (self.prompt_tokens + self.completion_tokens)}
        if self.cache_read_tokens:
            d["prompt_tokens_details"] = {"cached_tokens": self.cache_read_tokens}
        return d


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    provider: str | None = None          # pinned by "provider" field or "provider/model"
    # "chat" for /v1/chat/completions and /v1/messages, "completion" for the legacy prompt API
    endpoint: str = "chat"
    # the original prompt of a legacy completion (sent natively to upstreams that speak that API)
    prompt: Any = None

    @property
    def max_tokens(self) -> int | None:
        v = self.params.get("max_completion_tokens") or self.params.get("max_tokens")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def copy_for(self, model: str) -> "ChatRequest":
        return ChatRequest(model, self.messages, self.params, self.stream, self.include_usage,
                           self.provider, self.endpoint, self.prompt)


@dataclass(slots=True)
class ChatResponse:
    body: dict[str, Any]                 # OpenAI chat.completion shape
    usage: Usage
    provider: str = ""
    model: str = ""

    @classmethod
    def from_openai(cls, body: dict[str, Any], provider: str = "") -> "ChatResponse":
        return cls(body, Usage.from_openai(body.get("usage")), provider, body.get("model") or "")


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    input: list[str] | list[list[int]]
    params: dict[str, Any] = field(default_factory=dict)  # dimensions, encoding_format, user, ...
    provider: str | None = None


@dataclass(slots=True)
class EmbeddingResponse:
    body: dict[str, Any]                 # OpenAI embeddings list shape
    usage: Usage
    provider: str = ""


# A stream of canonical chunks (OpenAI chat.completion.chunk dicts).
ChunkStream = AsyncIterator[dict[str, Any]]


def new_chunk(id: str, model: str, created: int, delta: dict[str, Any] | None = None,
              finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta if delta is not None else {},
                         "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(id: str, model: str, created: int, usage: Usage) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage.to_openai()}


def new_completion(id: str, model: str, message: dict[str, Any], finish_reason: str | None,
                   usage: Usage, created: int | None = None) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage.to_openai()}


class StreamAccumulator:
    """Folds canonical chunks into one ``chat.completion`` body (for records, cache, usage)."""

    __slots__ = ("id", "model", "created", "choices", "usage", "extra", "chunks")

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Usage | None = None
        self.extra: dict[str, Any] = {}
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if not self.id:
            self.id = chunk.get("id") or ""
            self.model = chunk.get("model") or ""
            self.created = chunk.get("created") or int(time.time())
            if chunk.get("system_fingerprint"):
                self.extra["system_fingerprint"] = chunk["system_fingerprint"]
        u = chunk.get("usage")
        if u:
            self.usage = Usage.from_openai(u)
        for ch in chunk.get("choices") or ():
            idx = ch.get("index", 0)
            acc = self.choices.get(idx)
            if acc is None:
                acc = self.choices[idx] = {"index": idx, "message": {"role": "assistant", "content": None},
                                           "logprobs": None, "finish_reason": None}
            delta = ch.get("delta") or {}
            msg = acc["message"]
            if delta.get("role"):
                msg["role"] = delta["role"]
            text = delta.get("content")
            if text:
                msg["content"] = (msg["content"] or "") + text
            if delta.get("refusal"):
                msg["refusal"] = (msg.get("refusal") or "") + delta["refusal"]
            for tc in delta.get("tool_calls") or ():
                calls = msg.setdefault("tool_calls", [])
                ti = tc.get("index", 0)
                while len(calls) <= ti:
                    calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                cur = calls[ti]
                if tc.get("id"):
                    cur["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    cur["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    cur["function"]["arguments"] += fn["arguments"]
            if ch.get("finish_reason"):
                acc["finish_reason"] = ch["finish_reason"]
            if ch.get("logprobs"):
                lp = acc["logprobs"] or {"content": []}
                lp["content"].extend((ch["logprobs"] or {}).get("content") or [])
                acc["logprobs"] = lp

    def response(self, provider: str = "") -> ChatResponse:
        usage = self.usage or Usage()
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [self.choices[i] for i in sorted(self.choices)] or [
                    {"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}],
                "usage": usage.to_openai(), **self.extra}
        return ChatResponse(body, usage, provider, self.model)


def replay_chunks(resp: ChatResponse) -> list[dict[str, Any]]:
    """Turn a complete response into a canonical chunk sequence (cache hits served as streams)."""
    b = resp.body
    id_, model, created = b.get("id", ""), b.get("model", resp.model), b.get("created", int(time.time()))
    out: list[dict[str, Any]] = []
    for ch in b.get("choices") or ():
        idx = ch.get("index", 0)
        msg = ch.get("message") or {}
        out.append(new_chunk(id_, model, created, {"role": msg.get("role", "assistant"), "content": ""}, index=idx))
        if msg.get("content"):
            out.append(new_chunk(id_, model, created, {"content": msg["content"]}, index=idx))
        for ti, tc in enumerate(msg.get("tool_calls") or ()):
            out.append(new_chunk(id_, model, created, {"tool_calls": [{
                "index": ti, "id": tc.get("id"), "type": "function",
                "function": {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}}]},
                index=idx))
        out.append(new_chunk(id_, model, created, {}, ch.get("finish_reason") or "stop", index=idx))
    return out


def text_of(content: Any) -> str:
    """Plain text of an OpenAI message content (string or list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)
