"""Fallback never turns an outage into a 400 (issue 14, item 4), over real HTTP with fake upstreams.

A candidate whose mapping cannot serve the request as asked (temperature 1.3, frequency_penalty,
response_format json_object, n=2, logprobs to Anthropic; logprobs to Gemini; top_k to OpenAI; embeddings to
Anthropic) is skipped during fallback and named in the error; with every servable candidate down the client
gets the primary's 5xx/429 (with its Retry-After), never the fallback's 400.  ``drop_params`` (global, per
provider, per route) adapts the request instead and names the change in ``x-helixagent-dropped-params``.
"""
from __future__ import annotations

from typing import Any, Iterator

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion

from fakes.anthropic_upstream import Fault as AFault
from fakes.anthropic_upstream import FakeAnthropic
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import Fault, FakeOpenAI
from helixagent.routing import adapt

MSG = [{"role": "user", "content": "hello there"}]
RETRIES = {"max_attempts": 2, "backoff_base_ms": 10, "backoff_max_ms": 30, "max_retry_after_ms": 1000}
HDR = adapt.HEADER

# (id, request params, the fallback chain of the primary, the header with drop_params on)
KINDS = [
    ("temperature", {"temperature": 1.3}, ["claude"], "temperature=1.3->1.0"),
    ("frequency_penalty", {"frequency_penalty": 0.5}, ["claude"], "frequency_penalty"),
    ("json_object", {"response_format": {"type": "json_object"}}, ["claude"], "response_format=json_object->instruction"),
    ("n", {"n": 2}, ["claude"], "n"),
    ("logprobs", {"logprobs": True, "top_logprobs": 2}, ["gemini", "claude"], "logprobs,top_logprobs"),
]
# (fault, the status the client gets, its Retry-After)
DOWN = [
    (Fault(status=503, headers={"retry-after": "7"}), 503, "7"),
    (Fault(status=500), 502, None),
    (Fault(status=429, headers={"retry-after": "9"}), 429, "9"),
]


@pytest.fixture(scope="module")
def ups_module() -> Iterator[tuple[FakeOpenAI, FakeAnthropic, FakeGemini]]:
    ups = (FakeOpenAI(), FakeAnthropic(), FakeGemini())
    yield ups
    for u in ups:
        u.close()


@pytest.fixture
def ups(ups_module: tuple[FakeOpenAI, FakeAnthropic, FakeGemini]) -> Iterator[tuple[FakeOpenAI, FakeAnthropic, FakeGemini]]:
    for u in ups_module:
        u.reset()
    yield ups_module
    for u in ups_module:
        u.reset()


def config(ups: Any, fallback: list[str], routing: dict[str, Any] | None = None,
           claude: dict[str, Any] | None = None, oa: dict[str, Any] | None = None) -> dict[str, Any]:
    fo, fa, fg = ups
    r: dict[str, Any] = {"retries": dict(RETRIES)}
    r.update(routing or {})
    return {"providers": [fo.provider("openai", priority=1, models=["gpt-4o-mini"], fallback_to=fallback, **(oa or {})),
                          fa.provider("claude", priority=2, models=["claude-sonnet-4-5"], **(claude or {})),
                          fg.provider("gemini", priority=3, models=["gemini-2.0-flash"])],
            "routing": r}


def post(gw: Any, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=20.0)


def chat(gw: Any, params: dict[str, Any], model: str = "gpt-4o-mini", **extra: Any) -> httpx.Response:
    return post(gw, {"model": model, "messages": MSG, **params, **extra})


def sse_events(r: httpx.Response) -> list[Any]:
    return [line[6:] if line[6:] == "[DONE]" else orjson.loads(line[6:])
            for line in r.text.split("\n") if line.startswith("data: ")]


def assert_primary_failure(r: httpx.Response, status: int, retry_after: str | None, skipped: list[str],
                           param: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] != "unsupported_feature"
    assert r.headers["x-helixagent-provider"] == "openai"
    if retry_after is not None:
        assert r.headers["retry-after"] == retry_after
    msg = err["message"]
    assert "cannot serve this request as asked" in msg and param in msg, msg
    for name in skipped:
        assert f"{name}: " in msg, msg
    assert HDR not in r.headers


# -- the primary down: its failure, not the fallback's 400 ------------------------------------------------
@pytest.mark.parametrize("fault,status,retry_after", DOWN, ids=["503", "500", "429"])
@pytest.mark.parametrize("kind,params,fallback,_hdr", KINDS, ids=[k[0] for k in KINDS])
def test_primary_down_answers_the_primary_failure(make_gateway, ups, kind, params, fallback, _hdr, fault, status,
                                                  retry_after):
    fo, fa, fg = ups
    fo.sticky = fault
    gw = make_gateway(config(ups, fallback))
    r = chat(gw, params)
    assert_primary_failure(r, status, retry_after, fallback, next(iter(params)))
    assert len(fo.calls) >= 1 and fa.calls == [] and fg.calls == []  # the skipped are never called


@pytest.mark.parametrize("kind,params,fallback,_hdr", KINDS, ids=[k[0] for k in KINDS])
def test_primary_up_serves_it_as_asked(make_gateway, ups, kind, params, fallback, _hdr):
    fo, fa, fg = ups
    gw = make_gateway(config(ups, fallback, routing={"drop_params": True}))
    r = chat(gw, params)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    assert r.headers["x-helixagent-provider"] == "openai" and HDR not in r.headers
    sent = fo.calls[0]["body"]
    assert all(sent[k] == v for k, v in params.items())  # nothing adapted for a provider that takes it
    assert fa.calls == [] and fg.calls == []


@pytest.mark.parametrize("kind,params,fallback,hdr", KINDS, ids=[k[0] for k in KINDS])
def test_drop_params_adapts_for_the_fallback(make_gateway, ups, kind, params, fallback, hdr):
    fo, fa, fg = ups
    fo.sticky = Fault(status=503)
    gw = make_gateway(config(ups, ["claude"], routing={"drop_params": True}))
    r = chat(gw, params)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    assert r.headers["x-helixagent-provider"] == "claude"
    assert r.headers[HDR] == hdr
    up = fa.calls[0]["body"]
    for k in ("frequency_penalty", "n", "logprobs", "top_logprobs", "response_format"):
        assert k not in up
    if kind == "temperature":
        assert up["temperature"] == 1.0
    if kind == "json_object":
        assert adapt.JSON_INSTRUCTION in orjson.dumps(up["system"]).decode()


def test_drop_params_gemini_fallback(make_gateway, ups):
    fo, fa, fg = ups
    fo.sticky = Fault(status=500)
    gw = make_gateway(config(ups, ["gemini"], routing={"drop_params": True}))
    r = chat(gw, {"logprobs": True, "temperature": 1.3})
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "gemini" and r.headers[HDR] == "logprobs"
    gc = fg.calls[0]["body"]["generationConfig"]
    assert gc["temperature"] == 1.3 and "logprobs" not in gc  # Gemini takes 1.3: not clamped


@pytest.mark.parametrize("level", ["provider", "route"])
def test_drop_params_per_provider_and_per_route(make_gateway, ups, level):
    fo, fa, _ = ups
    fo.sticky = Fault(status=503)
    if level == "provider":
        cfg = config(ups, ["claude"], claude={"drop_params": True})
    else:
        cfg = config(ups, ["claude"], routing={"routes": [{"models": ["gpt-4o*"], "drop_params": True}]})
    gw = make_gateway(cfg)
    r = chat(gw, {"temperature": 1.7, "frequency_penalty": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.headers[HDR] == "temperature=1.7->1.0,frequency_penalty,seed"
    # a route that says no wins over the provider that says yes
    cfg = config(ups, ["claude"], claude={"drop_params": True},
                 routing={"routes": [{"models": ["gpt-4o-mini"], "drop_params": False}]})
    gw2 = make_gateway(cfg)
    fa.reset()
    r = chat(gw2, {"temperature": 1.7})
    assert_primary_failure(r, 503, None, ["claude"], "temperature")
    assert fa.calls == []


def test_drop_params_never_adapts_what_changes_the_meaning(make_gateway, ups):
    fo, fa, _ = ups
    fo.sticky = Fault(status=503)
    gw = make_gateway(config(ups, ["claude"], routing={"drop_params": True}))
    r = chat(gw, {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]})
    assert_primary_failure(r, 503, None, ["claude"], "modalities")
    assert fa.calls == []


# -- malformed input: a 400 at once, nothing sent ---------------------------------------------------------
@pytest.mark.parametrize("params", [{"temperature": "hot"}, {"n": "two"}, {"logprobs": "yes"},
                                    {"response_format": {"type": 5}}, {"frequency_penalty": [1]}],
                         ids=["temperature", "n", "logprobs", "response_format", "frequency_penalty"])
def test_malformed_input_is_a_400_at_once(make_gateway, ups, params):
    fo, fa, fg = ups
    fo.sticky = Fault(status=503)
    gw = make_gateway(config(ups, ["claude", "gemini"], routing={"drop_params": True}))
    r = chat(gw, params)
    assert r.status_code == 400, r.text
    assert next(iter(params)) in (r.json()["error"]["param"] or "") + r.json()["error"]["message"]
    assert fo.calls == [] and fa.calls == [] and fg.calls == []


# -- the primary itself cannot serve it ----------------------------------------------------------------------
def test_primary_that_cannot_serve_is_the_clients_400_even_with_a_fallback(make_gateway, ups):
    """The request is wrong for the model the client named: a 400 at once, whatever the primary's health,
    and the fallback (an outage policy) is not used to route around it."""
    fo, fa, fg = ups
    cfg = config(ups, [])
    cfg["providers"][1]["fallback_to"] = ["openai"]
    gw = make_gateway(cfg)
    for down in (False, True):
        if down:
            fa.push(*[AFault(status=529) for _ in range(4)])
        r = chat(gw, {"temperature": 1.3}, model="claude-sonnet-4-5")
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "unsupported_feature" and r.json()["error"]["param"] == "temperature"
        assert fa.calls == [] and fo.calls == []


def test_alias_skips_a_primary_that_cannot_serve_it(make_gateway, ups):
    fo, fa, _ = ups
    cfg = config(ups, [])
    cfg["routing"]["aliases"] = {"smart": [{"provider": "claude", "model": "claude-sonnet-4-5"},
                                           {"provider": "openai", "model": "gpt-4o-mini"}]}
    cfg["providers"][1]["priority"] = 0
    gw = make_gateway(cfg)
    assert chat(gw, {}, model="smart").headers["x-helixagent-provider"] == "claude"
    r = chat(gw, {"temperature": 1.3}, model="smart")
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "openai" and len(fa.calls) == 1


def test_top_k_to_openai_is_skipped_or_dropped(make_gateway, ups):
    fo, fa, _ = ups
    cfg = config(ups, [])
    cfg["providers"][1]["fallback_to"] = ["openai"]
    fa.push(*[AFault(status=529) for _ in range(4)])
    gw = make_gateway(cfg)
    r = chat(gw, {"top_k": 5}, model="claude-sonnet-4-5")
    assert r.status_code == 503, r.text
    assert "openai: " in r.json()["error"]["message"] and fo.calls == []
    cfg["routing"]["drop_params"] = True
    gw2 = make_gateway(cfg)
    fa.push(*[AFault(status=529) for _ in range(4)])
    r = chat(gw2, {"top_k": 5}, model="claude-sonnet-4-5")
    assert r.status_code == 200 and r.headers[HDR] == "top_k" and "top_k" not in fo.calls[0]["body"]


# -- streaming and hedging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hedged", [False, True], ids=["sequential", "hedged"])
def test_streaming(make_gateway, ups, hedged):
    fo, fa, _ = ups
    fo.sticky = Fault(status=503, headers={"retry-after": "5"})
    routing: dict[str, Any] = {"hedging": {"enabled": True, "min_samples": 1}} if hedged else {}
    gw = make_gateway(config(ups, ["claude"], routing=routing))
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "temperature": 1.3}
    r = post(gw, body)
    assert_primary_failure(r, 503, "5", ["claude"], "temperature")
    assert fa.calls == []
    gw2 = make_gateway(config(ups, ["claude"], routing={**routing, "drop_params": True}))
    r = post(gw2, body)
    assert r.status_code == 200, r.text
    assert r.headers[HDR] == "temperature=1.3->1.0" and r.headers["x-helixagent-provider"] == "claude"
    ev = sse_events(r)
    assert ev[-1] == "[DONE]" and any(e["choices"] and e["choices"][0]["delta"].get("content") for e in ev[:-1])
    fo.sticky = None  # the primary up (a fresh gateway: gw2 benched it for its Retry-After)
    r = post(make_gateway(config(ups, ["claude"], routing={**routing, "drop_params": True})), body)
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "openai" and HDR not in r.headers


@pytest.mark.parametrize("kind,params,fallback,hdr", KINDS, ids=[k[0] for k in KINDS])
def test_hedged(make_gateway, ups, kind, params, fallback, hdr):
    fo, fa, fg = ups
    fo.sticky = Fault(status=500)
    gw = make_gateway(config(ups, fallback, routing={"hedging": {"enabled": True, "min_samples": 1}}))
    r = chat(gw, params)
    assert_primary_failure(r, 502, None, fallback, next(iter(params)))
    assert len(fo.calls) == 1 and fa.calls == [] and fg.calls == []


def test_openai_sdk_sees_a_retryable_error(make_gateway, ups):
    """The official SDK retries the primary's 503 (it never retries a 400)."""
    fo, fa, _ = ups
    fo.sticky = Fault(status=503)
    gw = make_gateway(config(ups, ["claude"]))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=1)
    with pytest.raises(openai.InternalServerError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG, temperature=1.3)  # type: ignore[arg-type]
    assert ei.value.status_code == 503
    assert len(fo.calls) == 2 * RETRIES["max_attempts"] and fa.calls == []  # the SDK retried once


# -- embeddings ------------------------------------------------------------------------------------------
def test_embeddings_fallback_to_a_provider_without_embeddings(make_gateway, ups):
    fo, fa, _ = ups
    fo.sticky = Fault(status=503)
    cfg = config(ups, ["claude"])
    cfg["providers"][0]["models"] = ["text-embedding-3-small"]
    gw = make_gateway(cfg)
    r = post(gw, {"model": "text-embedding-3-small", "input": "hi"}, "/v1/embeddings")
    assert r.status_code == 503, r.text
    assert "claude: " in r.json()["error"]["message"] and fa.calls == []


# -- the header helper ----------------------------------------------------------------------------------
def test_header_helper_merges_and_validates():
    h: dict[str, str] = {}
    adapt.add_dropped(h, ["frequency_penalty", "temperature=1.3->1.0"])
    adapt.add_dropped(h, ["context_management", "bad name\r\nx-evil: 1", "frequency_penalty", "é"])
    assert h[HDR] == "frequency_penalty,temperature=1.3->1.0,context_management"
    adapt.add_dropped(h, ["x" * 65])
    assert h[HDR] == "frequency_penalty,temperature=1.3->1.0,context_management"
    g: dict[str, str] = {}
    adapt.add_dropped(g, ["\n"])
    assert g == {}
    adapt.add_dropped(g, [f"p{i}" for i in range(1000)])
    assert len(g[HDR]) <= 1024


# -- the Responses API: built-in tools need an OpenAI upstream, also during fallback --------------------------
def test_responses_builtin_tool_is_not_served_silently_by_a_fallback(make_gateway, ups):
    """OpenAI (which serves web_search natively) is down: Claude must not answer as if the built-in tool
    did not exist; the client gets OpenAI's failure and Claude is named as skipped, never called."""
    fo, fa, fg = ups
    fo.sticky = Fault(status=503, headers={"retry-after": "2"})
    gw = make_gateway(config(ups, ["claude"]))
    body = {"model": "gpt-4o-mini", "input": "what happened today?", "tools": [{"type": "web_search"}]}
    r = post(gw, body, "/v1/responses")
    assert_primary_failure(r, 503, "2", ["claude"], "tools[0].type")
    assert fa.calls == [] and fg.calls == []


def test_responses_function_tools_fall_back(make_gateway, ups):
    fo, fa, fg = ups
    fo.sticky = Fault(status=503, headers={"retry-after": "2"})
    gw = make_gateway(config(ups, ["claude"]))
    body = {"model": "gpt-4o-mini", "input": "hi", "tools": [{"type": "function", "name": "f",
                                                             "parameters": {"type": "object", "properties": {}}}]}
    r = post(gw, body, "/v1/responses")
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "claude" and len(fa.calls) == 1
