"""A canonical answer -> an Anthropic ``message`` object (the non-streamed /v1/messages response)."""
from __future__ import annotations

import time
from typing import Any

import orjson

from ..canonical import ChatResponse, Usage, text_of
from ..providers.anthropic_mapping import finish_to_stop_reason, tool_input, usage_to_anthropic


def message_id(upstream_id: str | None) -> str:
    if not upstream_id:
        return "msg_" + orjson.dumps(time.time_ns()).decode()
    if upstream_id.startswith("msg_"):
        return upstream_id
    return "msg_" + upstream_id.removeprefix("chatcmpl-")


def stop_reason_of(choice: dict[str, Any]) -> tuple[str, str | None]:
    seq = choice.get("stop_sequence")  # set by providers that know which sequence matched
    if isinstance(seq, str) and seq:
        return "stop_sequence", seq
    return finish_to_stop_reason(choice.get("finish_reason") or "stop"), None


def canonical_response_to_anthropic(b: dict[str, Any], usage: Usage | None = None, model: str = "") -> dict[str, Any]:
    """A canonical chat.completion body -> an Anthropic ``message`` object (first choice).  ``usage``
    defaults to the body's; ``model`` is used when the body names none."""
    choices = b.get("choices") or ()
    choice = choices[0] if choices else {}
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    tbs = msg.get("thinking_blocks")
    if tbs:
        content.extend(tbs)
    elif msg.get("reasoning_content"):
        # reasoning from a non-Anthropic upstream (DeepSeek, vLLM): a thinking block without a signature
        content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    text = text_of(msg.get("content"))
    if not text and msg.get("refusal"):
        text = msg["refusal"]
    if text:
        content.append({"type": "text", "text": text})
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {}
        content.append({"type": "tool_use", "id": tc.get("id") or "toolu_" + str(len(content)),
                        "name": fn.get("name") or "", "input": tool_input(fn.get("arguments"))})
    reason, seq = stop_reason_of(choice)
    return {"id": message_id(b.get("id")), "type": "message", "role": "assistant", "content": content,
            "model": b.get("model") or model, "stop_reason": reason, "stop_sequence": seq,
            "usage": usage_to_anthropic(usage if usage is not None else Usage.from_openai(b.get("usage")))}


def render_message(resp: ChatResponse, request_model: str = "") -> dict[str, Any]:
    return canonical_response_to_anthropic(resp.body, resp.usage, resp.model or request_model)
