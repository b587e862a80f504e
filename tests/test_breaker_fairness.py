"""One tenant cannot open a provider's circuit breaker for everyone.

* Client input a vendor mapping cannot map is the client's 400 naming the field: no upstream call, no
  retry, no verdict on the provider -- so 20 malformed requests from one key leave another key's
  success rate untouched (real HTTP through the gateway, fake upstreams for OpenAI, Anthropic, Gemini).
* Streams cut mid-way are judged by the provider's stream breaker only; non-streamed requests to the
  same provider keep being served.
* Property-based: the mappings, fed wrong types in every field they read, raise a 400 GatewayError
  naming the field or map the request -- never another exception.
"""
from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI, Fault
from helixagent.canonical import ChatRequest
from helixagent.config import load_config_dict
from helixagent.errors import GatewayError
from helixagent.providers import build_provider
from support.keys import MASTER, admin_create

CLAUDE, GEMINI, GPT = "claude-3-5-haiku-latest", "gemini-2.0-flash", "gpt-4o-mini"
MSG = [{"role": "user", "content": "hello there"}]
BREAKER = {"failure_threshold": 3, "cooldown": "30s", "min_requests": 100}
RETRIES = {"max_attempts": 2, "backoff_base_ms": 10, "backoff_max_ms": 20}


@pytest.fixture
def gw(make_gateway: Any, fakes: tuple[FakeOpenAI, FakeAnthropic, FakeGemini]) -> Any:
    for f in fakes:
        f.reset()
    fo, fa, fg = fakes
    return make_gateway({"auth": {"master_key": MASTER},
                         "providers": [fo.provider("openai"), fa.provider("claude"), fg.provider("gemini")],
                         "routing": {"retries": RETRIES, "circuit_breaker": BREAKER}})


def post(gw: Any, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=20,
                      headers={"authorization": f"Bearer {key}"})


def health(gw: Any) -> dict[str, Any]:
    return httpx.get(gw.url + "/health", headers={"authorization": f"Bearer {MASTER}"}).json()["providers"]


# (model, extra fields, the parameter the 400 must name)
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    (CLAUDE, {"reasoning_effort": []}, "reasoning_effort"),
    (CLAUDE, {"modalities": -1}, "modalities"),
    (CLAUDE, {"top_k": "many"}, "top_k"),
    (CLAUDE, {"tools": [{"type": "function", "function": {"name": 5}}]}, "tools[0].function.name"),
    (CLAUDE, {"tool_choice": 7}, "tool_choice"),
    (CLAUDE, {"response_format": {"type": ["json_schema"]}}, "response_format.type"),
    (CLAUDE, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    (GEMINI, {"reasoning_effort": {"level": "high"}}, "reasoning_effort"),
    (GEMINI, {"modalities": -1}, "modalities"),
    (GEMINI, {"seed": "abc"}, "seed"),
    (GEMINI, {"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema"),
    (GEMINI, {"tools": "search"}, "tools"),
    (GEMINI, {"messages": [{"role": "user", "content": [1, "x", None]}]}, "messages[0].content[0]"),
    (GEMINI, {"logit_bias": ["a"]}, "logit_bias"),
    (GPT, {"reasoning_effort": []}, "reasoning_effort"),
    (GPT, {"modalities": "text"}, "modalities"),
    (GPT, {"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    (GPT, {"tool_choice": {"type": "function", "function": {"name": []}}}, "tool_choice.function.name"),
    (GPT, {"messages": [{"role": "assistant", "content": None, "tool_calls": "x"},
                        {"role": "user", "content": "hi"}]}, "messages[0].tool_calls"),
    (GPT, {"metadata": ["x"]}, "metadata"),
]


def test_malformed_requests_from_one_key_leave_another_keys_success_untouched(gw: Any, fakes: Any) -> None:
    assert len(MALFORMED) == 20
    attacker = admin_create(gw, user_id="attacker")["key"]
    victim = admin_create(gw, user_id="victim")["key"]
    for model, extra, param in MALFORMED:
        body = {"model": model, "messages": MSG, **extra}
        r = post(gw, attacker, body)
        assert r.status_code == 400, (extra, r.status_code, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (extra, err)
        assert param.partition("[")[0].partition(".")[0] in err["message"]
    assert [len(f.calls) for f in fakes] == [0, 0, 0]  # no malformed request reached an upstream
    hs = health(gw)
    for name in ("openai", "claude", "gemini"):
        assert hs[name]["breaker"] == "closed" and hs[name]["failures"] == 0, hs[name]
    # the other tenant: every request served
    statuses = []
    for i in range(12):
        for model in (CLAUDE, GEMINI, GPT):
            statuses.append(post(gw, victim, {"model": model, "messages": MSG, "stream": i % 3 == 0}).status_code)
    assert statuses == [200] * len(statuses)
    hs = health(gw)
    for name in ("openai", "claude", "gemini"):
        assert hs[name]["breaker"] == "closed" and hs[name]["failures"] == 0, hs[name]
        assert hs[name]["stream"]["breaker"] == "closed"


def test_stream_cuts_do_not_open_the_breaker_for_non_streamed_requests(gw: Any, fakes: Any) -> None:
    fo = fakes[0]
    fo.sticky = Fault(cut_after=2)  # every stream breaks after its first two chunks
    for _ in range(BREAKER["failure_threshold"]):  # enough cuts to open a breaker
        r = post(gw, MASTER, {"model": GPT, "messages": MSG, "stream": True})
        assert r.status_code == 200
        assert '"error"' in r.text and "[DONE]" not in r.text  # the client saw the cut as an error event
    h = health(gw)["openai"]
    assert h["stream"]["breaker"] == "open" and h["stream"]["cut"] == 3
    assert h["breaker"] == "closed" and h["failures"] == 0
    # whole answers from the same provider are still served (the fake cuts only streams)
    for _ in range(10):
        r = post(gw, MASTER, {"model": GPT, "messages": MSG})
        assert r.status_code == 200, r.text
    # while the stream breaker is open, streamed requests are refused up front (no upstream call)
    n = len(fo.calls)
    r = post(gw, MASTER, {"model": GPT, "messages": MSG, "stream": True})
    assert r.status_code == 503 and r.json()["error"]["code"] == "providers_unavailable"
    assert "stream circuit breaker" in r.json()["error"]["message"]
    assert len(fo.calls) == n
    h = health(gw)["openai"]
    assert h["breaker"] == "closed" and h["failures"] == 0


def test_stream_breaker_sends_streams_to_a_fallback_that_streams(make_gateway: Any, fakes: Any) -> None:
    fo, fa, _ = fakes
    for f in fakes:
        f.reset()
    gw = make_gateway({"providers": [fo.provider("openai", fallback_to=["spare"]),
                                     fa.provider("spare", models=[GPT], priority=2)],
                       "routing": {"retries": RETRIES, "circuit_breaker": BREAKER}})
    fo.sticky = Fault(cut_after=2)
    for _ in range(3):
        assert post(gw, "x", {"model": GPT, "messages": MSG, "stream": True}).status_code == 200
    r = post(gw, "x", {"model": GPT, "messages": MSG, "stream": True})
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "spare" and "[DONE]" in r.text
    r = post(gw, "x", {"model": GPT, "messages": MSG})
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "openai"


# -- property-based: wrong types in every field a mapping reads ---------------------------------------
def _providers() -> dict[str, Any]:
    cfg = load_config_dict({"providers": [
        {"name": "openai", "type": "openai", "api_key": "sk-unused-000000", "base_url": "http://127.0.0.1:9/v1"},
        {"name": "claude", "type": "anthropic", "api_key": "sk-ant-unused-000000", "base_url": "http://127.0.0.1:9"},
        {"name": "gemini", "type": "gemini", "api_key": "AIzaunused000000000000000", "base_url": "http://127.0.0.1:9"},
        {"name": "mock", "type": "mock"}]})
    return {pc.name: build_provider(pc, cfg.http) for pc in cfg.providers}


PROVIDERS = _providers()
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31), st.floats(allow_nan=False),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(
        ["type", "text", "name", "function", "url", "image_url", "schema", "json_schema", "arguments", "id",
         "parameters", "file", "file_data", "input_audio", "format", "data", "properties", "items"]),
        kids, max_size=3)), max_leaves=8)
PARAMS = ["temperature", "top_p", "top_k", "n", "seed", "presence_penalty", "frequency_penalty", "max_tokens",
          "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias", "stop", "modalities",
          "reasoning_effort", "response_format", "tools", "tool_choice", "parallel_tool_calls", "user",
          "metadata", "stream_options", "output_config", "generationConfig", "audio", "prediction", "thinking"]
part_types = st.sampled_from(["text", "image_url", "file", "input_audio", "refusal", 5, None])
parts = st.one_of(json_values, st.lists(st.one_of(json_values, st.fixed_dictionaries(
    {"type": part_types}, optional={"text": json_values, "image_url": json_values, "file": json_values,
                                    "input_audio": json_values, "refusal": json_values})), max_size=3))
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"])},
    optional={"content": parts, "tool_calls": json_values, "tool_call_id": json_values, "name": json_values,
              "thinking_blocks": json_values, "refusal": json_values}), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=4), msgs=messages,
       which=st.sampled_from(sorted(PROVIDERS)), op=st.sampled_from(["chat", "stream"]))
def test_mappings_reject_wrong_types_with_a_400_naming_the_field(params: dict[str, Any], msgs: list[Any],
                                                                 which: str, op: str) -> None:
    req = ChatRequest("m", msgs, params, stream=op == "stream")
    try:
        wire = PROVIDERS[which].prepare(req, op)
    except GatewayError as exc:
        assert exc.status == 400 and exc.param, (exc.status, exc.param, exc.message)
        return
    if wire is not None:
        orjson.loads(wire)  # a mapped request is a JSON body
