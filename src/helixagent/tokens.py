"""Local token estimation (no network, no tokenizer download).

Used before the upstream call to reserve budgets and estimate cost; the real usage reported by the
provider settles the reservation afterwards.  The estimate errs on the high side: about one token per
3.5 characters of text (BPE tokenizers average ~4 for English), plus OpenAI's documented per-message
overhead of 3-4 tokens, plus a fixed cost per image part.
"""
from __future__ import annotations

from typing import Any

import orjson

_IMAGE_TOKENS = 765  # OpenAI's cost of a 'high detail' 512px tile image; a deliberate over-estimate


def estimate_text(text: str) -> int:
    if not text:
        return 0
    return (len(text) * 2 + 6) // 7  # ceil(len / 3.5)


def estimate_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """Canonical messages as the edge schemas guarantee them (``api/schemas/``): ``content`` is a string,
    a list of part objects (a text part's ``text`` a string) or null; ``tool_calls`` a list of function or
    custom calls whose fields are strings."""
    n = 3
    for m in messages:
        n += 4
        c = m.get("content")
        if isinstance(c, str):
            n += estimate_text(c)
        elif c:
            for part in c:
                t = part["type"]
                if t == "text":
                    n += estimate_text(part["text"])
                elif t in ("image_url", "image", "input_audio"):
                    n += _IMAGE_TOKENS
        for tc in m.get("tool_calls") or ():
            call = tc.get("function") or tc.get("custom") or {}
            args = call.get("arguments") or call.get("input") or ""
            n += 4 + estimate_text(call.get("name", "")) + estimate_text(args)
        if m.get("name"):
            n += 1
    if tools:
        n += estimate_text(orjson.dumps(tools).decode())
    return n
