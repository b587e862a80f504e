"""The Responses format's output side: canonical answers rendered as ``response`` objects
(:func:`render_response`) and canonical chunks as Responses SSE events (:class:`StreamTranslator`), with
the ``encrypted_content`` codec of the reasoning items HelixAgent mints (:func:`encode_reasoning`,
:func:`decode_reasoning`).  The request side and the overview are in :mod:`.responses_format`."""
from __future__ import annotations

import base64
import binascii
import time
from typing import TYPE_CHECKING, Any

import orjson

from ..canonical import ChatResponse, Usage, text_of
from ..errors import GatewayError
from ..providers.openai import NATIVE

if TYPE_CHECKING:
    from .responses_format import ResponsesRequest

ENC_PREFIX = "hxr1:"              # encrypted_content HelixAgent minted (an Anthropic thinking block)


# -- reasoning items: encrypted_content -------------------------------------------------------------

def decode_reasoning(item: dict[str, Any]) -> dict[str, Any] | None:
    """A reasoning item HelixAgent minted -> the canonical thinking block it carries (None: not ours)."""
    enc = item.get("encrypted_content")
    if not isinstance(enc, str) or not enc.startswith(ENC_PREFIX):
        return None
    try:
        b = orjson.loads(base64.urlsafe_b64decode(enc[len(ENC_PREFIX):].encode()))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        return None
    if isinstance(b, dict) and isinstance(b.get("r"), str):
        return {"type": "redacted_thinking", "data": b["r"]}
    if isinstance(b, dict) and isinstance(b.get("t"), str) and isinstance(b.get("s"), str):
        return {"type": "thinking", "thinking": b["t"], "signature": b["s"]}
    return None


def encode_reasoning(block: dict[str, Any]) -> str:
    if block.get("type") == "redacted_thinking":
        d: dict[str, Any] = {"r": block.get("data") or ""}
    else:
        d = {"t": block.get("thinking") or "", "s": block.get("signature") or ""}
    return ENC_PREFIX + base64.urlsafe_b64encode(orjson.dumps(d)).decode()


# -- response: canonical -> Responses ------------------------------------------------------------------

def usage_object(u: Usage | None) -> dict[str, Any]:
    u = u or Usage()
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cache_read_tokens,
                                     "cache_write_tokens": u.cache_creation_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens or (u.prompt_tokens + u.completion_tokens)}


def response_id(request_id: str) -> str:
    return "resp_" + request_id


def shell(req: ResponsesRequest, rid: str, model: str, status: str, created: float) -> dict[str, Any]:
    """The ``response`` object around its output (status, the request fields it repeats)."""
    e = req.echo
    text = e.get("text") or {}
    return {"id": rid, "object": "response", "created_at": int(created), "status": status,
            "background": bool(e.get("background")), "error": None, "incomplete_details": None,
            "instructions": e.get("instructions"), "max_output_tokens": e.get("max_output_tokens"),
            "metadata": e.get("metadata") or {}, "model": model, "output": [],
            "parallel_tool_calls": e.get("parallel_tool_calls") is not False,
            "previous_response_id": e.get("previous_response_id"),
            "reasoning": {"effort": (e.get("reasoning") or {}).get("effort"),
                          "summary": (e.get("reasoning") or {}).get("summary")},
            "service_tier": e.get("service_tier") or "default", "store": req.store,
            "temperature": e.get("temperature") if e.get("temperature") is not None else 1.0,
            "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
            "tool_choice": e.get("tool_choice") or "auto", "tools": e.get("tools") or [],
            "top_p": e.get("top_p") if e.get("top_p") is not None else 1.0,
            "truncation": e.get("truncation") or "disabled", "usage": None, "user": e.get("user")}


def reasoning_item(rid: str, k: int, text: str, block: dict[str, Any] | None, encrypted: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"id": f"rs_{rid}_{k}", "type": "reasoning",
                            "summary": [{"type": "summary_text", "text": text}] if text else []}
    if encrypted and block is not None:
        item["encrypted_content"] = encode_reasoning(block)
    return item


def output_items(msg: dict[str, Any], rid: str, encrypted: bool, status: str = "completed") -> list[dict[str, Any]]:
    """A canonical assistant message -> Responses output items (reasoning, message, function calls)."""
    out: list[dict[str, Any]] = []
    blocks = msg.get("thinking_blocks")
    if blocks:
        for k, b in enumerate(blocks):
            out.append(reasoning_item(rid, k, b.get("thinking") or "" if b.get("type") == "thinking" else "", b,
                                      encrypted))
    elif msg.get("reasoning_content"):
        out.append(reasoning_item(rid, 0, msg["reasoning_content"], None, False))
    text = text_of(msg.get("content"))
    if text or not msg.get("tool_calls"):
        out.append({"id": f"msg_{rid}", "type": "message", "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    for k, tc in enumerate(msg.get("tool_calls") or ()):
        fn = tc.get("function") or {}
        out.append({"id": f"fc_{rid}_{k}", "type": "function_call", "status": status,
                    "call_id": tc.get("id") or f"call_{rid}_{k}", "name": fn.get("name") or "",
                    "arguments": fn.get("arguments") or ""})
    return out


def render_response(resp: ChatResponse, req: ResponsesRequest, request_id: str) -> dict[str, Any]:
    """A canonical (or native) answer -> the ``response`` object the client gets."""
    body = resp.body
    native = body.pop(NATIVE, None) if isinstance(body, dict) else None
    if isinstance(native, dict):
        return native
    choices = body.get("choices") or [{}]
    ch = choices[0]
    rid = response_id(request_id)
    finish = ch.get("finish_reason")
    status = "incomplete" if finish == "length" else "completed"
    model = body.get("model") or resp.model or req.model
    out = shell(req, rid, model, status, body.get("created") or time.time())
    out["output"] = output_items(ch.get("message") or {}, rid, req.encrypted,
                                 "incomplete" if status == "incomplete" else "completed")
    if status == "incomplete":
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    elif finish == "content_filter":
        out["status"] = "incomplete"
        out["incomplete_details"] = {"reason": "content_filter"}
    out["usage"] = usage_object(resp.usage)
    out["completed_at"] = int(time.time()) if out["status"] == "completed" else None
    return out


# -- stream: canonical chunks -> Responses SSE events --------------------------------------------------------

def sse(event: dict[str, Any]) -> bytes:
    t: str = event["type"]
    return b"event: " + t.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class StreamTranslator:
    """Stateful: canonical chunks in, Responses events out, in the documented order --
    ``response.created``, ``response.in_progress``, then per output item ``response.output_item.added``,
    its parts and deltas (reasoning summary parts / text deltas; a message's content part and
    ``response.output_text.delta``; a function call's ``response.function_call_arguments.delta``), their
    ``.done`` events and ``response.output_item.done``, and ``response.completed`` (``response.incomplete``
    when the answer was cut by max_output_tokens) with usage.  Every event carries the next
    ``sequence_number``.  A failure ends with an ``error`` event and ``response.failed``.

    Native chunks (an OpenAI upstream's own events, under ``NATIVE``) are relayed as they are."""

    def __init__(self, req: ResponsesRequest, request_id: str, model: str):
        self.req = req
        self.rid = response_id(request_id)
        self.model = model
        self.created = time.time()
        self.seq = 0
        self.started = False
        self.items: list[dict[str, Any]] = []   # output items, done or open
        self.kind = ""                           # open item: "reasoning" | "message" | "call" | ""
        self.text = ""
        self.tool_index = -1
        self.think_index: Any = None
        self.reasoning_k = 0
        self.block: dict[str, Any] | None = None  # the open reasoning item's thinking block
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.native_final: dict[str, Any] | None = None
        self.native = False
        self.final: dict[str, Any] | None = None
        self.native_created: dict[str, Any] | None = None

    def _ev(self, d: dict[str, Any]) -> bytes:
        d["sequence_number"] = self.seq
        self.seq += 1
        return sse(d)

    def _shell(self, status: str) -> dict[str, Any]:
        return shell(self.req, self.rid, self.model, status, self.created)

    def _start(self) -> bytes:
        self.started = True
        r = self._shell("in_progress")
        return (self._ev({"type": "response.created", "response": r})
                + self._ev({"type": "response.in_progress", "response": dict(r)}))

    def _close(self) -> bytes:
        k, self.kind = self.kind, ""
        if not k:
            return b""
        oi = len(self.items) - 1
        item = self.items[oi]
        out = b""
        if k == "reasoning":
            if item["summary"]:
                s = item["summary"][0]
                out += self._ev({"type": "response.reasoning_summary_text.done", "item_id": item["id"],
                                 "output_index": oi, "summary_index": 0, "text": s["text"]})
                out += self._ev({"type": "response.reasoning_summary_part.done", "item_id": item["id"],
                                 "output_index": oi, "summary_index": 0, "part": dict(s)})
            if self.req.encrypted and self.block is not None and (self.block.get("signature")
                                                                  or self.block.get("type") == "redacted_thinking"):
                item["encrypted_content"] = encode_reasoning(self.block)
            self.block = None
        elif k == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            out += self._ev({"type": "response.output_text.done", "item_id": item["id"], "output_index": oi,
                             "content_index": 0, "text": self.text, "logprobs": []})
            out += self._ev({"type": "response.content_part.done", "item_id": item["id"], "output_index": oi,
                             "content_index": 0, "part": dict(part)})
        else:
            out += self._ev({"type": "response.function_call_arguments.done", "item_id": item["id"],
                             "output_index": oi, "arguments": item["arguments"], "name": item["name"]})
        item["status"] = "completed"
        return out + self._ev({"type": "response.output_item.done", "output_index": oi, "item": dict(item)})

    def _open(self, kind: str, item: dict[str, Any]) -> bytes:
        out = self._close()
        self.kind = kind
        self.items.append(item)
        return out + self._ev({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                               "item": dict(item)})

    def _reasoning(self, block: dict[str, Any] | None) -> bytes:
        k = self.reasoning_k
        self.reasoning_k += 1
        out = self._open("reasoning", {"id": f"rs_{self.rid}_{k}", "type": "reasoning", "summary": []})
        self.block = block
        return out

    def _reasoning_text(self, text: str) -> bytes:
        item = self.items[-1]
        oi = len(self.items) - 1
        out = b""
        if not item["summary"]:
            item["summary"].append({"type": "summary_text", "text": ""})
            out += self._ev({"type": "response.reasoning_summary_part.added", "item_id": item["id"],
                             "output_index": oi, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})
        item["summary"][0]["text"] += text
        if self.block is not None and self.block.get("type") == "thinking":
            self.block["thinking"] += text
        return out + self._ev({"type": "response.reasoning_summary_text.delta", "item_id": item["id"],
                               "output_index": oi, "summary_index": 0, "delta": text})

    def _text(self, text: str) -> bytes:
        out = b""
        if self.kind != "message":
            out += self._open("message", {"id": f"msg_{self.rid}", "type": "message", "status": "in_progress",
                                          "role": "assistant", "content": []})
            self.text = ""
            oi = len(self.items) - 1
            out += self._ev({"type": "response.content_part.added", "item_id": f"msg_{self.rid}",
                             "output_index": oi, "content_index": 0,
                             "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        if not text:
            return out
        self.text += text
        return out + self._ev({"type": "response.output_text.delta", "item_id": f"msg_{self.rid}",
                               "output_index": len(self.items) - 1, "content_index": 0, "delta": text,
                               "logprobs": []})

    def feed(self, chunk: dict[str, Any]) -> bytes:
        ev = chunk.get(NATIVE)
        if ev is not None:
            self.native = True
            if ev.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                self.native_final = ev.get("response")
            elif ev.get("type") == "response.created" and isinstance(ev.get("response"), dict):
                self.native_created = ev["response"]
            self.seq = max(self.seq, int(ev.get("sequence_number") or 0) + 1)
            return sse(ev)
        out = b"" if self.started else self._start()
        if chunk.get("model"):
            self.model = chunk["model"]
        u = chunk.get("usage")
        if u:
            self.usage = Usage.from_openai(u)
        for ch in chunk.get("choices") or ():
            if ch.get("index", 0) != 0:
                continue
            d = ch.get("delta") or {}
            for f in d.get("thinking_blocks") or ():
                k = f.get("index", 0)
                if k != self.think_index or self.kind != "reasoning":
                    self.think_index = k
                    if f.get("type") == "redacted_thinking":
                        out += self._reasoning({"type": "redacted_thinking", "data": f.get("data") or ""})
                    else:
                        out += self._reasoning({"type": "thinking", "thinking": "", "signature": ""})
                sig = f.get("signature")
                if sig and self.block is not None and self.block.get("type") == "thinking":
                    self.block["signature"] += sig
            rc = d.get("reasoning_content")
            if rc:
                if self.kind != "reasoning":
                    self.think_index = None
                    out += self._reasoning(None)
                out += self._reasoning_text(rc)
            text = d.get("content") or d.get("refusal")
            if text:
                out += self._text(text)
            for tc in d.get("tool_calls") or ():
                ti = tc.get("index", 0)
                fn = tc.get("function") or {}
                if self.kind != "call" or ti != self.tool_index:
                    self.tool_index = ti
                    k = sum(1 for i in self.items if i["type"] == "function_call")
                    cid = tc.get("id") or f"call_{self.rid}_{k}"
                    out += self._open("call", {"id": f"fc_{self.rid}_{k}", "type": "function_call",
                                               "status": "in_progress", "call_id": cid,
                                               "name": fn.get("name") or "", "arguments": ""})
                args = fn.get("arguments")
                if args:
                    item = self.items[-1]
                    item["arguments"] += args
                    out += self._ev({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                                     "output_index": len(self.items) - 1, "delta": args})
            if ch.get("finish_reason"):
                self.finish = ch["finish_reason"]
        return out

    def end(self, error: GatewayError | None) -> bytes:
        if self.native and error is None:
            return b""
        out = b"" if self.started or self.native else self._start()
        if error is not None:
            r = dict(self.native_created, status="failed") if self.native_created else self._shell("failed")
            if not self.native:
                r["output"] = self.items
            r["error"] = {"code": "server_error" if error.status >= 500 else "invalid_prompt",
                          "message": error.message}
            r["usage"] = usage_object(self.usage) if self.usage else None
            return (out + self._ev({"type": "error", "code": error.code, "message": error.message,
                                    "param": error.param})
                    + self._ev({"type": "response.failed", "response": r}))
        if not self.items:
            out += self._text("")
        out += self._close()
        incomplete = self.finish in ("length", "content_filter")
        r = self._shell("incomplete" if incomplete else "completed")
        r["output"] = self.items
        r["usage"] = usage_object(self.usage)
        if incomplete:
            r["incomplete_details"] = {"reason": "max_output_tokens" if self.finish == "length" else "content_filter"}
        else:
            r["completed_at"] = int(time.time())
        self.final = r
        return out + self._ev({"type": "response.incomplete" if incomplete else "response.completed", "response": r})
