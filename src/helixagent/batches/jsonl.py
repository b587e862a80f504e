"""Validation of a batch input file (JSONL), line by line: every error names its line (1-based)."""
from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError

# the endpoints a line (and a batch) may target, as OpenAI lists them
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")


def _bad(line: int, message: str) -> GatewayError:
    return GatewayError(400, f"line {line}: {message}", param="file", code="invalid_jsonl")


def parse_input(content: bytes, max_lines: int) -> list[tuple[int, dict[str, Any]]]:
    """The lines of a batch input file as (line number, object); a 400 naming the first bad line."""
    out: list[tuple[int, dict[str, Any]]] = []
    seen: set[str] = set()
    for n, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(n, "not UTF-8 text") from None
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise _bad(n, f"not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise _bad(n, "each line must be a JSON object with custom_id, method, url and body")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise _bad(n, "'custom_id' must be a non-empty string")
        if len(cid) > 512:
            raise _bad(n, "'custom_id' is longer than 512 characters")
        if cid in seen:
            raise _bad(n, f"'custom_id' {cid!r} is used by an earlier line; each line needs its own")
        seen.add(cid)
        if obj.get("method") != "POST":
            raise _bad(n, "'method' must be \"POST\"")
        if obj.get("url") not in ENDPOINTS:
            raise _bad(n, f"'url' must be one of {', '.join(ENDPOINTS)}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _bad(n, "'body' must be a JSON object (the request body)")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _bad(n, "'body.model' must be a non-empty string")
        extra = set(obj) - {"custom_id", "method", "url", "body"}
        if extra:
            raise _bad(n, f"unknown field(s) {', '.join(sorted(extra))}; a line has custom_id, method, url, body")
        out.append((n, obj))
        if len(out) > max_lines:
            raise _bad(n, f"a batch input file may hold at most {max_lines} requests (batches.max_lines)")
    if not out:
        raise GatewayError(400, "the file holds no request lines", param="file", code="invalid_jsonl")
    return out
