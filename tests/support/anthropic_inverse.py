"""A lenient Anthropic Messages request -> canonical translation, kept as an independent test oracle.

The gateway's one Anthropic -> canonical request translation is the validating ``/v1/messages`` ingress
(``helixagent.api.anthropic_format.parse_messages``); its normal form (single text blocks collapse to
strings, a system block list stays one system message) is what OpenAI-shaped upstreams want.  The provider
round-trip property tests need the exact inverse of ``canonical_to_anthropic_request`` instead, in the
normal form that function preserves; this module is that inverse.  Nothing in ``src`` uses it.
"""
from __future__ import annotations

from typing import Any

from helixagent.canonical import ChatRequest
from helixagent.errors import bad_request
from helixagent.providers.anthropic_mapping import _json_args


def _block_to_part(b: dict[str, Any], where: str) -> dict[str, Any]:
    t = b.get("type")
    if t == "text":
        part: dict[str, Any] = {"type": "text", "text": b.get("text", "")}
    elif t == "image":
        src = b.get("source") or {}
        if src.get("type") == "base64":
            url = f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"
        elif src.get("type") == "url":
            url = src.get("url", "")
        else:
            raise bad_request(f"'{where}.source.type' {src.get('type')!r} is not supported", param=where,
                              code="invalid_value")
        part = {"type": "image_url", "image_url": {"url": url}}
    elif t == "document":
        src = b.get("source") or {}
        if src.get("type") != "base64":
            raise bad_request(f"'{where}': only base64 documents can be translated", param=where,
                              code="unsupported_feature")
        f: dict[str, Any] = {"file_data": f"data:{src.get('media_type', 'application/pdf')};base64,{src.get('data', '')}"}
        if b.get("title"):
            f["filename"] = b["title"]
        part = {"type": "file", "file": f}
    else:
        raise bad_request(f"'{where}.type' {t!r} cannot be translated for this model", param=where,
                          code="unsupported_feature")
    if "cache_control" in b:
        part["cache_control"] = b["cache_control"]
    return part


def anthropic_request_to_canonical(body: dict[str, Any]) -> ChatRequest:
    """Translate a Messages API request body into a canonical request (input is validated)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: Field required", param="model", code="missing_required_parameter")
    msgs_in = body.get("messages")
    if not isinstance(msgs_in, list):
        raise bad_request("messages: Field required (an array)", param="messages", code="missing_required_parameter")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        for j, b in enumerate(system):
            if not isinstance(b, dict) or b.get("type") != "text":
                raise bad_request(f"system.{j}: only text blocks are allowed", param="system", code="invalid_value")
            if "cache_control" in b:
                messages.append({"role": "system", "content": [{"type": "text", "text": b.get("text", ""),
                                                                 "cache_control": b["cache_control"]}]})
            else:
                messages.append({"role": "system", "content": b.get("text", "")})
    elif system is not None:
        raise bad_request("system: must be a string or an array of text blocks", param="system", code="invalid_type")
    for i, m in enumerate(msgs_in):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise bad_request(f"{where}: must be an object", param=where, code="invalid_type")
        role = m.get("role")
        content = m.get("content")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role: must be 'user' or 'assistant', got {role!r}", param=where,
                              code="invalid_value")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content: must be a string or an array of content blocks", param=where,
                              code="invalid_type")
        for j, b in enumerate(content):
            if not isinstance(b, dict):
                raise bad_request(f"{where}.content.{j}: must be an object", param=where, code="invalid_type")
        if role == "user":
            parts: list[dict[str, Any]] = []
            for j, b in enumerate(content):
                if b.get("type") == "tool_result":
                    if parts:  # a result after other content: flush the content first to keep order
                        messages.append({"role": "user", "content": parts})
                        parts = []
                    tc = b.get("content")
                    if isinstance(tc, list):
                        tc = [_block_to_part(x, f"{where}.content.{j}.content") for x in tc]
                    elif tc is None:
                        tc = ""
                    messages.append({"role": "tool", "tool_call_id": b.get("tool_use_id", ""), "content": tc})
                else:
                    parts.append(_block_to_part(b, f"{where}.content.{j}"))
            if parts or not content:
                messages.append({"role": "user", "content": parts})
        else:
            msg: dict[str, Any] = {"role": "assistant"}
            parts = []
            calls = []
            thinking = []
            for j, b in enumerate(content):
                t = b.get("type")
                if t == "tool_use":
                    calls.append({"id": b.get("id", ""), "type": "function",
                                  "function": {"name": b.get("name", ""), "arguments": _json_args(b.get("input"))}})
                elif t in ("thinking", "redacted_thinking"):
                    thinking.append(b)
                else:
                    parts.append(_block_to_part(b, f"{where}.content.{j}"))
            if len(parts) == 1 and parts[0]["type"] == "text" and "cache_control" not in parts[0]:
                msg["content"] = parts[0]["text"]  # the usual OpenAI shape of an assistant turn
            else:
                msg["content"] = parts if parts else (None if calls else "")
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["thinking_blocks"] = thinking
                msg["reasoning_content"] = "".join(x.get("thinking", "") for x in thinking)
            messages.append(msg)
    params: dict[str, Any] = {}
    for k, v in body.items():
        if k in ("model", "messages", "system", "stream"):
            continue
        if k == "stop_sequences":
            params["stop"] = v
        elif k == "tools":
            params["tools"] = _tools_to_canonical(v)
        elif k == "tool_choice":
            tc, parallel = _tool_choice_to_canonical(v)
            if tc is not None:
                params["tool_choice"] = tc
            if parallel is not None:
                params["parallel_tool_calls"] = parallel
        elif k == "metadata":
            if isinstance(v, dict) and v.get("user_id") is not None:
                params["user"] = v["user_id"]
        elif k == "output_config" and isinstance(v, dict):
            rest = dict(v)
            fmt = rest.pop("format", None)
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                params["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "response", "schema": fmt.get("schema") or {}}}
            elif fmt is not None:
                rest["format"] = fmt
            if rest.get("effort") is not None:
                params["reasoning_effort"] = rest.pop("effort")
            if rest:
                params["output_config"] = rest
        else:
            params[k] = v  # max_tokens, temperature, top_p, top_k, thinking, ...
    stream = body.get("stream") is True
    return ChatRequest(model=model, messages=messages, params=params, stream=stream, include_usage=stream,
                       endpoint="chat")


def _tools_to_canonical(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request("tools: must be an array", param="tools", code="invalid_type")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"tools.{i}: must be an object", param="tools", code="invalid_type")
        if t.get("type") in (None, "custom") and "input_schema" in t:
            fn: dict[str, Any] = {"name": t.get("name", "")}
            if t.get("description") is not None:
                fn["description"] = t["description"]
            fn["parameters"] = t["input_schema"]
            d: dict[str, Any] = {"type": "function", "function": fn}
            if "cache_control" in t:
                d["cache_control"] = t["cache_control"]
            out.append(d)
        else:
            out.append(t)  # server tools (web_search_..., bash_...) stay Anthropic-native
    return out


def _tool_choice_to_canonical(tc: Any) -> tuple[Any, bool | None]:
    if not isinstance(tc, dict):
        raise bad_request("tool_choice: must be an object", param="tool_choice", code="invalid_type")
    t = tc.get("type")
    parallel = False if tc.get("disable_parallel_tool_use") else None
    if t == "auto":
        return "auto", parallel
    if t == "any":
        return "required", parallel
    if t == "none":
        return "none", parallel
    if t == "tool":
        return {"type": "function", "function": {"name": tc.get("name", "")}}, parallel
    raise bad_request(f"tool_choice.type: {t!r} is not one of auto, any, tool, none", param="tool_choice",
                      code="invalid_value")
