"""Canonical stream chunks -> Anthropic Messages SSE events (the streamed /v1/messages response)."""
from __future__ import annotations

from typing import Any

import orjson

from ..canonical import Usage
from ..errors import GatewayError
from ..providers.anthropic_mapping import finish_to_stop_reason, sse_event, usage_to_anthropic
from ..tokens import estimate_messages
from .anthropic_response import message_id

_TEXT_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_DELTA_MID = b',"delta":{"type":"text_delta","text":'
_TEXT_DELTA_TAIL = b'}}\n\n'


class StreamTranslator:
    """Stateful: canonical OpenAI chunks in, Anthropic SSE frames out.

    message_start, then per block content_block_start / content_block_delta* / content_block_stop (thinking
    blocks with thinking_delta / signature_delta, redacted_thinking blocks, text blocks, and one tool_use
    block per tool call index with input_json_delta), then message_delta
    (stop_reason + usage) and message_stop once the stream has ended (OpenAI sends usage after the finish
    chunk).  A failure ends with an ``error`` event in Anthropic's error shape."""

    __slots__ = ("model", "messages", "started", "block", "kind", "tool_index", "think_index", "finish", "usage",
                 "seq", "msg_id")

    def __init__(self, model: str, messages: list[dict[str, Any]] | None = None):
        self.model = model
        self.messages = messages
        self.started = False
        self.block = -1           # index of the open block (-1: none open)
        self.kind = ""            # "text" | "tool" | "thinking" | "redacted" for the open block
        self.tool_index = -1      # canonical tool call index of the open tool block
        self.think_index: Any = None  # canonical thinking block index of the open thinking block
        self.finish: str | None = None
        self.seq: str | None = None
        self.usage: Usage | None = None
        self.msg_id = ""

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self.started = True
        self.msg_id = message_id(chunk.get("id"))
        if chunk.get("model"):
            self.model = chunk["model"]
        est = estimate_messages(self.messages) if self.messages else 0
        return sse_event("message_start", {"type": "message_start", "message": {
            "id": self.msg_id, "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": est, "output_tokens": 0, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0}}})

    def _close(self) -> bytes:
        if self.kind:
            self.kind = ""
            return sse_event("content_block_stop", {"type": "content_block_stop", "index": self.block})
        return b""

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.block += 1
        self.kind = kind
        return out + sse_event("content_block_start", {"type": "content_block_start", "index": self.block,
                                                   "content_block": block})

    def _text(self, text: str) -> bytes:
        # the per-token hot path: byte concatenation instead of building and serialising a dict
        out = b"" if self.kind == "text" else self._open("text", {"type": "text", "text": ""})
        return (out + _TEXT_DELTA_HEAD + str(self.block).encode() + _TEXT_DELTA_MID + orjson.dumps(text)
                + _TEXT_DELTA_TAIL)

    def _thinking_frags(self, frags: list[dict[str, Any]]) -> bytes:
        out = b""
        for f in frags:
            k = f.get("index", 0)
            if k != self.think_index or self.kind not in ("thinking", "redacted"):
                self.think_index = k
                if f.get("type") == "redacted_thinking":
                    out += self._open("redacted", {"type": "redacted_thinking", "data": f.get("data") or ""})
                else:
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            sig = f.get("signature")
            if sig and self.kind == "thinking":
                out += sse_event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                         "delta": {"type": "signature_delta", "signature": sig}})
        return out

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self.started else self._start(chunk)
        u = chunk.get("usage")
        if u:
            self.usage = Usage.from_openai(u)
        for ch in chunk.get("choices") or ():
            if ch.get("index", 0) != 0:
                continue
            d = ch.get("delta") or {}
            tbs = d.get("thinking_blocks")
            if tbs:
                out += self._thinking_frags(tbs)
            rc = d.get("reasoning_content")
            if rc:
                if self.kind != "thinking":
                    self.think_index = None
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out += sse_event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                         "delta": {"type": "thinking_delta", "thinking": rc}})
            text = d.get("content")
            if text:
                out += self._text(text)
            if d.get("refusal"):
                out += self._text(d["refusal"])
            for tc in d.get("tool_calls") or ():
                ti = tc.get("index", 0)
                fn = tc.get("function") or {}
                if self.kind != "tool" or ti != self.tool_index:
                    self.tool_index = ti
                    out += self._open("tool", {"type": "tool_use", "id": tc.get("id") or f"toolu_{self.msg_id}_{ti}",
                                               "name": fn.get("name") or "", "input": {}})
                args = fn.get("arguments")
                if args:
                    out += sse_event("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                         "delta": {"type": "input_json_delta", "partial_json": args}})
            fr = ch.get("finish_reason")
            if fr:
                self.finish = fr
                seq = ch.get("stop_sequence")
                if isinstance(seq, str) and seq:
                    self.seq = seq
                out += self._close()
        return out

    def end(self, error: GatewayError | None = None) -> bytes:
        out = b"" if self.started else self._start({})
        if error is not None:
            return out + sse_event("error", error.anthropic_body())
        out += self._close()
        if self.seq:
            reason: str = "stop_sequence"
        else:
            reason = finish_to_stop_reason(self.finish or "stop")
        usage = usage_to_anthropic(self.usage) if self.usage is not None else {"output_tokens": 0}
        out += sse_event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": reason, "stop_sequence": self.seq},
                                       "usage": usage})
        return out + sse_event("message_stop", {"type": "message_stop"})
