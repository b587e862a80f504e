"""The Anthropic Messages translation in-process, by property: a generated /v1/messages body survives
Anthropic -> canonical -> Anthropic, and generated canonical chunk streams become valid, ordered Anthropic
SSE events that mean what the non-streamed answer means (``api/anthropic_request.py``,
``api/anthropic_stream.py``, ``api/anthropic_response.py``).  The HTTP ingress is tests/test_anthropic_ingress.py."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helixagent.api import anthropic_format as afmt
from helixagent.canonical import StreamAccumulator, Usage, new_chunk, replay_chunks, usage_chunk
from helixagent.errors import GatewayError
from helixagent.providers.anthropic_mapping import canonical_to_anthropic_request
from support.anthropic_events import EVENT, check_order, fold

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
_cc = st.one_of(st.none(), st.just({"type": "ephemeral"}))
_id = st.from_regex(r"toolu_[A-Za-z0-9]{4,10}", fullmatch=True)
_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,20}", fullmatch=True)
_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text,
                     lambda ch: st.lists(ch, max_size=3) | st.dictionaries(_name, ch, max_size=3), max_leaves=6)


def _with_cc(block: dict[str, Any], cc: Any) -> dict[str, Any]:
    if cc is not None:
        block["cache_control"] = cc
    return block


text_block = st.builds(lambda t, cc: _with_cc({"type": "text", "text": t}, cc), _text, _cc)
image_block = st.builds(lambda d, mt, cc: _with_cc({"type": "image", "source": {"type": "base64", "media_type": mt,
                                                                                  "data": d}}, cc),
                        st.from_regex(r"[A-Za-z0-9+/]{4,16}", fullmatch=True),
                        st.sampled_from(sorted(afmt.IMAGE_TYPES)), _cc) | \
    st.builds(lambda u: {"type": "image", "source": {"type": "url", "url": "https://img.example/" + u}},
              st.from_regex(r"[a-z]{1,8}\.png", fullmatch=True))
user_content = st.one_of(_text, st.lists(text_block | image_block, min_size=1, max_size=3))


@st.composite
def conversation(draw: Any) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 3))):
        msgs.append({"role": "user", "content": draw(user_content)})
        texts = draw(st.lists(st.builds(lambda t: {"type": "text", "text": t}, _text), max_size=1))
        calls = draw(st.lists(st.builds(lambda i, n, inp: {"type": "tool_use", "id": i, "name": n, "input": inp},
                                        _id, _name, st.dictionaries(_name, _json, max_size=3)),
                              max_size=2, unique_by=lambda b: b["id"]))
        if not texts and not calls:
            msgs.append({"role": "assistant", "content": draw(_text)})
            continue
        msgs.append({"role": "assistant", "content": texts + calls})
        if calls:
            results = [_with_cc({"type": "tool_result", "tool_use_id": c["id"],
                                 "content": draw(st.one_of(_text, st.lists(text_block, min_size=1, max_size=2)))},
                                draw(_cc)) for c in calls]
            for r in results:
                if draw(st.booleans()):
                    r["is_error"] = True
            tail = draw(st.lists(text_block, max_size=1))
            msgs.append({"role": "user", "content": results + tail})
            msgs.append({"role": "assistant", "content": draw(_text)})
    msgs.append({"role": "user", "content": draw(user_content)})
    return msgs


@st.composite
def anthropic_request(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m-" + draw(_name), "max_tokens": draw(st.integers(1, 100000)),
                            "messages": draw(conversation())}
    sysv = draw(st.one_of(st.none(), _text, st.lists(text_block, min_size=1, max_size=2)))
    if sysv is not None:
        body["system"] = sysv
    if draw(st.booleans()):
        body["stop_sequences"] = draw(st.lists(_text, min_size=1, max_size=4))
    for k in ("temperature", "top_p"):
        if draw(st.booleans()):
            body[k] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        body["top_k"] = draw(st.integers(0, 500))
    if draw(st.booleans()):
        body["metadata"] = {"user_id": draw(_text)}
    if draw(st.booleans()):
        names = draw(st.lists(_name, min_size=1, max_size=3, unique=True))
        body["tools"] = [_with_cc({"name": n, "description": draw(_text),
                                   "input_schema": {"type": "object", "properties": {draw(_name): {"type": "string"}}}},
                                  draw(_cc)) for n in names]
        choice = draw(st.sampled_from(["auto", "any", "none", "tool"]))
        tc: dict[str, Any] = {"type": choice}
        if choice == "tool":
            tc["name"] = names[0]
        if choice != "none" and draw(st.booleans()):
            tc["disable_parallel_tool_use"] = True
        body["tool_choice"] = tc
    if draw(st.booleans()):
        body["cache_control"] = {"type": "ephemeral"}
    if draw(st.booleans()):
        body["output_config"] = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
        if draw(st.booleans()):
            body["output_config"]["effort"] = draw(st.sampled_from(["low", "high", "max"]))
    if draw(st.booleans()):
        body["stream"] = True
    return body


def _norm_content(c: Any) -> Any:
    if isinstance(c, str):
        return [{"type": "text", "text": c}] if c else []
    out = []
    for b in c:
        if b["type"] == "tool_result":
            b = dict(b, content=_norm_content(b["content"]))
        out.append(b)
    return out


def normalize(body: dict[str, Any]) -> dict[str, Any]:
    """Equivalent spellings (a string vs one text block) compare equal."""
    out = dict(body)
    if "system" in out:
        out["system"] = _norm_content(out["system"])
    out["messages"] = [{"role": m["role"], "content": _norm_content(m["content"])} for m in body["messages"]]
    if out.get("tool_choice", {}).get("disable_parallel_tool_use") is False:
        out["tool_choice"] = {k: v for k, v in out["tool_choice"].items() if k != "disable_parallel_tool_use"}
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anthropic_request())
def test_roundtrip_anthropic_canonical_anthropic(body):
    req, helix = afmt.parse_messages(orjson.dumps(body), {})
    back = canonical_to_anthropic_request(req)
    assert normalize(back) == normalize(body)
    # the canonical request is plain OpenAI shape apart from the documented extensions
    for m in req.messages:
        assert m["role"] in ("system", "user", "assistant", "tool")
    has_cc = "cache_control" in _keys(body)  # as a key: a text may well say "cache_control" or "is_error"
    has_err = any(isinstance(m["content"], list) and any(b.get("is_error") for b in m["content"])
                  for m in body["messages"])
    assert helix["anthropic"]["lower"] == (has_cc or has_err)
    afmt.lower_for_openai(req)
    left = _keys(req.messages)
    assert "cache_control" not in left and "is_error" not in left


def _keys(v: Any) -> set[str]:
    """Every dict key anywhere in a JSON value."""
    out: set[str] = set()
    todo = [v]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            out.update(x)
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return out


# canonical chunk streams -> Anthropic events: valid, ordered, and meaning-preserving
@st.composite
def chunk_stream(draw: Any) -> tuple[list[dict[str, Any]], bool]:
    cid, model, created = "chatcmpl-p1", "gpt-x", 1700000000
    chunks = [new_chunk(cid, model, created, {"role": "assistant", "content": ""})]
    mode = draw(st.sampled_from(["none", "reasoning_content", "blocks"]))
    if mode == "reasoning_content":  # DeepSeek / vLLM: text only, no block boundaries, no signature
        for piece in draw(st.lists(_text, max_size=3)):
            chunks.append(new_chunk(cid, model, created, {"reasoning_content": piece}))
    elif mode == "blocks":  # Anthropic: blocks with signatures, redacted blocks
        for k in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):
                chunks.append(new_chunk(cid, model, created, {"thinking_blocks": [{"index": k, "type": "thinking"}]}))
                for piece in draw(st.lists(_text, max_size=3)):
                    chunks.append(new_chunk(cid, model, created, {"reasoning_content": piece}))
                sig = draw(st.text("abcXYZ019+/=", max_size=12))
                if sig:
                    chunks.append(new_chunk(cid, model, created, {"thinking_blocks": [{"index": k, "signature": sig}]}))
            else:
                chunks.append(new_chunk(cid, model, created, {"thinking_blocks": [
                    {"index": k, "type": "redacted_thinking", "data": draw(st.text("abcXYZ019", min_size=1, max_size=8))}]}))
    for piece in draw(st.lists(_text, max_size=4)):
        chunks.append(new_chunk(cid, model, created, {"content": piece}))
    ncalls = draw(st.integers(0, 3))
    for ti in range(ncalls):
        args = orjson.dumps(draw(st.dictionaries(_name, _json, max_size=3))).decode()
        chunks.append(new_chunk(cid, model, created, {"tool_calls": [{"index": ti, "id": f"call_{ti}", "type": "function",
                                                                      "function": {"name": draw(_name), "arguments": ""}}]}))
        step = draw(st.integers(1, 9))
        for i in range(0, len(args), step):
            chunks.append(new_chunk(cid, model, created, {"tool_calls": [{"index": ti, "function": {"arguments": args[i:i + step]}}]}))
    finish = "tool_calls" if ncalls else draw(st.sampled_from(["stop", "length", "content_filter"]))
    chunks.append(new_chunk(cid, model, created, {}, finish))
    with_usage = draw(st.booleans())
    if with_usage:
        chunks.append(usage_chunk(cid, model, created, Usage(11, 7, 18, cache_read_tokens=3)))
    return chunks, with_usage


def _parse_frames(data: bytes) -> list[dict[str, Any]]:
    out = []
    for fr in data.split(b"\n\n"):
        if not fr:
            continue
        ev, dl = fr.split(b"\n")
        assert ev.startswith(b"event: ") and dl.startswith(b"data: ")
        d = orjson.loads(dl[6:])
        assert d["type"] == ev[7:].decode()
        out.append(d)
    return out


@settings(max_examples=200, deadline=None)
@given(chunk_stream())
def test_stream_translation_property(sample):
    chunks, with_usage = sample
    tr = afmt.StreamTranslator("gpt-x", [{"role": "user", "content": "hi"}])
    data = b"".join(tr.feed(c) for c in chunks) + tr.end()
    events = _parse_frames(data)
    for e in events:
        EVENT.validate_python(e)
    check_order(events)
    msg = fold(events)
    Message.model_validate(msg)
    acc = StreamAccumulator()
    for c in chunks:
        acc.add(c)
    expect = afmt.render_message(acc.response("p"), "gpt-x")
    assert msg["content"] == expect["content"]
    # a cache hit replays the accumulated response: the same events again
    tr2 = afmt.StreamTranslator("gpt-x", [{"role": "user", "content": "hi"}])
    replayed = _parse_frames(b"".join(tr2.feed(c) for c in replay_chunks(acc.response("p"))) + tr2.end())
    assert fold(replayed)["content"] == msg["content"]
    assert msg["stop_reason"] == expect["stop_reason"] and msg["id"] == expect["id"]
    if with_usage:
        assert msg["usage"] == expect["usage"] == {"input_tokens": 8, "output_tokens": 7,
                                                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3}


def test_error_mid_stream_translation():
    from helixagent.errors import GatewayError
    tr = afmt.StreamTranslator("m", None)
    data = tr.feed(new_chunk("c1", "m", 1, {"content": "hi"})) + tr.end(GatewayError(502, "upstream broke"))
    events = _parse_frames(data)
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "upstream broke"}}


# -- the type checks the translation leaves to the edge schema (schemas/anthropic.py) ------------------------
# anthropic_request.py reads types as the schema guarantees them; each of these used to have a hand-written
# twin there.  Each is a 400 naming the parameter, before any translation runs.

def _body(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **kw}


def _blocks(*blocks: Any, role: str = "user") -> dict[str, Any]:
    return _body(messages=[{"role": role, "content": list(blocks)}])


_TOOL = {"name": "f", "input_schema": {"type": "object"}}
SCHEMA_ONLY = [
    (_blocks({"type": "text", "text": "x", "cache_control": {"type": "persistent"}}),
     "messages.0.content.0.cache_control.type", "invalid_type"),
    (_body(cache_control={"type": "forever"}), "cache_control.type", "invalid_type"),
    (_blocks({"type": "text", "text": 5}), "messages.0.content.0.text", "invalid_type"),
    (_blocks({"type": "image", "source": []}), "messages.0.content.0.source", "invalid_type"),
    (_blocks({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": 1}}),
     "messages.0.content.0.source.data", "invalid_type"),
    (_blocks({"type": "image", "source": {"type": "url", "url": None}}), "messages.0.content.0.source.url", "invalid_type"),
    (_blocks({"type": "document", "source": "x"}), "messages.0.content.0.source", "invalid_type"),
    (_blocks({"type": "tool_result", "tool_use_id": 7}), "messages.0.content.0.tool_use_id", "invalid_type"),
    (_blocks({"type": "tool_result", "tool_use_id": "t", "content": 3}), "messages.0.content.0.content", "invalid_type"),
    (_blocks({"type": "tool_result", "tool_use_id": "t", "content": ["x"]}), "messages.0.content.0.content.0",
     "invalid_type"),
    (_blocks({"type": "tool_result", "tool_use_id": "t", "is_error": "yes"}), "messages.0.content.0.is_error",
     "invalid_type"),
    (_blocks({"type": "tool_use", "id": "t", "name": "f", "input": []}, role="assistant"), "messages.0.content.0.input",
     "invalid_type"),
    (_blocks("x"), "messages.0.content.0", "invalid_type"),
    (_blocks({"type": 3}), "messages.0.content.0.type", "invalid_type"),
    (_body(system=5), "system", "invalid_type"),
    (_body(system=[{"type": "image"}]), "system.0.type", "invalid_type"),
    (_body(tools={}), "tools", "invalid_type"),
    (_body(tools=[1]), "tools.0", "invalid_type"),
    (_body(tools=[{"type": 5}]), "tools.0.type", "invalid_type"),
    (_body(tools=[{"name": 5, "input_schema": {"type": "object"}}]), "tools.0.name", "invalid_type"),
    (_body(tools=[{"name": "f", "input_schema": "x"}]), "tools.0.input_schema", "invalid_type"),
    (_body(tools=[{**_TOOL, "description": 1}]), "tools.0.description", "invalid_type"),
    (_body(tool_choice="auto"), "tool_choice", "invalid_type"),
    (_body(tool_choice={"type": "bogus"}), "tool_choice.type", "invalid_value"),
    (_body(tools=[_TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": 1}),
     "tool_choice.disable_parallel_tool_use", "invalid_type"),
    (_body(max_tokens=True), "max_tokens", "invalid_type"),
    (_body(max_tokens=0), "max_tokens", "invalid_value"),
    (_body(messages=[]), "messages", "invalid_value"),
    ({"model": "m", "max_tokens": 1}, "messages", "missing_required_parameter"),
    (_body(messages=["x"]), "messages.0", "invalid_type"),
    (_body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role", "invalid_type"),
    (_body(messages=[{"role": "user", "content": 1}]), "messages.0.content", "invalid_type"),
    (_body(stop_sequences=[1]), "stop_sequences.0", "invalid_type"),
    (_body(temperature=1.5), "temperature", "invalid_value"),   # out of range: the bound, not a type
    (_body(top_p=True), "top_p", "invalid_type"),
    (_body(top_k=-1), "top_k", "invalid_value"),
    (_body(metadata=[]), "metadata", "invalid_type"),
    (_body(metadata={"user_id": 5}), "metadata.user_id", "invalid_type"),
    (_body(thinking={"type": "on"}), "thinking.type", "invalid_type"),
    (_body(thinking={"type": "enabled", "budget_tokens": True}), "thinking.budget_tokens", "invalid_type"),
    (_body(output_config=1), "output_config", "invalid_type"),
    (_body(output_config={"format": {"type": "text"}}), "output_config.format.type", "invalid_type"),
    (_body(stream="yes"), "stream", "invalid_type"),
]


@pytest.mark.parametrize("body,param,code", SCHEMA_ONLY, ids=[p for _, p, _ in SCHEMA_ONLY])
def test_schema_alone_rejects_wrong_types(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(GatewayError) as ei:
        afmt.parse_messages(orjson.dumps(body), ())
    e = ei.value
    assert (e.status, e.param, e.code) == (400, param, code)
    assert str(e).startswith(param + ": ")


# the checks the schema cannot express stay in the translation, with their own messages
@pytest.mark.parametrize("body,param,message", [
    (_blocks({"type": "text", "text": ""}), "messages.0.content.0.text", "text content blocks must be non-empty"),
    (_blocks({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}),
     "messages.0.content.0.source.data", "must be a non-empty base64 string"),
    (_blocks({"type": "image", "source": {"type": "url", "url": "ftp://x"}}), "messages.0.content.0.source.url",
     "must be an http(s) URL"),
    (_blocks({"type": "tool_result", "tool_use_id": ""}), "messages.0.content.0.tool_use_id",
     "is required and must be a string"),
    (_blocks({"type": "tool_use", "id": "t", "name": "", "input": {}}, role="assistant"), "messages.0.content.0.name",
     "is required and must be a string"),
    (_body(messages=[{"role": "user", "content": []}]), "messages.0.content", "must not be empty"),
    (_body(tools=[{"name": "bad name!", "input_schema": {"type": "object"}}]), "tools.0.name",
     "is required and must match ^[a-zA-Z0-9_-]{1,128}$"),
    (_body(tools=[_TOOL, _TOOL]), "tools.1.name", "tool names must be unique; 'f' is repeated"),
    (_body(tools=[{"name": "f", "input_schema": {"type": "array"}}]), "tools.0.input_schema.type", "must be 'object'"),
    (_body(tools=[_TOOL], tool_choice={"type": "tool", "name": ""}), "tool_choice.name", "is required for type 'tool'"),
    (_body(stop_sequences=["a", ""]), "stop_sequences", "must be an array of non-empty strings"),
    (_body(metadata={"user_id": "u" * 257}), "metadata.user_id", "must be a string of at most 256 characters"),
    (_body(thinking={"type": "enabled", "budget_tokens": 1000}), "thinking.budget_tokens", "must be an integer >= 1024"),
    (_body(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 2000}), "thinking.budget_tokens",
     "must be less than max_tokens"),
    (_body(output_config={"effort": "huge"}), "output_config.effort", "must be one of low, medium, high, xhigh, max"),
])
def test_translation_checks_meaning(body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(GatewayError) as ei:
        afmt.parse_messages(orjson.dumps(body), ())
    assert ei.value.status == 400 and ei.value.param == param
    assert str(ei.value) == f"{param}: {message}"
