#!/usr/bin/env python3
"""Per-request cost of validating a client body at the edge, µs per parse of a typical chat body, for each
candidate and for the hand-written checks HelixAgent had before (kept here, verbatim, as the baseline).

Candidates: pydantic v2 (TypedDict schemas through a TypeAdapter; the one HelixAgent ships, in
``helixagent/api/schemas/openai.py``), validating the orjson-decoded dict or the raw bytes; and msgspec
(an equivalent Struct schema below; msgspec drops unknown fields, so a gateway that must pass them through
decodes twice: msgspec to validate, orjson for the dict).  Run: PYTHONPATH=src python bench/validation_bench.py (msgspec rows only when msgspec is installed; it is not a dependency)
"""

import statistics
import time
from typing import Annotated, Any, Union

import orjson

from helixagent.api.schemas.openai import ChatBody, check_chat
from helixagent.errors import bad_request

BODY = {
    "model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 256, "stream": False, "user": "u-1",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant that answers briefly."},
        {"role": "user", "content": "What is the weather in Paris today, roughly? And in Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"q":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks. And this picture?"},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": {"type": "object", "properties": {
                                                    "q": {"type": "string"}}, "required": ["q"]}}}],
    "tool_choice": "auto", "stop": ["\n\n"],
}
RAW = orjson.dumps(BODY)

# -- the baseline: the checks parse_chat made before the schemas (copied from git history) --------------
_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "function"))
def _typecheck(body: dict[str, Any], name: str, types: tuple[type, ...], what: str) -> None:
    v = body.get(name)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in types):
        raise bad_request(f"'{name}' must be {what}", param=name, code="invalid_type")


def _number_range(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{name}' must be a number", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be between {lo:g} and {hi:g}, got {v}", param=name, code="invalid_value")


def _positive_int(body: dict[str, Any], name: str) -> None:
    v = body.get(name)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise bad_request(f"'{name}' must be a positive integer", param=name, code="invalid_value")


def _common(body: dict[str, Any]) -> None:
    _typecheck(body, "stream", (bool,), "a boolean")
    _number_range(body, "temperature", 0, 2)
    _number_range(body, "top_p", 0, 1)
    _number_range(body, "presence_penalty", -2, 2)
    _number_range(body, "frequency_penalty", -2, 2)
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _positive_int(body, "n")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options", code="invalid_type")


def legacy_parse_chat(raw: bytes) -> Any:
    body = orjson.loads(raw)
    if not isinstance(body, dict):
        raise bad_request("not an object")
    model = body.pop("model", None)
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", param="model", code="invalid_type")
    messages = body.pop("messages", None)
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"'messages[{i}]' must be an object", param=f"messages[{i}]", code="invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request("bad role", param=f"messages[{i}].role", code="invalid_value")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise bad_request("bad content", param=f"messages[{i}].content", code="invalid_type")
        if c is None and role in ("user", "system", "developer"):
            raise bad_request("content required", param=f"messages[{i}].content")
    _common(body)
    return body


def pydantic_dict(raw: bytes) -> Any:
    return check_chat(orjson.loads(raw))


_adapter_json = __import__("pydantic").TypeAdapter(ChatBody).validate_json


def pydantic_json(raw: bytes) -> Any:
    return _adapter_json(raw)


def msgspec_candidates() -> dict[str, Any]:
    try:
        import msgspec
    except ImportError:
        return {}
    from msgspec import Meta, Struct

    class S(Struct, kw_only=True, omit_defaults=True):
        pass

    class Text(S, tag="text", tag_field="type"):
        text: str

    class ImageURL(S):
        url: str
        detail: Union[str, None] = None

    class Image(S, tag="image_url", tag_field="type"):
        image_url: ImageURL

    class Fn(S):
        name: str
        arguments: str

    class Call(S, tag="function", tag_field="type"):
        id: str
        function: Fn

    class System(S, tag="system", tag_field="role"):
        content: Union[str, list[Text]]
        name: Union[str, None] = None

    class User(S, tag="user", tag_field="role"):
        content: Union[str, list[Union[Text, Image]]]
        name: Union[str, None] = None

    class Assistant(S, tag="assistant", tag_field="role"):
        content: Union[str, list[Text], None] = None
        tool_calls: Union[list[Call], None] = None
        name: Union[str, None] = None

    class ToolMsg(S, tag="tool", tag_field="role"):
        content: Union[str, list[Text]]
        tool_call_id: str

    class FnDef(S):
        name: str
        description: Union[str, None] = None
        parameters: Union[dict[str, Any], None] = None

    class Tool(S, tag="function", tag_field="type"):
        function: FnDef

    class Body(S):
        messages: Annotated[list[Union[System, User, Assistant, ToolMsg]], Meta(min_length=1)]
        model: Union[str, None] = None
        temperature: Union[Annotated[float, Meta(ge=0, le=2)], None] = None
        top_p: Union[Annotated[float, Meta(ge=0, le=1)], None] = None
        max_tokens: Union[Annotated[int, Meta(ge=1, le=2**31 - 1)], None] = None
        n: Union[Annotated[int, Meta(ge=1, le=128)], None] = None
        stream: Union[bool, None] = None
        stop: Union[str, list[str], None] = None
        user: Union[str, None] = None
        tools: Union[list[Tool], None] = None
        tool_choice: Union[str, dict[str, Any], None] = None

    dec = msgspec.json.Decoder(Body)
    loads = orjson.loads

    def msgspec_validate_then_orjson(raw: bytes) -> Any:
        dec.decode(raw)
        return loads(raw)

    return {"msgspec (validate) + orjson (the dict that passes through)": msgspec_validate_then_orjson,
            "msgspec decode only (unknown fields lost)": dec.decode}


def measure(fn: Any, n: int = 20000, rounds: int = 5) -> float:
    for _ in range(2000):
        fn(RAW)
    per = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn(RAW)
        per.append((time.process_time() - t) / n * 1e6)
    return statistics.median(per)


def main() -> None:
    cands: dict[str, Any] = {"orjson.loads only (no checks)": orjson.loads,
                             "before: orjson + hand-written checks (incomplete)": legacy_parse_chat,
                             "pydantic v2 TypeAdapter(ChatBody), orjson dict": pydantic_dict,
                             "pydantic v2 TypeAdapter(ChatBody).validate_json(bytes)": pydantic_json}
    cands.update(msgspec_candidates())
    print(f"typical chat body: {len(RAW)} bytes, {len(BODY['messages'])} messages, 1 tool")
    print(f"{'candidate':<62} {'µs/parse':>9}")
    for name, fn in cands.items():
        print(f"{name:<62} {measure(fn):>9.2f}")


if __name__ == "__main__":
    main()
