"""Stored cache values: the compact encoding of an answer, its replay as a stream, Cache-Control."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

import orjson

from ..canonical import ChatResponse, Usage, new_chunk, usage_chunk

_dumps = orjson.dumps
_loads = orjson.loads


def encode(resp: ChatResponse, provider: str | None, model: str | None) -> bytes:
    """Compact value: the canonical chat.completion body, its usage, who served it."""
    body = resp.body
    if "provider" in body:  # added by the OpenAI renderer; not part of the answer
        body = {k: v for k, v in body.items() if k != "provider"}
    u = resp.usage or Usage()
    return _dumps({"p": provider or resp.provider, "m": model or resp.model,
                   "u": [u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cache_read_tokens,
                         u.cache_creation_tokens], "b": body})


def decode(raw: bytes) -> tuple[ChatResponse, str]:
    """-> (response, upstream model).  A private copy every time: renderers may mutate it."""
    d = _loads(raw)
    b = d["b"]
    if not isinstance(b, dict) or not isinstance(b.get("choices"), list):
        raise ValueError("not a cached chat.completion")
    return ChatResponse(b, Usage(*d["u"]), d["p"], b.get("model") or d["m"]), d["m"]


def complete(resp: ChatResponse | None) -> bool:
    """Every choice ended with a finish_reason (a cut stream or an empty answer is never stored)."""
    if resp is None:
        return False
    choices = resp.body.get("choices")
    if not choices:
        return False
    return all(c.get("finish_reason") for c in choices)


def replay(resp: ChatResponse, include_usage: bool) -> list[dict[str, Any]]:
    """A complete answer as OpenAI ``chat.completion.chunk`` dicts (role, content with its logprobs,
    refusal, tool calls, finish), then a usage chunk when the client asked for one."""
    b = resp.body
    id_ = b.get("id") or ""
    model = b.get("model") or resp.model
    created = b.get("created") or int(time.time())
    out: list[dict[str, Any]] = []
    for ch in b.get("choices") or ():
        idx = ch.get("index", 0)
        msg = ch.get("message") or {}
        out.append(new_chunk(id_, model, created, {"role": msg.get("role") or "assistant", "content": ""},
                             index=idx))
        content = msg.get("content")
        if content:
            c = new_chunk(id_, model, created, {"content": content}, index=idx)
            if ch.get("logprobs"):
                c["choices"][0]["logprobs"] = ch["logprobs"]
            out.append(c)
        if msg.get("refusal"):
            out.append(new_chunk(id_, model, created, {"refusal": msg["refusal"]}, index=idx))
        calls = msg.get("tool_calls")
        if calls:
            out.append(new_chunk(id_, model, created, {"tool_calls": [
                {"index": i, "id": tc.get("id"), "type": tc.get("type") or "function",
                 "function": {"name": (tc.get("function") or {}).get("name") or "",
                              "arguments": (tc.get("function") or {}).get("arguments") or ""}}
                for i, tc in enumerate(calls)]}, index=idx))
        out.append(new_chunk(id_, model, created, {}, ch.get("finish_reason") or "stop", index=idx))
    fp = b.get("system_fingerprint")
    if fp:
        for c in out:
            c["system_fingerprint"] = fp
    if include_usage:
        out.append(usage_chunk(id_, model, created, resp.usage))
    return out


async def _aiter(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for c in chunks:
        yield c


def parse_cache_control(value: str) -> tuple[bool, bool]:
    """-> (no_cache, no_store).  ``max-age=0`` is read as no-cache."""
    no_cache = no_store = False
    for part in value.lower().split(","):
        d = part.strip()
        if d == "no-cache" or d == "max-age=0":
            no_cache = True
        elif d == "no-store":
            no_store = True
    return no_cache, no_store
