"""Anthropic Messages API <-> canonical (OpenAI chat) mapping, as pure functions.  Nothing here does I/O.

Each direction of the Anthropic wire format has exactly one owner:

* this module (the provider side): canonical request -> Messages API body
  (:func:`canonical_to_anthropic_request`), Message -> canonical (:func:`anthropic_response_to_canonical`),
  Anthropic SSE events -> canonical chunks (:class:`AnthropicStreamDecoder`), and the shared vocabulary
  both sides use: :func:`stop_reason_to_finish`, :func:`finish_to_stop_reason`, :func:`usage_from_anthropic`,
  :func:`usage_to_anthropic`, :func:`tool_input`, :func:`sse_event`, :class:`AnthropicStreamError`.
* ``helixagent.api.anthropic_format`` (the ``/v1/messages`` ingress): Messages API body -> canonical
  request (validated, with 400s in Anthropic's error shape), canonical response -> Message, canonical
  chunks -> Anthropic SSE.  It imports the vocabulary above.

Decisions (documented in docs/providers.md):

* system/developer messages are hoisted to the top-level ``system`` (one text block per message when
  there are several, a plain string when there is one string).
* consecutive messages of one role are merged (tool results become ``tool_result`` blocks of one user
  turn, placed first as Anthropic requires).
* ``response_format`` json_schema -> ``output_config.format`` (structured outputs) and
  ``reasoning_effort`` low/medium/high/xhigh -> ``output_config.effort``, and back.
* ``temperature`` > 1, ``n`` > 1, ``logprobs``/``top_logprobs``, non-zero presence/frequency penalties,
  ``logit_bias``, ``response_format`` json_object (no schema), audio output and predicted outputs
  are rejected with a 400 (Anthropic has no equivalent).  ``seed`` is accepted and ignored: OpenAI only
  promises best-effort determinism for it, so ignoring it changes no contract.  OpenAI bookkeeping fields
  (``store``, ``metadata`` other than ``user_id``, ``service_tier``, ``stream_options``) are dropped.
* fields the mapping does not know (e.g. Anthropic's own ``top_k``, ``thinking``) pass through
  unchanged in both directions, so an Anthropic client reaches a Claude upstream without loss; so do the
  ingress's ``ChatRequest.extra["anthropic"]`` (top-level fields it does not translate, merged into the
  body), ``anthropic_block`` parts (blocks kept whole) and ``part["anthropic"]`` / ``tool["anthropic"]``
  (untranslated fields of a block or tool, merged back into it).
* usage: OpenAI's ``prompt_tokens`` counts cached tokens, Anthropic's ``input_tokens`` does not, so
  ``prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens`` and the reverse
  subtracts them again.  The canonical usage dict also carries ``cache_creation_input_tokens``.
* thinking blocks become ``reasoning_content`` (text) plus ``thinking_blocks`` (with signatures) on the
  assistant message, and come back as thinking blocks, so extended thinking survives multi-turn tool use.
  In streams, ``thinking_delta`` becomes a ``reasoning_content`` delta and block starts / ``signature_delta``
  become ``thinking_blocks`` delta fragments (see :mod:`helixagent.canonical`).
* ``name`` on chat messages and the ``detail`` of image parts have no Anthropic equivalent and are
  dropped.  The ingress's canonical extensions (``cache_control`` on parts, tools, tool calls, tool
  messages and in params; ``is_error`` on tool messages) become the Anthropic fields again.
"""
from __future__ import annotations

import time
from typing import Any, Callable, overload

import orjson

from ..canonical import ChatRequest, Usage, new_chunk, usage_chunk
from ..errors import GatewayError, bad_request
from .base import image_url_of, split_image_data_url
from .checks import check_chat

Unsupported = Callable[[str, "str | None"], GatewayError]

# -- stop reasons --------------------------------------------------------------------------------------
_STOP_TO_FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}
_FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                   "function_call": "tool_use", "content_filter": "refusal"}
_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
                 "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                 "api_error": 500, "overloaded_error": 529, "timeout_error": 504, "billing_error": 402}
_EFFORTS = frozenset(("low", "medium", "high", "xhigh", "max"))
# OpenAI request fields that are bookkeeping on OpenAI's side and carry no meaning for generation.
_DROP = frozenset(("store", "service_tier", "stream_options", "seed", "stream"))


def stop_reason_to_finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return _STOP_TO_FINISH.get(reason, "stop")


@overload
def finish_to_stop_reason(finish: str) -> str: ...
@overload
def finish_to_stop_reason(finish: None) -> None: ...
def finish_to_stop_reason(finish: str | None) -> str | None:
    if finish is None:
        return None
    return _FINISH_TO_STOP.get(finish, "end_turn")


def error_status(etype: str | None) -> int:
    """HTTP status Anthropic uses for an error ``type`` (for errors seen inside a stream)."""
    return _ERROR_STATUS.get(etype or "", 500)


def _default_unsupported(feature: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, f"the Anthropic Messages API does not support {feature}",
                        code="unsupported_feature", param=param)


# -- usage -----------------------------------------------------------------------------------------
def usage_from_anthropic(u: dict[str, Any] | None) -> Usage:
    if not u:
        return Usage()
    inp = int(u.get("input_tokens") or 0)
    cr = int(u.get("cache_read_input_tokens") or 0)
    cc = int(u.get("cache_creation_input_tokens") or 0)
    out = int(u.get("output_tokens") or 0)
    p = inp + cr + cc
    return Usage(p, out, p + out, cr, cc)


def usage_to_openai(usage: Usage) -> dict[str, Any]:
    """Canonical usage dict (OpenAI shape) plus ``cache_creation_input_tokens`` when non-zero."""
    d = usage.to_openai()
    if usage.cache_creation_tokens:
        d["cache_creation_input_tokens"] = usage.cache_creation_tokens
    return d


def usage_to_anthropic(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": max(0, usage.prompt_tokens - usage.cache_read_tokens - usage.cache_creation_tokens),
            "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": usage.cache_creation_tokens,
            "cache_read_input_tokens": usage.cache_read_tokens}


# -- content parts ---------------------------------------------------------------------------------
def _image_to_anthropic(part: dict[str, Any], where: str, unsupported: Unsupported) -> dict[str, Any]:
    url = image_url_of(part, where)
    if url.startswith("data:"):
        media, data = split_image_data_url(url, where)
        block: dict[str, Any] = {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    elif url.startswith(("http://", "https://")):
        block = {"type": "image", "source": {"type": "url", "url": url}}
    else:
        raise bad_request(f"'{where}': image URLs must be http(s) or data: URLs", param=where, code="invalid_value")
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _file_to_anthropic(part: dict[str, Any], where: str, unsupported: Unsupported) -> dict[str, Any]:
    f = part.get("file") or {}
    data = f.get("file_data") if isinstance(f, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        raise unsupported("file parts other than inline base64 data (file_id is OpenAI-only)", where)
    head, _, payload = data[5:].partition(",")
    media, _, enc = head.partition(";")
    if enc != "base64":
        raise bad_request(f"'{where}': file data must be a base64 data URL", param=where, code="invalid_value")
    block: dict[str, Any] = {"type": "document", "source": {"type": "base64", "media_type": media, "data": payload}}
    if f.get("filename"):
        block["title"] = f["filename"]
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _parts_to_blocks(content: Any, where: str, unsupported: Unsupported) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"'{where}' must be a string or an array of content parts", param=where,
                          code="invalid_type")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        if isinstance(part, str):
            if part:
                out.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            raise bad_request(f"'{w}' must be an object", param=w, code="invalid_type")
        t = part.get("type")
        if t == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"'{w}.text' must be a string", param=w, code="invalid_type")
            if text:
                b: dict[str, Any] = {"type": "text", "text": text}
                if "cache_control" in part:
                    b["cache_control"] = part["cache_control"]
                ext = part.get("anthropic")
                if isinstance(ext, dict):  # Anthropic fields the ingress did not translate (citations, ...)
                    b.update(ext)
                out.append(b)
        elif t == "refusal":
            if part.get("refusal"):
                out.append({"type": "text", "text": part["refusal"]})
        elif t == "image_url":
            out.append(_image_to_anthropic(part, w, unsupported))
        elif t == "file":
            out.append(_file_to_anthropic(part, w, unsupported))
        elif t == "input_audio":
            raise unsupported("audio input", w)
        elif t == "anthropic_block":  # a block the ingress kept whole (server tool results, search results...)
            blk = part.get("block")
            if not isinstance(blk, dict) or not isinstance(blk.get("type"), str):
                raise bad_request(f"'{w}.block' must be an Anthropic content block", param=w, code="invalid_type")
            out.append(blk)
        else:
            raise bad_request(f"'{w}.type' {t!r} is not a known content part type", param=w, code="invalid_value")
    return out


def _system_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                b = {"type": "text", "text": p.get("text", "")}
                if "cache_control" in p:
                    b["cache_control"] = p["cache_control"]
                out.append(b)
            elif isinstance(p, str):
                out.append({"type": "text", "text": p})
            else:
                raise bad_request(f"'{where}': system messages may contain text parts only", param=where,
                                  code="invalid_value")
        return out
    raise bad_request(f"'{where}' must be a string or an array of text parts", param=where, code="invalid_type")


def _tool_input(args: Any, where: str) -> dict[str, Any]:
    if isinstance(args, dict):
        return args
    if args is None or args == "":
        return {}
    if not isinstance(args, str):
        raise bad_request(f"'{where}' must be a JSON string", param=where, code="invalid_type")
    try:
        v = orjson.loads(args)
    except orjson.JSONDecodeError:
        raise bad_request(f"'{where}' is not valid JSON; Anthropic needs tool arguments as a JSON object",
                          param=where, code="invalid_value") from None
    if not isinstance(v, dict):
        raise bad_request(f"'{where}' must encode a JSON object", param=where, code="invalid_value")
    return v


# -- request: canonical -> Anthropic -------------------------------------------------------------------
def _convert_messages(messages: list[dict[str, Any]], unsupported: Unsupported
                      ) -> tuple[list[dict[str, Any]] | str | None, list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    system_plain = True  # a single plain string system message stays a string
    out: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]], keep_string: str | None = None) -> None:
        if out and out[-1]["role"] == role:
            prev = out[-1]
            if isinstance(prev["content"], str):
                prev["content"] = [{"type": "text", "text": prev["content"]}] if prev["content"] else []
            if keep_string is not None:
                blocks = [{"type": "text", "text": keep_string}] if keep_string else []
            prev["content"].extend(blocks)
            return
        if keep_string is not None:
            out.append({"role": role, "content": keep_string})
        else:
            out.append({"role": role, "content": blocks})

    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            system_plain = system_plain and not system and isinstance(content, str) and "cache_control" not in m
            system.extend(_system_blocks(content, where + ".content"))
        elif role == "user":
            if isinstance(content, str):
                push("user", [], keep_string=content)
            else:
                push("user", _parts_to_blocks(content, where + ".content", unsupported))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            for tb in m.get("thinking_blocks") or ():
                if isinstance(tb, dict) and tb.get("type") in ("thinking", "redacted_thinking"):
                    blocks.append(tb)
            tool_calls = m.get("tool_calls") or ()
            if isinstance(content, str) and not tool_calls and not blocks:
                if content:
                    push("assistant", [], keep_string=content)
                continue
            blocks.extend(_parts_to_blocks(content, where + ".content", unsupported))
            if m.get("refusal") and not content:
                blocks.append({"type": "text", "text": m["refusal"]})
            for k, tc in enumerate(tool_calls):
                w = f"{where}.tool_calls[{k}]"
                if not isinstance(tc, dict) or tc.get("type", "function") != "function":
                    raise unsupported("tool calls other than function calls", w)
                fn = tc.get("function") or {}
                if not fn.get("name") or not tc.get("id"):
                    raise bad_request(f"'{w}' needs an id and a function name", param=w,
                                      code="missing_required_parameter")
                tb = {"type": "tool_use", "id": tc["id"], "name": fn["name"],
                      "input": _tool_input(fn.get("arguments"), w + ".function.arguments")}
                if "cache_control" in tc:
                    tb["cache_control"] = tc["cache_control"]
                blocks.append(tb)
            if m.get("function_call"):
                raise unsupported("the legacy function_call message field (use tool_calls)", where)
            if blocks:
                push("assistant", blocks)
        elif role == "tool":
            tcid = m.get("tool_call_id")
            if not isinstance(tcid, str) or not tcid:
                raise bad_request(f"'{where}.tool_call_id' is required for tool messages", param=where,
                                  code="missing_required_parameter")
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tcid}
            if isinstance(content, str):
                block["content"] = content
            elif content is not None:
                block["content"] = _parts_to_blocks(content, where + ".content", unsupported)
            if m.get("is_error"):  # canonical extension set by the /v1/messages ingress
                block["is_error"] = True
            if "cache_control" in m:
                block["cache_control"] = m["cache_control"]
            if out and out[-1]["role"] == "user":
                prev = out[-1]
                if isinstance(prev["content"], str):
                    prev["content"] = [{"type": "text", "text": prev["content"]}] if prev["content"] else []
                # tool results must lead the user turn: insert after the results already there
                pos = 0
                while pos < len(prev["content"]) and prev["content"][pos].get("type") == "tool_result":
                    pos += 1
                prev["content"].insert(pos, block)
            else:
                out.append({"role": "user", "content": [block]})
        elif role == "function":
            raise unsupported("the legacy 'function' role (use tool messages)", where + ".role")
        else:
            raise bad_request(f"'{where}.role' {role!r} is not a chat role", param=where + ".role",
                              code="invalid_value")
    sys_out: list[dict[str, Any]] | str | None
    if not system:
        sys_out = None
    elif system_plain and len(system) == 1 and "cache_control" not in system[0]:
        sys_out = system[0]["text"]
    else:
        sys_out = system
    return sys_out, out


def _tools_to_anthropic(tools: Any, unsupported: Unsupported) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", param="tools", code="invalid_type")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"'tools[{i}]' must be an object", param=f"tools[{i}]", code="invalid_type")
        typ = t.get("type")
        if typ == "function":
            fn = t.get("function") or {}
            if not isinstance(fn, dict) or not fn.get("name"):
                raise bad_request(f"'tools[{i}].function.name' is required", param=f"tools[{i}]",
                                  code="missing_required_parameter")
            d: dict[str, Any] = {"name": fn["name"]}
            if fn.get("description") is not None:
                d["description"] = fn["description"]
            d["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
            if "cache_control" in t:
                d["cache_control"] = t["cache_control"]
            ext = t.get("anthropic")
            if isinstance(ext, dict):  # Anthropic tool fields the ingress did not translate (strict, ...)
                d.update(ext)
            out.append(d)
        elif typ == "custom" or typ is None and "function" in t:
            raise unsupported(f"{typ or 'untyped'} tools", f"tools[{i}]")
        else:  # an Anthropic-native tool (server tools, or a bare {name, input_schema}) passes unchanged
            out.append(t)
    return out


def _tool_choice_to_anthropic(tc: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if tc is None:
        out = None
    elif tc == "auto":
        out = {"type": "auto"}
    elif tc == "none":
        out = {"type": "none"}
    elif tc == "required":
        out = {"type": "any"}
    elif isinstance(tc, dict) and tc.get("type") == "function":
        name = (tc.get("function") or {}).get("name")
        if not name:
            raise bad_request("'tool_choice.function.name' is required", param="tool_choice",
                              code="missing_required_parameter")
        out = {"type": "tool", "name": name}
    elif isinstance(tc, dict) and tc.get("type") in ("auto", "any", "tool", "none"):
        out = dict(tc)  # already Anthropic-shaped
    else:
        raise bad_request("'tool_choice' must be auto, none, required or {type: function, function: {name}}",
                          param="tool_choice", code="invalid_value")
    if parallel is False:
        if out is None:
            out = {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def canonical_to_anthropic_request(req: ChatRequest, default_max_tokens: int = 4096,
                                   unsupported: Unsupported | None = None, stream: bool | None = None
                                   ) -> dict[str, Any]:
    """Build the Messages API body for ``req``.  Raises a 400 GatewayError for what Anthropic lacks."""
    check_chat(req)  # the types of every field read below (a 400 naming the field, never a crash)
    uns = unsupported or _default_unsupported
    p = req.params
    system, messages = _convert_messages(req.messages, uns)
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if system is not None:
        body["system"] = system
    mt = req.max_tokens
    body["max_tokens"] = mt if mt is not None else default_max_tokens
    for k, v in p.items():
        if v is None or k in _DROP or k in ("max_tokens", "max_completion_tokens"):
            continue
        if k == "temperature":
            if v > 1:
                raise uns(f"temperature above 1 (Anthropic's range is 0 to 1; got {v})", "temperature")
            body["temperature"] = v
        elif k == "stop":
            body["stop_sequences"] = [v] if isinstance(v, str) else list(v)
        elif k == "n":
            if v != 1:
                raise uns("n > 1 (several choices per request)", "n")
        elif k == "logprobs":
            if v:
                raise uns("logprobs", "logprobs")
        elif k == "top_logprobs":
            raise uns("logprobs", "top_logprobs")
        elif k in ("presence_penalty", "frequency_penalty"):
            if v:
                raise uns(k.replace("_", " "), k)
        elif k == "logit_bias":
            if v:
                raise uns("logit_bias", k)
        elif k == "response_format":
            t = v.get("type") if isinstance(v, dict) else None
            if t == "json_schema" and isinstance((v.get("json_schema") or {}).get("schema"), dict):
                oc = body["output_config"] = dict(body.get("output_config") or {})
                oc["format"] = {"type": "json_schema", "schema": v["json_schema"]["schema"]}
            elif t not in (None, "text"):
                raise uns(f"response_format {t} (use json_schema with a schema)", "response_format")
        elif k == "reasoning_effort":
            if v not in _EFFORTS:
                raise uns(f"reasoning_effort {v!r} (Anthropic's efforts are low, medium, high, xhigh, max)", k)
            oc = body["output_config"] = dict(body.get("output_config") or {})
            oc["effort"] = v
        elif k == "output_config" and isinstance(v, dict):
            body["output_config"] = {**v, **(body.get("output_config") or {})}
        elif k in ("audio", "prediction", "web_search_options", "verbosity"):
            raise uns(k.replace("_", " "), k)
        elif k == "modalities":
            if v and list(v) != ["text"]:
                raise uns("output modalities other than text", k)
        elif k == "tools":
            if v:
                body["tools"] = _tools_to_anthropic(v, uns)
        elif k in ("tool_choice", "parallel_tool_calls"):
            continue  # below
        elif k == "user":
            body.setdefault("metadata", {})["user_id"] = v
        elif k == "metadata":
            if isinstance(v, dict) and "user_id" in v:
                body.setdefault("metadata", {})["user_id"] = v["user_id"]
        elif k in ("functions", "function_call"):
            raise uns("the legacy functions API (use tools)", k)
        else:
            body[k] = v  # top_p, top_k and Anthropic-native fields (thinking, ...) pass unchanged
    if "tool_choice" in p or p.get("parallel_tool_calls") is False:
        tc = _tool_choice_to_anthropic(p.get("tool_choice"), p.get("parallel_tool_calls"))
        if tc is not None:
            if tc["type"] == "none" and not body.get("tools"):
                pass  # tool_choice none without tools: nothing to say
            else:
                body["tool_choice"] = tc
    for k, v in (req.extra.get("anthropic") or {}).items():
        # top-level fields the /v1/messages ingress did not translate (context_management, mcp_servers, ...)
        cur = body.get(k)
        if cur is None:
            body[k] = v
        elif isinstance(cur, dict) and isinstance(v, dict):
            body[k] = {**v, **cur}
    if stream if stream is not None else req.stream:
        body["stream"] = True
    return body


def _json_args(v: Any) -> str:
    return orjson.dumps(v if v is not None else {}).decode()


# -- response: Anthropic -> canonical ------------------------------------------------------------------
def anthropic_response_to_canonical(msg: dict[str, Any], created: int | None = None
                                    ) -> tuple[dict[str, Any], Usage]:
    """An Anthropic ``message`` object -> (canonical chat.completion body, Usage)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    for b in msg.get("content") or ():
        t = b.get("type")
        if t == "text":
            texts.append(b.get("text", ""))
        elif t == "tool_use":
            calls.append({"id": b.get("id", ""), "type": "function",
                          "function": {"name": b.get("name", ""), "arguments": _json_args(b.get("input"))}})
        elif t in ("thinking", "redacted_thinking"):
            thinking.append(b)
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(texts) if texts or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(x.get("thinking", "") for x in thinking)
        message["thinking_blocks"] = thinking
    usage = usage_from_anthropic(msg.get("usage"))
    body = {"id": msg.get("id", ""), "object": "chat.completion", "created": created or int(time.time()),
            "model": msg.get("model", ""),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": stop_reason_to_finish(msg.get("stop_reason"))}],
            "usage": usage_to_openai(usage)}
    return body, usage


# -- tool arguments: canonical JSON string -> Anthropic ``input`` --------------------------------------
def tool_input(s: Any) -> dict[str, Any]:
    """A tool call's arguments (canonical JSON string) as Anthropic's ``input`` object, never failing: the
    upstream model may have produced invalid JSON, which is kept visible rather than dropped."""
    if isinstance(s, dict):
        return s
    if not s:
        return {}
    try:
        v = orjson.loads(s)
    except (orjson.JSONDecodeError, TypeError):
        return {"_raw_arguments": s}
    return v if isinstance(v, dict) else {"_value": v}


# -- streams ---------------------------------------------------------------------------------------
class AnthropicStreamError(Exception):
    """An ``error`` event inside an Anthropic stream."""

    def __init__(self, etype: str | None, message: str):
        super().__init__(message)
        self.etype = etype
        self.message = message
        self.status = error_status(etype)


class AnthropicStreamDecoder:
    """Anthropic stream events -> canonical chunks.  ``feed(data)`` takes one decoded event object and
    returns the chunks it produces; ``done`` turns true at ``message_stop``."""

    __slots__ = ("id", "model", "created", "usage_in", "output_tokens", "tools", "ntools", "thinks", "nthinks",
                 "done", "finish", "started", "_usage_raw")

    def __init__(self, model: str = "", created: int | None = None):
        self.id = ""
        self.model = model
        self.created = created or int(time.time())
        self.output_tokens = 0
        self.tools: dict[int, int] = {}   # content block index -> tool call index
        self.ntools = 0
        self.thinks: dict[int, int] = {}  # content block index -> canonical thinking block index
        self.nthinks = 0
        self.done = False
        self.finish: str | None = None
        self.started = False
        self._usage_raw: dict[str, Any] = {}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return new_chunk(self.id, self.model, self.created, delta, finish)

    def usage(self) -> Usage:
        u = dict(self._usage_raw)
        u["output_tokens"] = self.output_tokens
        return usage_from_anthropic(u)

    def feed(self, ev: dict[str, Any]) -> list[dict[str, Any]]:
        t = ev.get("type")
        if t == "content_block_delta":
            d = ev.get("delta") or {}
            dt = d.get("type")
            if dt == "text_delta":
                return [self._chunk({"content": d.get("text", "")})]
            if dt == "input_json_delta":
                ti = self.tools.get(ev.get("index", 0))
                if ti is None or not d.get("partial_json"):
                    return []
                return [self._chunk({"tool_calls": [{"index": ti, "function": {"arguments": d["partial_json"]}}]})]
            if dt == "thinking_delta":
                return [self._chunk({"reasoning_content": d["thinking"]})] if d.get("thinking") else []
            if dt == "signature_delta":
                k = self.thinks.get(ev.get("index", 0))
                if k is None or not d.get("signature"):
                    return []
                return [self._chunk({"thinking_blocks": [{"index": k, "signature": d["signature"]}]})]
            return []  # citations_delta
        if t == "content_block_start":
            b = ev.get("content_block") or {}
            bt = b.get("type")
            if bt == "text":
                return [self._chunk({"content": b["text"]})] if b.get("text") else []
            if bt == "tool_use":
                ti = self.tools[ev.get("index", 0)] = self.ntools
                self.ntools += 1
                out = [self._chunk({"tool_calls": [{"index": ti, "id": b.get("id", ""), "type": "function",
                                                    "function": {"name": b.get("name", ""), "arguments": ""}}]})]
                if b.get("input"):
                    out.append(self._chunk({"tool_calls": [{"index": ti, "function": {
                        "arguments": _json_args(b["input"])}}]}))
                return out
            if bt == "thinking":
                k = self.thinks[ev.get("index", 0)] = self.nthinks
                self.nthinks += 1
                out = [self._chunk({"thinking_blocks": [{"index": k, "type": "thinking"}]})]
                if b.get("thinking"):
                    out.append(self._chunk({"reasoning_content": b["thinking"]}))
                if b.get("signature"):
                    out.append(self._chunk({"thinking_blocks": [{"index": k, "signature": b["signature"]}]}))
                return out
            if bt == "redacted_thinking":
                k = self.thinks[ev.get("index", 0)] = self.nthinks
                self.nthinks += 1
                return [self._chunk({"thinking_blocks": [{"index": k, "type": "redacted_thinking",
                                                          "data": b.get("data") or ""}]})]
            return []
        if t == "message_start":
            m = ev.get("message") or {}
            self.id = m.get("id") or self.id
            self.model = m.get("model") or self.model
            u = m.get("usage") or {}
            self._usage_raw = {k: u[k] for k in ("input_tokens", "cache_read_input_tokens",
                                                  "cache_creation_input_tokens") if u.get(k) is not None}
            self.output_tokens = int(u.get("output_tokens") or 0)
            self.started = True
            return [self._chunk({"role": "assistant", "content": ""})]
        if t == "message_delta":
            d = ev.get("delta") or {}
            u = ev.get("usage") or {}
            if u.get("output_tokens") is not None:
                self.output_tokens = int(u["output_tokens"])  # cumulative
            for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
                if u.get(name) is not None:
                    self._usage_raw[name] = u[name]
            if d.get("stop_reason"):
                self.finish = stop_reason_to_finish(d["stop_reason"])
                return [self._chunk({}, self.finish)]
            return []
        if t == "message_stop":
            self.done = True
            out = []
            if self.finish is None:
                self.finish = "stop"
                out.append(self._chunk({}, "stop"))
            uc = usage_chunk(self.id, self.model, self.created, self.usage())
            uc["usage"] = usage_to_openai(self.usage())
            out.append(uc)
            return out
        if t == "error":
            e = ev.get("error") or {}
            raise AnthropicStreamError(e.get("type"), str(e.get("message") or e.get("type") or "stream error"))
        return []  # ping, content_block_stop, unknown future events


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE frame."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
