"""Anthropic Messages SSE events as a client sees them: each validated with the SDK's own event type, the
order of message and block events checked, and the message folded back from the events (independently of
the SDK's accumulator).  Shared by the ingress tests (over HTTP) and the translation property tests."""
from __future__ import annotations

from typing import Any

import orjson
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

EVENT = TypeAdapter(RawMessageStreamEvent)


def check_order(events: list[dict[str, Any]]) -> None:
    """message_start first; blocks start/delta*/stop nested in index order; message_delta, message_stop last."""
    types = [e["type"] for e in events]
    assert types[0] == "message_start"
    assert types[-2:] == ["message_delta", "message_stop"]
    assert types.count("message_start") == 1 and types.count("message_delta") == 1
    open_index = None
    next_index = 0
    for e in events[1:-2]:
        if e["type"] == "content_block_start":
            assert open_index is None and e["index"] == next_index
            open_index = e["index"]
            next_index += 1
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
        else:
            raise AssertionError(f"unexpected event {e['type']} inside the message")
    assert open_index is None


def fold(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the message from raw events (independently of the SDK's accumulator)."""
    msg = dict(events[0]["message"])
    msg["content"] = []
    partial: dict[int, str] = {}
    for e in events[1:]:
        if e["type"] == "content_block_start":
            msg["content"].append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            d = e["delta"]
            if d["type"] == "text_delta":
                assert msg["content"][e["index"]]["type"] == "text"
                msg["content"][e["index"]]["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                assert msg["content"][e["index"]]["type"] == "thinking"
                msg["content"][e["index"]]["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                assert msg["content"][e["index"]]["type"] == "thinking"
                msg["content"][e["index"]]["signature"] += d["signature"]
            else:
                assert d["type"] == "input_json_delta" and msg["content"][e["index"]]["type"] == "tool_use"
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
        elif e["type"] == "message_delta":
            msg.update(e["delta"])
            msg["usage"] = {**msg["usage"], **e["usage"]}
    for i, s in partial.items():
        msg["content"][i]["input"] = orjson.loads(s)
    return msg
