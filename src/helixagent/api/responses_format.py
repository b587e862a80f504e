"""The OpenAI Responses client format (``POST /v1/responses``): parse a Responses body into the canonical
request, render canonical answers as ``response`` objects and canonical chunks as Responses SSE events.

Two ways upstream (see docs/responses.md):

* **native** -- the routed provider is the real OpenAI (type ``openai``): :class:`ResponsesRequest` keeps the
  client's body (``native``), which the OpenAI provider posts to ``{base_url}/responses`` as is (unknown fields
  and built-in tools included); the answer (or each event) rides back on the canonical shapes under
  ``NATIVE`` so records, usage, limits and cache read it like any chat answer, and the client gets the
  upstream's own object / events.
* **translated** -- every other provider: items become canonical chat messages (messages, function calls and
  their outputs, reasoning items), function tools become canonical tools, ``text.format`` becomes
  ``response_format``, ``reasoning.effort`` ``reasoning_effort``, ``max_output_tokens`` ``max_tokens``.

Reasoning: a canonical answer's ``thinking_blocks`` (Anthropic's thinking, signed) become ``reasoning``
items whose summary is the thinking text and, when the client asks for ``reasoning.encrypted_content``,
whose ``encrypted_content`` carries the block (text and signature); a reasoning item sent back in the input
turns into the assistant turn's thinking block again, so a Codex-style ``store: false`` conversation keeps
its signed thinking.  Bare ``reasoning_content`` (DeepSeek, vLLM) becomes a summary only.

This module is the request side (Responses -> canonical); the output side (``response`` objects, SSE
events, the reasoning items' codec) is :mod:`.responses_render`, whose names it re-exports."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..canonical import ChatRequest, text_of
from ..errors import GatewayError, bad_request
from .openai_format import HELIX_FIELDS, load_json_object, split_model
from .responses_render import ENC_PREFIX as ENC_PREFIX
from .responses_render import StreamTranslator as StreamTranslator
from .responses_render import decode_reasoning as decode_reasoning
from .responses_render import encode_reasoning as encode_reasoning
from .responses_render import output_items as output_items
from .responses_render import reasoning_item as reasoning_item
from .responses_render import render_response as render_response
from .responses_render import response_id as response_id
from .responses_render import shell as shell
from .responses_render import sse as sse
from .responses_render import usage_object as usage_object
from .schemas.responses import check_responses

FUNCTION = "function"
# top-level fields a translation cannot honour: they change the answer's meaning
_NATIVE_ONLY = ("conversation", "prompt", "background", "max_tool_calls")
# top-level fields the translation reads (the rest is only for a native upstream)
_READ = frozenset(("model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                   "reasoning", "max_output_tokens", "metadata", "temperature", "top_p", "user", "store",
                   "include", "truncation", "stream", "previous_response_id", "background", "service_tier",
                   "top_logprobs", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                   "stream_options"))


@dataclass(slots=True)
class ResponsesRequest(ChatRequest):
    """A canonical request that came as a Responses body."""
    native: dict[str, Any] = field(default_factory=dict)     # the client's body for an OpenAI upstream
    builtin: list[tuple[int, str]] = field(default_factory=list)   # (index, type) of built-in tools
    native_only: list[str] = field(default_factory=list)      # items/fields only an OpenAI upstream takes
    input_items: list[dict[str, Any]] = field(default_factory=list)  # this turn's items, as given
    echo: dict[str, Any] = field(default_factory=dict)        # request fields the response object repeats
    store: bool = True
    encrypted: bool = False                                   # include has reasoning.encrypted_content
    previous_response_id: str | None = None

    def refusal_for(self, provider: Any) -> GatewayError | None:
        """Built-in tools and OpenAI-only items need an OpenAI upstream: any other candidate (the first
        choice, or a fallback) refuses the request rather than silently serving it without them."""
        return None if is_native(provider) else translation_error(self, provider)


def _err(path: str, message: str, code: str = "invalid_value") -> GatewayError:
    return bad_request(f"'{path}': {message}", param=path, code=code)


# -- request: Responses -> canonical ---------------------------------------------------------------------

def _user_parts(content: Any, path: str, role: str) -> Any:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        pp = f"{path}.content[{j}]"
        t = p["type"]
        if t in ("input_text", "output_text", "text"):
            if not isinstance(p.get("text"), str):
                raise _err(pp + ".text", "is required and must be a string", "missing_required_parameter")
            parts.append({"type": "text", "text": p["text"]})
        elif t == "refusal":
            parts.append({"type": "text", "text": p.get("refusal") or ""})
        elif t == "input_image":
            url = p.get("image_url")
            if not isinstance(url, str) or not url:
                raise _err(pp + ".image_url", "is required (file_id images need an OpenAI upstream)",
                           "unsupported_feature")
            iu: dict[str, Any] = {"url": url}
            if isinstance(p.get("detail"), str) and p["detail"] != "auto":
                iu["detail"] = p["detail"]
            parts.append({"type": "image_url", "image_url": iu})
        elif t == "input_file":
            data = p.get("file_data")
            if not isinstance(data, str) or not data:
                raise _err(pp + ".file_data", "is required (file_id / file_url files need an OpenAI upstream)",
                           "unsupported_feature")
            f: dict[str, Any] = {"file_data": data}
            if isinstance(p.get("filename"), str):
                f["filename"] = p["filename"]
            parts.append({"type": "file", "file": f})
        else:
            raise _err(pp + ".type", f"content parts of type {t!r} cannot be translated; supported: input_text, "
                                     f"input_image, input_file, output_text, refusal", "unsupported_feature")
    if role != "user" and any(x["type"] != "text" for x in parts):
        raise _err(path + ".content", f"{role} messages may only hold text", "invalid_value")
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def items_to_messages(items: list[dict[str, Any]], native_only: list[str], base: str = "input"
                      ) -> list[dict[str, Any]]:
    """Responses input items -> canonical chat messages.  Consecutive assistant output (text, function
    calls, reasoning) folds into one assistant message; ``function_call_output`` becomes a tool message.
    Items only an OpenAI upstream understands are named in ``native_only`` (the route refuses them for
    another provider)."""
    out: list[dict[str, Any]] = []
    asst: dict[str, Any] | None = None
    pending_thinking: list[dict[str, Any]] = []

    def assistant() -> dict[str, Any]:
        nonlocal asst, pending_thinking
        if asst is None:
            asst = {"role": "assistant", "content": None}
            out.append(asst)
        if pending_thinking:
            asst.setdefault("thinking_blocks", []).extend(pending_thinking)
            pending_thinking = []
        return asst

    for i, it in enumerate(items):
        path = f"{base}[{i}]"
        t = it.get("type") or "message"
        if t == "message":
            role = it.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _err(path + ".role", f"must be one of user, assistant, system, developer; got {role!r}")
            if "content" not in it:
                raise _err(path + ".content", "is required", "missing_required_parameter")
            content = _user_parts(it["content"], path, role)
            if role == "assistant":
                m = assistant()
                text = text_of(content) if not isinstance(content, str) else content
                prev = m.get("content")
                m["content"] = (prev or "") + text if prev or text else prev
                if m.get("tool_calls"):  # text after calls starts a new assistant turn
                    asst = None
                continue
            asst = None
            out.append({"role": "system" if role == "developer" else role, "content": content})
        elif t == "function_call":
            for k in ("call_id", "name", "arguments"):
                if not isinstance(it.get(k), str):
                    raise _err(f"{path}.{k}", "is required and must be a string", "missing_required_parameter")
            m = assistant()
            m.setdefault("tool_calls", []).append(
                {"id": it["call_id"], "type": "function",
                 "function": {"name": it["name"], "arguments": it["arguments"]}})
        elif t == "function_call_output":
            if not isinstance(it.get("call_id"), str):
                raise _err(path + ".call_id", "is required and must be a string", "missing_required_parameter")
            o = it.get("output")
            if o is None:
                raise _err(path + ".output", "is required", "missing_required_parameter")
            oc = _user_parts(o, path, "user") if not isinstance(o, str) else o
            if not isinstance(oc, str):
                if any(x["type"] != "text" for x in oc):
                    raise _err(path + ".output", "images and files in a function_call_output cannot be translated "
                                                 "to a tool message", "unsupported_feature")
                oc = text_of(oc)
            asst = None
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": oc})
        elif t == "reasoning":
            block = decode_reasoning(it)
            if block is not None:
                pending_thinking.append(block)
            # OpenAI's own encrypted reasoning, or a summary alone: dropped (chat upstreams take no earlier
            # reasoning; a conversation may move between providers)
        elif t == "item_reference":
            raise _err(path, "item_reference items are resolved from stored responses; this one was not found",
                       "invalid_value")
        else:
            native_only.append(f"{path}.type")
    if pending_thinking and asst is not None:
        asst.setdefault("thinking_blocks", []).extend(pending_thinking)
    return out


def _tools(tools: list[dict[str, Any]], req: ResponsesRequest) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        if t["type"] != FUNCTION:
            req.builtin.append((i, t["type"]))
            continue
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise _err(f"tools[{i}].name", "is required for function tools", "missing_required_parameter")
        fn: dict[str, Any] = {"name": name}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        fn["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
        if t.get("strict") is not None:
            fn["strict"] = t["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(tc: Any, params: dict[str, Any], req: ResponsesRequest) -> None:
    if isinstance(tc, str):
        params["tool_choice"] = tc
        return
    t = tc["type"]
    if t == FUNCTION:
        if not isinstance(tc.get("name"), str):
            raise _err("tool_choice.name", "is required for type 'function'", "missing_required_parameter")
        params["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
    elif t == "allowed_tools":
        names = {x.get("name") for x in tc.get("tools") or () if isinstance(x, dict) and x.get("type") == FUNCTION}
        if any(isinstance(x, dict) and x.get("type") != FUNCTION for x in tc.get("tools") or ()):
            req.native_only.append("tool_choice.tools")
        params["tools"] = [x for x in params.get("tools") or () if x["function"]["name"] in names]
        mode = tc.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise _err("tool_choice.mode", f"must be 'auto' or 'required'; got {mode!r}")
        params["tool_choice"] = mode
    else:
        req.native_only.append("tool_choice.type")


def parse_responses(raw: bytes, known_providers: Any, count_only: bool = False
                    ) -> tuple[ResponsesRequest, dict[str, Any]]:
    """Parse a /v1/responses body: the canonical request (which keeps the native body) and the HelixAgent
    fields."""
    body = check_responses(load_json_object(raw))
    helix = {k: body.pop(k) for k in HELIX_FIELDS if k in body}
    if "model" not in body and "provider" not in helix and not count_only:
        raise _err("model", "is required", "missing_required_parameter")
    if "input" not in body and not body.get("previous_response_id"):
        raise _err("input", "is required", "missing_required_parameter")
    model, provider = split_model(body.get("model"), helix.get("provider"), known_providers)
    native = dict(body)
    native["model"] = model
    stream = bool(body.get("stream"))
    inc = body.get("include") or []
    req = ResponsesRequest(model=model, messages=[], params={}, stream=stream, include_usage=stream,
                           provider=provider, endpoint="responses", native=native,
                           store=body.get("store") is not False, encrypted="reasoning.encrypted_content" in inc,
                           previous_response_id=body.get("previous_response_id"))
    inp = body.get("input")
    if inp is None:
        items: list[dict[str, Any]] = []
    elif isinstance(inp, str):
        items = [{"type": "message", "role": "user", "content": inp}]
    else:
        items = list(inp)
    req.input_items = items
    msgs: list[dict[str, Any]] = []
    instr = body.get("instructions")
    if instr:
        msgs.append({"role": "system", "content": instr})
    msgs.extend(items_to_messages(items, req.native_only))
    req.messages = msgs
    p = req.params
    for k in _NATIVE_ONLY:
        if body.get(k) not in (None, False):
            req.native_only.append(k)
    if body.get("tools"):
        ft = _tools(body["tools"], req)
        if ft:
            p["tools"] = ft
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], p, req)
    if p.get("tools") and body.get("parallel_tool_calls") is not None:
        p["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = (body.get("text") or {}).get("format")
    if fmt is not None:
        ft_ = fmt["type"]
        if ft_ == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise _err("text.format.schema", "is required for json_schema", "missing_required_parameter")
            if not isinstance(fmt.get("name"), str):
                raise _err("text.format.name", "is required for json_schema", "missing_required_parameter")
            js: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
            if fmt.get("strict") is not None:
                js["strict"] = fmt["strict"]
            if fmt.get("description"):
                js["description"] = fmt["description"]
            p["response_format"] = {"type": "json_schema", "json_schema": js}
        elif ft_ == "json_object":
            p["response_format"] = {"type": "json_object"}
    eff = (body.get("reasoning") or {}).get("effort")
    if eff is not None:
        p["reasoning_effort"] = eff
    if body.get("max_output_tokens") is not None:
        p["max_tokens"] = body["max_output_tokens"]
    for k in ("temperature", "top_p", "user"):
        if body.get(k) is not None:
            p[k] = body[k]
    req.echo = {k: body.get(k) for k in ("instructions", "metadata", "max_output_tokens", "temperature", "top_p",
                                          "user", "tool_choice", "parallel_tool_calls", "tools", "text",
                                          "reasoning", "truncation", "previous_response_id", "store",
                                          "background", "service_tier", "top_logprobs", "safety_identifier",
                                          "prompt_cache_key")}
    return req, helix


def translation_error(req: ResponsesRequest, provider: Any) -> GatewayError | None:
    """A clear 400 when the request needs an OpenAI upstream and ``provider`` (the router's first choice)
    is another kind."""
    if req.builtin:
        i, t = req.builtin[0]
        return GatewayError(400, f"'tools[{i}].type': the built-in tool {t!r} is served only by OpenAI; provider "
                                 f"{provider.name!r} ({provider.cfg.type}) takes function tools",
                            code="unsupported_feature", param=f"tools[{i}].type", provider=provider.name)
    if req.native_only:
        w = req.native_only[0]
        return GatewayError(400, f"'{w}': only an OpenAI upstream serves this; provider {provider.name!r} "
                                 f"({provider.cfg.type}) gets a translated request", code="unsupported_feature",
                            param=w, provider=provider.name)
    return None


def items_for_openai(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items of a response another provider served, as input for OpenAI: without HelixAgent's item ids
    (OpenAI would look them up) and without the reasoning items HelixAgent minted."""
    out = []
    for it in items:
        if it.get("type") == "reasoning" and decode_reasoning(it) is not None or (
                it.get("type") == "reasoning" and not it.get("encrypted_content")):
            continue
        it = {k: v for k, v in it.items() if k != "id" and not (k == "status" and it.get("type") == "message")}
        out.append(it)
    return out


def is_native(provider: Any) -> bool:
    return bool(provider.cfg.type == "openai")


def load_request(raw: bytes) -> dict[str, Any]:
    return load_json_object(raw)
