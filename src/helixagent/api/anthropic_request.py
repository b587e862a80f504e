"""The Anthropic Messages request: a ``POST /v1/messages`` (or ``/v1/messages/count_tokens``) body ->
the canonical request, with the Anthropic-only meaning carried as the canonical extensions described in
``api/anthropic_format.py``.

Every type is fixed first by the edge schema (``api/schemas/anthropic.py``); the checks here are the
ones the schema cannot express (non-empty strings and arrays, value ranges across fields, the order of
tool results, unique tool names, ...) and the translation itself."""
from __future__ import annotations

import re
from typing import Any

import orjson

from ..canonical import ChatRequest
from ..errors import GatewayError, bad_request
from .openai_format import HELIX_FIELDS, load_json_object, split_model
from .schemas.anthropic import check_messages

IMAGE_TYPES = frozenset(("image/jpeg", "image/png", "image/gif", "image/webp"))
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KNOWN_FIELDS = frozenset(("model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
                           "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "cache_control",
                           "output_config"))


def _err(path: str, message: str, code: str = "invalid_value") -> GatewayError:
    return bad_request(f"{path}: {message}", param=path, code=code)


class _Flags:
    __slots__ = ("cache_control", "is_error", "features", "native", "dropped", "media")

    def __init__(self) -> None:
        self.cache_control = False
        self.is_error = False
        self.features: list[str] = []
        self.native: list[tuple[str, str]] = []  # (what, path): blocks / tools only an Anthropic provider runs
        self.dropped: set[str] = set()            # Anthropic-only fields kept on parts / tools ("anthropic")
        self.media = False                        # images / documents inside a tool_result


def _raw(b: dict[str, Any], path: str, what: str, flags: _Flags) -> dict[str, Any]:
    """A block HelixAgent does not translate, kept whole for an Anthropic provider (canonical part
    ``{"type": "anthropic_block", "block": ...}``); other providers answer a 400 naming it."""
    flags.native.append((what, path))
    return {"type": "anthropic_block", "block": b}


def _keep_extras(b: dict[str, Any], known: tuple[str, ...], part: dict[str, Any], flags: _Flags,
                 prefix: str = "") -> dict[str, Any]:
    """Fields of a block / tool HelixAgent does not translate ride on the canonical part as
    ``part["anthropic"]`` (merged back by the Anthropic mapping, dropped and named for other providers)."""
    extras = {k: v for k, v in b.items() if k not in known}
    if extras:
        part["anthropic"] = extras
        flags.dropped.update(prefix + k for k in extras)
    return part


def _cc(block: dict[str, Any], part: dict[str, Any], flags: _Flags) -> dict[str, Any]:
    cc = block.get("cache_control")
    if cc is not None:  # the schema's CacheControl: {type: 'ephemeral', ...}
        part["cache_control"] = cc
        flags.cache_control = True
        flags.dropped.add("cache_control")
    return part


def _text_part(b: dict[str, Any], path: str, flags: _Flags) -> dict[str, Any]:
    t = b["text"]
    if not t:
        raise _err(path + ".text", "text content blocks must be non-empty")
    part = _cc(b, {"type": "text", "text": t}, flags)
    if len(b) > 2 + ("cache_control" in b):
        _keep_extras(b, ("type", "text", "cache_control"), part, flags)
    return part


def _image_part(b: dict[str, Any], path: str, flags: _Flags) -> dict[str, Any]:
    src = b["source"]
    st = src["type"]
    if st == "base64":
        mt, data = src["media_type"], src["data"]
        if mt not in IMAGE_TYPES:
            raise _err(path + ".source.media_type", f"must be one of {', '.join(sorted(IMAGE_TYPES))}; got {mt!r}")
        if not data:
            raise _err(path + ".source.data", "must be a non-empty base64 string", "invalid_type")
        url = f"data:{mt};base64,{data}"
    elif st == "url":
        given = src["url"]
        if not given.startswith(("http://", "https://")):
            raise _err(path + ".source.url", "must be an http(s) URL", "invalid_type")
        url = given
    else:  # a Files API image (``file``) and sources yet to come: an Anthropic provider takes them as sent
        return _raw(b, path, f"an image with a {st!r} source", flags)
    if set(b) - {"type", "source", "cache_control"} or set(src) - {"type", "media_type", "data", "url"}:
        return _raw(b, path, "an image block with fields HelixAgent does not translate", flags)
    return _cc(b, {"type": "image_url", "image_url": {"url": url}}, flags)


def _document_part(b: dict[str, Any], path: str, flags: _Flags) -> dict[str, Any]:
    src = b["source"]
    st = src["type"]
    if set(b) - {"type", "source", "title", "context", "cache_control"} or b.get("citations") is not None:
        return _raw(b, path, "a document with citations", flags)
    if st == "base64" and src["media_type"] == "application/pdf" and not b.get("context"):
        f: dict[str, Any] = {"file_data": "data:application/pdf;base64," + src["data"]}
        if isinstance(b.get("title"), str):
            f["filename"] = b["title"]
        return _cc(b, {"type": "file", "file": f}, flags)
    if st == "text":
        if not b.get("title") and not b.get("context"):
            return _cc(b, {"type": "text", "text": src["data"]}, flags)
        return _raw(b, path, "a text document with 'title' or 'context'", flags)
    return _raw(b, path, f"a document with a {st!r} source", flags)


def _tool_result(b: dict[str, Any], path: str, flags: _Flags) -> dict[str, Any]:
    tid = b["tool_use_id"]
    if not tid:
        raise _err(path + ".tool_use_id", "is required and must be a string", "missing_required_parameter")
    c = b.get("content")
    content: Any
    if c is None:
        content = ""
    elif isinstance(c, str):
        content = c
    else:
        parts = []
        for j, sb in enumerate(c):
            sp = f"{path}.content.{j}"
            st = sb["type"]
            if st == "text":
                parts.append(_text_part(sb, sp, flags))
            elif st == "image":
                parts.append(_image_part(sb, sp, flags))
                flags.media = True
            elif st == "document":
                parts.append(_document_part(sb, sp, flags))
                flags.media = True
            else:  # search_result, tool_reference, ...
                parts.append(_raw(sb, sp, f"a {st!r} block", flags))
        content = parts
    msg: dict[str, Any] = {"role": "tool", "tool_call_id": tid, "content": content}
    _cc(b, msg, flags)  # a breakpoint on the whole result rides on the tool message
    if b.get("is_error"):
        msg["is_error"] = True
        flags.is_error = True
    return msg


def _tool_use(b: dict[str, Any], path: str, flags: _Flags) -> dict[str, Any]:
    tid, name, inp = b["id"], b["name"], b["input"]
    if not tid:
        raise _err(path + ".id", "is required and must be a string", "missing_required_parameter")
    if not name:
        raise _err(path + ".name", "is required and must be a string", "missing_required_parameter")
    return _cc(b, {"id": tid, "type": "function",
                   "function": {"name": name, "arguments": orjson.dumps(inp).decode()}}, flags)


def _user_message(content: list[Any], path: str, flags: _Flags, out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        bp = f"{path}.content.{j}"
        t = b["type"]
        if t == "text":
            parts.append(_text_part(b, bp, flags))
        elif t == "image":
            parts.append(_image_part(b, bp, flags))
        elif t == "document":
            parts.append(_document_part(b, bp, flags))
        elif t == "tool_result":
            if parts:  # Anthropic requires tool results first; a tool message cannot follow user text
                raise _err(bp, "tool_result blocks must come before any other content in a user message")
            out.append(_tool_result(b, bp, flags))
        elif t in ("tool_use", "thinking", "redacted_thinking"):
            raise _err(bp + ".type", f"{t!r} blocks are only allowed in assistant messages")
        else:  # search_result, container_upload, blocks yet to come
            parts.append(_raw(b, bp, f"a {t!r} block", flags))
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text" and len(parts[0]) == 2:
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": parts})
    elif not content:
        raise _err(path + ".content", "must not be empty")


def _assistant_message(content: list[Any], path: str, flags: _Flags) -> dict[str, Any]:
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        bp = f"{path}.content.{j}"
        t = b["type"]
        if t == "text":  # text after a tool_use moves before the tool calls (the canonical order)
            texts.append(_text_part(b, bp, flags))
        elif t == "tool_use":
            calls.append(_tool_use(b, bp, flags))
        elif t == "redacted_thinking" or t == "thinking" and b.get("signature"):
            thinking.append(b)
        elif t == "thinking":
            # unsigned: reasoning HelixAgent relayed from a non-Anthropic upstream (DeepSeek's
            # reasoning_content).  Those upstreams do not take earlier reasoning back and Anthropic rejects an
            # unsigned block, so it is dropped, and the conversation can continue with any provider.
            continue
        elif t == "tool_result":
            raise _err(bp + ".type", "'tool_result' blocks are only allowed in user messages")
        else:  # server_tool_use, web_search_tool_result, mcp_tool_use, ... in their place
            texts.append(_raw(b, bp, f"a {t!r} block", flags))
    msg: dict[str, Any] = {"role": "assistant"}
    if not texts:
        msg["content"] = None if calls or thinking else ""
    elif len(texts) == 1 and texts[0]["type"] == "text" and len(texts[0]) == 2:
        msg["content"] = texts[0]["text"]
    else:
        msg["content"] = texts
    if calls:
        msg["tool_calls"] = calls
    if thinking:
        msg["thinking_blocks"] = thinking
        flags.features.append("thinking_blocks")
    return msg


def _system(system: Any, flags: _Flags, path: str = "system") -> dict[str, Any] | None:
    if system is None:
        return None
    if isinstance(system, str):
        return {"role": "system", "content": system} if system else None
    parts = []
    for j, b in enumerate(system):
        if b["type"] != "text":  # a system message's content may hold any block
            raise _err(f"{path}.{j}", "system blocks must be text blocks", "invalid_type")
        parts.append(_text_part(b, f"{path}.{j}", flags))
    if not parts:
        return None
    if len(parts) == 1 and len(parts[0]) == 2:
        return {"role": "system", "content": parts[0]["text"]}
    return {"role": "system", "content": parts}


def _tools(tools: list[dict[str, Any]], flags: _Flags) -> list[dict[str, Any]]:
    out = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        p = f"tools.{i}"
        typ = t.get("type")
        if typ not in (None, "custom"):
            # server tools (web_search_20250305, code_execution_...) and Anthropic-defined client tools
            # (bash_..., text_editor_..., computer_..., memory_...), MCP toolsets: sent as they are to an
            # Anthropic provider; another provider cannot run them (a 400 naming the tool)
            name = t.get("name")  # optional on these
            if name is not None:
                if name in seen:
                    raise _err(p + ".name", f"tool names must be unique; {name!r} is repeated")
                seen.add(name)
            flags.native.append((f"the Anthropic tool type {typ!r}", p))
            out.append(t)
            continue
        name = t["name"]
        if not _TOOL_NAME.match(name):
            raise _err(p + ".name", "is required and must match ^[a-zA-Z0-9_-]{1,128}$")
        if name in seen:
            raise _err(p + ".name", f"tool names must be unique; {name!r} is repeated")
        seen.add(name)
        schema = t["input_schema"]
        if schema.get("type") != "object":
            raise _err(p + ".input_schema.type", "must be 'object'")
        fn: dict[str, Any] = {"name": name}
        desc = t.get("description")
        if desc is not None:
            fn["description"] = desc
        fn["parameters"] = schema
        tool = _cc(t, {"type": "function", "function": fn}, flags)
        if len(t) > 2 + ("description" in t) + ("cache_control" in t) + ("type" in t):
            # strict, defer_loading, input_examples, eager_input_streaming, ...
            _keep_extras(t, ("type", "name", "description", "input_schema", "cache_control"), tool, flags, "tools.")
        out.append(tool)
    return out


def _tool_choice(tc: dict[str, Any], has_tools: bool, params: dict[str, Any]) -> None:
    t = tc["type"]
    if t != "none" and not has_tools:
        raise _err("tool_choice", "tool_choice may only be specified while providing tools")
    if t == "auto":
        params["tool_choice"] = "auto"
    elif t == "any":
        params["tool_choice"] = "required"
    elif t == "none":
        params["tool_choice"] = "none"
    else:  # "tool"
        name = tc["name"]
        if not name:
            raise _err("tool_choice.name", "is required for type 'tool'", "missing_required_parameter")
        params["tool_choice"] = {"type": "function", "function": {"name": name}}
    dp = tc.get("disable_parallel_tool_use")
    if dp is not None:
        if t == "none":
            raise _err("tool_choice.disable_parallel_tool_use", "is not allowed with type 'none'")
        if has_tools:
            params["parallel_tool_calls"] = not dp


def parse_messages(raw: bytes, known_providers: Any, count_only: bool = False) -> tuple[ChatRequest, dict[str, Any]]:
    """Parse a /v1/messages body (``count_only``: a /v1/messages/count_tokens body, max_tokens optional).

    Returns the canonical request and the HelixAgent fields; ``helix["anthropic"]`` holds what the route
    needs to know: ``features`` (Anthropic-only features used) and ``lower`` (extensions to remove for a
    non-Anthropic provider)."""
    body = load_json_object(raw)
    unknown = sorted(set(body) - _KNOWN_FIELDS - set(HELIX_FIELDS))
    for k in unknown:  # named in a response header when dropped: an API field name, nothing else
        if not _FIELD_NAME.match(k):
            raise bad_request(f"{k[:64]!r}: not a valid field name", param="body", code="invalid_value")
    body = check_messages(body)  # every type from here on is the schema's (schemas/anthropic.py)
    helix = {k: body.pop(k) for k in HELIX_FIELDS if k in body}
    # fields with no canonical meaning (context_management, mcp_servers, container, service_tier, what the
    # API adds next): sent untouched to an Anthropic provider, dropped and named (or refused) for others
    extra: dict[str, Any] = {k: body[k] for k in unknown}
    if "model" not in body and "provider" not in helix:
        raise _err("model", "Field required", "missing_required_parameter")
    model, provider = split_model(body.get("model"), helix.get("provider"), known_providers)
    params: dict[str, Any] = {}
    mt = body.get("max_tokens")
    if mt is None:
        if not count_only:
            raise _err("max_tokens", "Field required", "missing_required_parameter")
    else:
        params["max_tokens"] = mt
    flags = _Flags()
    messages_in = body["messages"]
    messages: list[dict[str, Any]] = []
    sysmsg = _system(body.get("system"), flags)
    if sysmsg is not None:
        messages.append(sysmsg)
    for i, m in enumerate(messages_in):
        p = f"messages.{i}"
        role, c = m["role"], m["content"]
        fields = set(m) - {"role", "content"}
        if fields:
            if role != "system":
                raise _err(p, f"unsupported message fields: {', '.join(sorted(fields))}", "unsupported_feature")
            # Claude Code puts per-message settings (``output_config``) on the system messages it sends inside
            # ``messages``: the text joins the system prompt, where such settings have no place -- dropped, and
            # named (x-helixagent-dropped-params) for a provider that is not Anthropic's
            flags.dropped.update(f"{p}.{f}" for f in fields)
        if role == "system":  # Claude Code sends its system prompt this way in some modes: kept in its place
            sm = _system(c, flags, p + ".content")
            if sm is not None:
                messages.append(sm)
            continue
        if isinstance(c, str):
            if role == "assistant":
                messages.append({"role": "assistant", "content": c})
            else:
                messages.append({"role": "user", "content": c})
        elif role == "user":
            _user_message(c, p, flags, messages)
        else:
            messages.append(_assistant_message(c, p, flags))
    if messages_in[-1]["role"] == "assistant":
        flags.features.append("prefill")
    if not any(m["role"] != "system" for m in messages):
        raise _err("messages", "at least one user or assistant message is required")
    stop = body.get("stop_sequences")
    if stop is not None:
        if not all(stop):
            raise _err("stop_sequences", "must be an array of non-empty strings", "invalid_type")
        if stop:
            params["stop"] = list(stop)
    for name in ("temperature", "top_p"):
        v = body.get(name)
        if v is not None:
            params[name] = v
    tk = body.get("top_k")
    if tk is not None:
        params["top_k"] = tk
        flags.features.append("top_k")
    md = body.get("metadata")
    if md is not None:
        md_more = set(md) - {"user_id"}
        if md_more:
            raise _err("metadata", f"unsupported fields: {', '.join(sorted(md_more))}", "unsupported_feature")
        uid = md.get("user_id")
        if uid is not None:
            if len(uid) > 256:
                raise _err("metadata.user_id", "must be a string of at most 256 characters", "invalid_type")
            params["user"] = uid
    tools = body.get("tools")
    if tools is not None:
        ct = _tools(tools, flags)
        if ct:
            params["tools"] = ct
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], bool(params.get("tools")), params)
    th = body.get("thinking")
    if th is not None:  # {type: enabled, budget_tokens: int} or {type: disabled | adaptive}
        if th["type"] == "enabled":
            bt = th["budget_tokens"]
            if bt < 1024:
                raise _err("thinking.budget_tokens", "must be an integer >= 1024")
            if mt is not None and bt >= mt:
                raise _err("thinking.budget_tokens", "must be less than max_tokens")
        if th["type"] != "disabled":
            params["thinking"] = th
            flags.features.append("thinking")
    cc = body.get("cache_control")
    if cc is not None:  # automatic prompt caching for the whole request
        params["cache_control"] = _cc(body, {}, flags)["cache_control"]
    oc = body.get("output_config")
    if oc is not None:
        more = {k: v for k, v in oc.items() if k not in ("effort", "format")}
        if more:  # output_config fields HelixAgent does not translate: like unknown top-level fields
            extra["output_config"] = more
        fmt = oc.get("format")
        if fmt is not None:  # {type: 'json_schema', schema: {...}}
            params["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}
        eff = oc.get("effort")
        if eff is not None:
            if eff not in ("low", "medium", "high", "xhigh", "max"):
                raise _err("output_config.effort", "must be one of low, medium, high, xhigh, max")
            params["reasoning_effort"] = eff
            flags.features.append("effort")
    stream = body.get("stream", False)
    helix["anthropic"] = {"features": flags.features,
                          "lower": flags.cache_control or flags.is_error or flags.media or bool(flags.dropped),
                          "native": flags.native, "dropped": sorted(flags.dropped)}
    req = ChatRequest(model=model, messages=messages, params=params, stream=stream, include_usage=stream,
                      provider=provider, endpoint="chat")
    if extra:
        req.extra = {"anthropic": extra}
    return req, helix
