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

Reasoning ("thinking") rides on the same shapes.  A response message may carry ``reasoning_content``
(the text, as DeepSeek and vLLM return it) and ``thinking_blocks`` (Anthropic's blocks, signatures
included).  A chunk's delta carries them incrementally:

* ``delta["reasoning_content"]`` -- reasoning text, appended to the message's ``reasoning_content`` and
  to the thinking block opened last (DeepSeek-style upstreams send only this);
* ``delta["thinking_blocks"]`` -- fragments ``{"index": k, ...}`` like ``tool_calls``: the first
  fragment of index ``k`` opens block ``k`` and names its ``type`` (``thinking``, or ``redacted_thinking``
  with its ``data``); later fragments of ``k`` carry ``signature`` text, appended.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Self

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
    # the client's ``anthropic-beta`` header (/v1/messages); only Anthropic providers send it upstream
    anthropic_beta: str | None = None
    # vendor-only top-level request fields, keyed by wire format (``extra["anthropic"]`` holds the
    # /v1/messages fields HelixAgent does not translate: ``context_management``, ``mcp_servers``, ...).  Only
    # a provider of that wire format sends them; for the others the ingress drops them and names them.
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the client's query string for the vendor's own endpoint (``beta=true`` on /v1/messages), re-encoded
    anthropic_query: str | None = None
    # (wire, param): the request uses a field only a provider of that wire format serves (e.g. Gemini's
    # ``cachedContent``), so any other candidate -- a fallback too -- refuses it (``refusal_for``)
    only_for: tuple[str, str] | None = None

    @property
    def max_tokens(self) -> int | None:
        v = self.params.get("max_completion_tokens") or self.params.get("max_tokens")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def refusal_for(self, provider: Any) -> Any:
        """A 400 GatewayError when ``provider`` cannot serve this request as asked, by a rule of the client
        format it came in (the router asks it of every candidate before mapping: a fallback that cannot
        serve it is skipped); None for a plain chat request."""
        of = self.only_for
        if of is None or provider.cfg.wire == of[0]:
            return None
        from .errors import GatewayError
        return GatewayError(400, f"'{of[1]}' needs a {of[0]} provider, and provider {provider.name!r} "
                                 f"({provider.cfg.type}) cannot serve it; route the model to a {of[0]} provider "
                                 "or remove it", code="unsupported_feature", param=of[1], provider=provider.name)

    def copy_for(self, model: str) -> Self:
        """The same request (of the same class, every field kept) for another model."""
        return dataclasses.replace(self, model=model)


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

    __slots__ = ("id", "model", "created", "choices", "usage", "extra", "chunks", "think")

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Usage | None = None
        self.extra: dict[str, Any] = {}
        self.chunks = 0
        self.think: dict[int, Any] = {}   # choice index -> index of its open thinking block fragment

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
            tbs = delta.get("thinking_blocks")
            if tbs:
                self.think[idx] = _fold_thinking(msg, tbs, self.think.get(idx))
            rc = delta.get("reasoning_content")
            if rc:
                msg["reasoning_content"] = (msg.get("reasoning_content") or "") + rc
                blocks = msg.get("thinking_blocks")
                if blocks:
                    last = blocks[-1]
                    if last.get("type") != "thinking":
                        last = {"type": "thinking", "thinking": "", "signature": ""}
                        blocks.append(last)
                        self.think[idx] = None
                    last["thinking"] += rc
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


def _fold_thinking(msg: dict[str, Any], frags: list[dict[str, Any]], cur: Any) -> Any:
    """Fold ``thinking_blocks`` delta fragments into ``msg``; returns the index of the open block."""
    blocks = msg.setdefault("thinking_blocks", [])
    for f in frags:
        k = f.get("index", 0)
        if k != cur or not blocks:
            cur = k
            if f.get("type") == "redacted_thinking":
                blocks.append({"type": "redacted_thinking", "data": f.get("data") or ""})
            else:
                blocks.append({"type": "thinking", "thinking": "", "signature": ""})
        sig = f.get("signature")
        if sig and blocks[-1]["type"] == "thinking":
            blocks[-1]["signature"] += sig
    return cur


def thinking_chunks(id_: str, model: str, created: int, msg: dict[str, Any], idx: int = 0
                    ) -> list[dict[str, Any]]:
    """The reasoning of a complete message (``thinking_blocks`` or bare ``reasoning_content``) as deltas."""
    blocks = msg.get("thinking_blocks")
    if not blocks:
        rc = msg.get("reasoning_content")
        return [new_chunk(id_, model, created, {"reasoning_content": rc}, index=idx)] if rc else []
    out = []
    for k, b in enumerate(blocks):
        if b.get("type") == "redacted_thinking":
            out.append(new_chunk(id_, model, created, {"thinking_blocks": [
                {"index": k, "type": "redacted_thinking", "data": b.get("data", "")}]}, index=idx))
            continue
        out.append(new_chunk(id_, model, created, {"thinking_blocks": [{"index": k, "type": "thinking"}]}, index=idx))
        if b.get("thinking"):
            out.append(new_chunk(id_, model, created, {"reasoning_content": b["thinking"]}, index=idx))
        if b.get("signature"):
            out.append(new_chunk(id_, model, created, {"thinking_blocks": [{"index": k, "signature": b["signature"]}]},
                                 index=idx))
    return out


def replay_chunks(resp: ChatResponse) -> list[dict[str, Any]]:
    """Turn a complete response into a canonical chunk sequence (cache hits served as streams)."""
    b = resp.body
    id_, model, created = b.get("id", ""), b.get("model", resp.model), b.get("created", int(time.time()))
    out: list[dict[str, Any]] = []
    for ch in b.get("choices") or ():
        idx = ch.get("index", 0)
        msg = ch.get("message") or {}
        out.append(new_chunk(id_, model, created, {"role": msg.get("role", "assistant"), "content": ""}, index=idx))
        if msg.get("reasoning_content") or msg.get("thinking_blocks"):
            out.extend(thinking_chunks(id_, model, created, msg, idx))
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
