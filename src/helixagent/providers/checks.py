"""Type checks of the canonical request fields the vendor mappings read (defence in depth).

Every request reaches a provider through the canonical model, from any client format; the edge
(``api/``) validates each format's body, and this module checks again, at the point of use, the types
of every canonical field a mapping *reads* -- so client input can never crash a mapping (which the
router would otherwise have to tell apart from a gateway bug).  A wrong type is a 400 naming the field
(``param``), never a provider failure.  Values are not range-checked here (the vendor's own rules are
the mapping's business, or the upstream's); unknown fields pass untouched.

Cost: one dict lookup per request field plus a walk over the messages (no allocation on the happy
path beyond the loop).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ..canonical import ChatRequest, EmbeddingRequest
from ..errors import GatewayError, bad_request


def _bad(name: str, what: str) -> GatewayError:
    return bad_request(f"'{name}' must be {what}", param=name, code="invalid_type")


def _number(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(name, "a number")


def _int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, "an integer")


def _count(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(name, "a non-negative integer")


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise _bad(name, "a boolean")


def _str(name: str, v: Any) -> None:
    if not isinstance(v, str):
        raise _bad(name, "a string")


def _obj(name: str, v: Any) -> None:
    if not isinstance(v, dict):
        raise _bad(name, "an object")


def _str_list(name: str, v: Any) -> None:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(name, "an array of strings")


def _stop(name: str, v: Any) -> None:
    if not isinstance(v, str):
        _str_list(name, v)


def _logit_bias(name: str, v: Any) -> None:
    _obj(name, v)
    for k, x in v.items():
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise _bad(f"{name}.{k}", "a number")


def _response_format(name: str, v: Any) -> None:
    _obj(name, v)
    t = v.get("type")
    if not isinstance(t, str):
        raise _bad(name + ".type", "a string")
    if t == "json_schema":
        js = v.get("json_schema")
        if js is not None:
            _obj(name + ".json_schema", js)
            s = js.get("schema")
            if s is not None:
                _obj(name + ".json_schema.schema", s)


def _tools(name: str, v: Any) -> None:
    if not isinstance(v, list):
        raise _bad(name, "an array of tools")
    for i, t in enumerate(v):
        w = f"{name}[{i}]"
        if not isinstance(t, dict):
            raise _bad(w, "an object")
        typ = t.get("type")
        if typ is not None and not isinstance(typ, str):
            raise _bad(w + ".type", "a string")
        if typ == "function" or "function" in t:
            fn = t.get("function")
            if not isinstance(fn, dict):
                raise _bad(w + ".function", "an object")
            if not isinstance(fn.get("name"), str):
                raise _bad(w + ".function.name", "a string")
            if fn.get("description") is not None and not isinstance(fn["description"], str):
                raise _bad(w + ".function.description", "a string")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise _bad(w + ".function.parameters", "an object")


def _tool_choice(name: str, v: Any) -> None:
    if isinstance(v, str):
        return
    _obj(name, v)
    t = v.get("type")
    if not isinstance(t, str):
        raise _bad(name + ".type", "a string")
    fn = v.get("function")
    if fn is not None:
        _obj(name + ".function", fn)
        if not isinstance(fn.get("name"), str):
            raise _bad(name + ".function.name", "a string")
    if v.get("name") is not None and not isinstance(v["name"], str):
        raise _bad(name + ".name", "a string")


def _functions(name: str, v: Any) -> None:
    if not isinstance(v, list):
        raise _bad(name, "an array")


def _function_call(name: str, v: Any) -> None:
    if not isinstance(v, (str, dict)):
        raise _bad(name, "a string or an object")


# canonical (OpenAI-named) request fields read by at least one mapping -> their check
PARAM_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "temperature": _number, "top_p": _number, "top_k": _int, "n": _int, "seed": _int,
    "presence_penalty": _number, "frequency_penalty": _number,
    "max_tokens": _count, "max_completion_tokens": _count, "top_logprobs": _int,
    "logprobs": _bool, "parallel_tool_calls": _bool, "stream": _bool,
    "stop": _stop, "modalities": _str_list, "reasoning_effort": _str, "user": _str,
    "logit_bias": _logit_bias, "response_format": _response_format, "tools": _tools, "tool_choice": _tool_choice,
    "metadata": _obj, "stream_options": _obj, "output_config": _obj, "generationConfig": _obj,
    "audio": _obj, "prediction": _obj, "web_search_options": _obj, "thinking": _obj,
    "functions": _functions, "function_call": _function_call, "verbosity": _str,
}


def _part(w: str, p: Any) -> None:
    if isinstance(p, str):
        return
    if not isinstance(p, dict):
        raise _bad(w, "a content part object")
    t = p.get("type")
    if not isinstance(t, str):
        raise _bad(w + ".type", "a string")
    if t == "text":
        if not isinstance(p.get("text"), str):
            raise _bad(w + ".text", "a string")
    elif t == "refusal":
        if p.get("refusal") is not None and not isinstance(p["refusal"], str):
            raise _bad(w + ".refusal", "a string")
    elif t == "image_url":
        iu = p.get("image_url")
        url = iu.get("url") if isinstance(iu, dict) else iu
        if not isinstance(url, str):
            raise _bad(w + ".image_url.url", "a string")
    elif t == "file":
        f = p.get("file")
        if f is not None:
            _obj(w + ".file", f)
            for k in ("file_data", "file_id", "filename"):
                if f.get(k) is not None and not isinstance(f[k], str):
                    raise _bad(f"{w}.file.{k}", "a string")
    elif t == "input_audio":
        a = p.get("input_audio")
        _obj(w + ".input_audio", a)
        assert isinstance(a, dict)
        for k in ("data", "format"):
            if a.get(k) is not None and not isinstance(a[k], str):
                raise _bad(f"{w}.input_audio.{k}", "a string")


def check_messages(messages: Any, name: str = "messages") -> None:
    if not isinstance(messages, list):
        raise _bad(name, "an array of messages")
    for i, m in enumerate(messages):
        # the common case, {"role": str, "content": str}, costs two type checks
        if type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str:
            continue
        _message(f"{name}[{i}]", m)


def _message(w: str, m: Any) -> None:
    if not isinstance(m, dict):
        raise _bad(w, "an object")
    if not isinstance(m.get("role"), str):
        raise _bad(w + ".role", "a string")
    c = m.get("content")
    if c is not None and not isinstance(c, str):
        if not isinstance(c, list):
            raise _bad(w + ".content", "a string or an array of content parts")
        for j, p in enumerate(c):
            _part(f"{w}.content[{j}]", p)
    _message_fields(w, m)


def _message_fields(w: str, m: dict[str, Any]) -> None:
    for k in ("name", "tool_call_id", "refusal", "reasoning_content"):
        if m.get(k) is not None and not isinstance(m[k], str):
            raise _bad(f"{w}.{k}", "a string")
    tcs = m.get("tool_calls")
    if tcs is not None:
        if not isinstance(tcs, list):
            raise _bad(w + ".tool_calls", "an array")
        for i, tc in enumerate(tcs):
            tw = f"{w}.tool_calls[{i}]"
            if not isinstance(tc, dict):
                raise _bad(tw, "an object")
            if tc.get("id") is not None and not isinstance(tc["id"], str):
                raise _bad(tw + ".id", "a string")
            if tc.get("type") is not None and not isinstance(tc["type"], str):
                raise _bad(tw + ".type", "a string")
            fn = tc.get("function")
            if fn is not None:
                _obj(tw + ".function", fn)
                if fn.get("name") is not None and not isinstance(fn["name"], str):
                    raise _bad(tw + ".function.name", "a string")
                a = fn.get("arguments")
                if a is not None and not isinstance(a, (str, dict)):
                    raise _bad(tw + ".function.arguments", "a JSON string")
    tbs = m.get("thinking_blocks")
    if tbs is not None:
        if not isinstance(tbs, list):
            raise _bad(w + ".thinking_blocks", "an array")
        for i, tb in enumerate(tbs):
            if not isinstance(tb, dict):
                raise _bad(f"{w}.thinking_blocks[{i}]", "an object")
    fc = m.get("function_call")
    if fc is not None and not isinstance(fc, dict):
        raise _bad(w + ".function_call", "an object")


def check_chat(req: ChatRequest) -> None:
    """Raise a 400 naming the field when a canonical chat field a mapping reads has the wrong type."""
    checks = PARAM_CHECKS
    for k, v in req.params.items():
        if v is None:
            continue
        f = checks.get(k)
        if f is not None:
            f(k, v)
    if req.endpoint == "completion":
        p = req.prompt
        if p is not None and not isinstance(p, (str, list)):
            raise _bad("prompt", "a string or an array")
    check_messages(req.messages)


def check_embedding(req: EmbeddingRequest) -> None:
    inp = req.input
    if isinstance(inp, str):
        return
    if not isinstance(inp, list) or not all(
            isinstance(x, str) or (isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in x)) for x in inp):
        raise _bad("input", "a string, an array of strings or an array of token arrays")
    p = req.params
    d = p.get("dimensions")
    if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise bad_request("'dimensions' must be a positive integer", param="dimensions", code="invalid_type")
    ef = p.get("encoding_format")
    if ef is not None and not isinstance(ef, str):
        raise _bad("encoding_format", "a string")
    u = p.get("user")
    if u is not None and not isinstance(u, str):
        raise _bad("user", "a string")
