"""The cache key: every answer-changing field splits it; key order, whitespace and non-answer fields do not."""
from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from helixagent.api.openai_format import parse_chat, parse_completion
from helixagent.cache import IGNORED_PARAMS, cache_key, scope_of
from helixagent.cache.service import parse_cache_control
from helixagent.pipeline import Identity

BASE: dict[str, Any] = {"model": "gpt-4o-mini", "temperature": 0,
                        "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "hello"}]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def key(body: dict[str, Any], scope: str = "a:app1", provider: str = "openai", model: str | None = None,
        parser: Any = parse_chat) -> str:
    req, _ = parser(orjson.dumps(body), {"openai"})
    return cache_key(req, scope, provider, model or req.model)


ANSWER_CHANGING = [
    {"model": "gpt-4o"},
    {"messages": [{"role": "user", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello!"}]},
    {"messages": [{"role": "system", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "hello"}]}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello", "name": "x"}]},
    {"tools": [TOOL]}, {"tools": [TOOL], "tool_choice": "required"}, {"tool_choice": "none"},
    {"response_format": {"type": "json_object"}}, {"temperature": 0.5}, {"top_p": 0.9}, {"max_tokens": 10},
    {"max_completion_tokens": 10}, {"stop": "\n"}, {"stop": ["\n", "."]}, {"seed": 1}, {"n": 2},
    {"logprobs": True}, {"logprobs": True, "top_logprobs": 3}, {"presence_penalty": 1}, {"frequency_penalty": 1},
    {"logit_bias": {"1": 5}}, {"parallel_tool_calls": False}, {"reasoning_effort": "low"},
    {"modalities": ["text"]}, {"prediction": {"type": "content", "content": "x"}}, {"unknown_vendor_knob": 1},
]


def test_every_answer_changing_field_splits_the_key() -> None:
    keys = {key(BASE)}
    for change in ANSWER_CHANGING:
        k = key({**BASE, **change})
        assert k not in keys, change
        keys.add(k)


def test_target_scope_and_endpoint_split_the_key() -> None:
    k = key(BASE)
    assert key(BASE, provider="azure") != k                        # same model name, another provider
    assert key(BASE, model="gpt-4o-mini-2024-07-18") != k          # resolved to another upstream model
    assert key(BASE, scope="a:app2") != k                          # another tenant
    assert key(BASE, scope="") != k                                # the global namespace
    chat = key({"model": "gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
    legacy = key({"model": "gpt-4o-mini", "temperature": 0, "prompt": "hi"}, parser=parse_completion)
    assert chat != legacy


def test_non_answer_fields_order_and_spelling_share_the_key() -> None:
    k = key(BASE)
    reordered = {"messages": [{"content": "be brief", "role": "system"}, {"content": "hello", "role": "user"}],
                 "temperature": 0.0, "model": "gpt-4o-mini"}
    assert key(reordered) == k
    for extra in ({"user": "u1"}, {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}},
                  {"stream": False}, {"metadata": {"a": "b"}}, {"store": True}, {"safety_identifier": "s"},
                  {"prompt_cache_key": "p"}, {"provider": "openai"}, {"cache": True}):
        assert key({**BASE, **extra}) == k, extra
    assert key({**BASE, "model": "openai/gpt-4o-mini"}) == k       # provider/model spelling
    raw = b'{ "temperature" : 0 ,\n\t"messages": [{"role":"system","content":"be brief"},{"role":"user","content":"hello"}],' \
          b' "model":"gpt-4o-mini"}'
    req, _ = parse_chat(raw, {"openai"})
    assert cache_key(req, "a:app1", "openai", "gpt-4o-mini") == k
    assert {"user", "stream", "stream_options", "metadata"} <= IGNORED_PARAMS


def test_key_does_not_mutate_the_request() -> None:
    req, _ = parse_chat(orjson.dumps({**BASE, "temperature": 0, "user": "u"}), {"openai"})
    before = copy.deepcopy((req.messages, req.params))
    cache_key(req, "", "openai", "gpt-4o-mini")
    assert (req.messages, req.params) == before and type(req.params["temperature"]) is int


def test_uncanonicalisable_body_raises_a_catchable_error() -> None:
    req, _ = parse_chat(orjson.dumps(BASE), {"openai"})
    req.params["weird"] = {1, 2}  # not JSON: never happens from a parsed body, but must not crash the stage
    with pytest.raises((TypeError, ValueError)):
        cache_key(req, "", "openai", "gpt-4o-mini")


def test_scope_of() -> None:
    assert scope_of(Identity(key_id="k1", user_id="u1", application="shop"), "application") == "a:shop"
    assert scope_of(Identity(key_id="k1", user_id="u1"), "application") == "k:k1"
    assert scope_of(Identity(user_id="u1"), "application") == "u:u1"
    assert scope_of(Identity(key_id="k1", application="shop"), "global") == ""
    assert scope_of(None, "application") == ""
    # an application named like a key id never collides with that key
    assert scope_of(Identity(application="k:k1"), "application") != scope_of(Identity(key_id="k1"), "application")


def test_cache_control_parsing() -> None:
    assert parse_cache_control("no-cache") == (True, False)
    assert parse_cache_control("No-Store") == (False, True)
    assert parse_cache_control("no-cache, no-store") == (True, True)
    assert parse_cache_control("max-age=0") == (True, False)
    assert parse_cache_control("max-age=60, private") == (False, False)
