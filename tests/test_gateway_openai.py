"""The OpenAI-compatible surface over real HTTP, with the official openai SDK as the client."""
import json

import httpx
import openai
import orjson
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fakes.openai_upstream import Fault

MSG = [{"role": "user", "content": "hello there"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look up",
                                            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def client(gw, key="unused"):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def sse_chunks(resp: httpx.Response):
    out, done = [], False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        out.append(json.loads(data))
    return out, done


def test_unknown_fields_pass_through_and_upstream_fields_kept(gateway, fake_openai):
    extra = {"seed": 7, "response_format": {"type": "json_object"}, "logprobs": False, "n": 1,
             "user": "u-1", "parallel_tool_calls": False, "some_future_field": {"x": [1, 2]}}
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG, **extra})
    assert r.status_code == 200
    sent = fake_openai.calls[0]["body"]
    for k, v in extra.items():
        assert sent[k] == v
    assert "provider" not in sent
    body = r.json()
    ChatCompletion.model_validate(body)
    assert body["system_fingerprint"] == "fp_fake" and body["service_tier"] == "default"
    assert body["provider"] == "openai"
    assert r.headers["x-helixagent-provider"] == "openai"


def test_tool_calls_non_stream(gateway, fake_openai):
    resp = client(gateway).chat.completions.create(model="gpt-4o-mini", messages=MSG, tools=TOOLS,
                                                   tool_choice="auto")
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": "hello there"}
    assert resp.choices[0].finish_reason == "tool_calls"
    assert fake_openai.calls[0]["body"]["tools"] == TOOLS


def test_tool_calls_stream_strict(gateway):
    with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                      json={"model": "gpt-4o-mini", "messages": MSG, "tools": TOOLS, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks, done = sse_chunks(r)
    assert done
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    args = "".join(tc["function"].get("arguments") or "" for c in chunks for ch in c["choices"]
                   for tc in ch["delta"].get("tool_calls") or [])
    assert json.loads(args) == {"q": "hello there"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # not asked for


def test_stream_include_usage(gateway):
    chunks = list(client(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=MSG, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2


def test_legacy_completions_native(gateway, fake_openai):
    c = client(gateway)
    resp = c.completions.create(model="gpt-4o-mini", prompt="say something nice")
    Completion.model_validate(resp.model_dump())
    assert resp.choices[0].text == "echo:say echo:something echo:nice"
    assert fake_openai.calls[-1]["path"] == "/v1/completions"
    assert fake_openai.calls[-1]["body"]["prompt"] == "say something nice"
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="gpt-4o-mini", prompt="a b", stream=True)
                   if ch.choices)
    assert text == "echo:a echo:b"


def test_seed_curl_example_with_claude_stand_in(make_gateway, monkeypatch):
    """The seed's example: legacy prompt API, provider claude, streamed."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    gw = make_gateway({"providers": [{"name": "claude", "priority": 1, "models": ["claude-sonnet-4-5"]}]})
    with httpx.stream("POST", gw.url + "/v1/completions",
                      json={"prompt": "Explain quantum computing", "stream": True, "provider": "claude"}) as r:
        assert r.status_code == 200
        chunks, done = sse_chunks(r)
    assert done and chunks
    assert r.headers["x-helixagent-provider"] == "mock"  # a stand-in is labelled mock, pinned by its name
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.startswith("Mock")
    assert all(c["object"] == "text_completion" for c in chunks)
    health = httpx.get(gw.url + "/health").json()
    assert health["mock_fallback"] is True and health["providers"]["claude"]["stand_in_for"] == "anthropic"


def test_models_and_health(gateway):
    models = client(gateway).models.list()
    ids = [m.id for m in models.data]
    assert "gpt-4o-mini" in ids and "openai/gpt-4o-mini" in ids
    assert client(gateway).models.retrieve("gpt-4o").id == "gpt-4o"
    h = httpx.get(gateway.url + "/health").json()
    assert h["status"] == "ok" and "openai" in h["providers"]


def test_pin_by_provider_prefix_and_field(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider("a", priority=1), fake_openai.provider("b", priority=2)]})
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "b/gpt-4o", "messages": MSG})
    assert r.headers["x-helixagent-provider"] == "b" and fake_openai.calls[-1]["body"]["model"] == "gpt-4o"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG, "provider": "b"})
    assert r.headers["x-helixagent-provider"] == "b"
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG})
    assert r.headers["x-helixagent-provider"] == "a"


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[]", 400, None),
    (b"", 400, None),
    (orjson.dumps({"model": "gpt-4o-mini"}), 400, "messages"),
    (orjson.dumps({"model": "gpt-4o-mini", "messages": []}), 400, "messages"),
    (orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
    (orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "temperature": 5}), 400, "temperature"),
    (orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "max_tokens": "ten"}), 400, "max_tokens"),
    (orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": "yes"}), 400, "stream"),
    (orjson.dumps({"model": "no-such-model", "messages": MSG}), 404, "model"),
    (orjson.dumps({"model": "gpt-4o", "messages": MSG, "provider": "nope"}), 404, "provider"),
])
def test_bad_requests_get_openai_errors(gateway, body, status, param):
    r = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # the server keeps serving
    assert httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG}).status_code == 200


def test_body_limit_method_and_path(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider()], "server": {"max_body_bytes": 1000}})
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 2000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = httpx.get(gw.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"]


def test_sdk_exception_classes(gateway, fake_openai):
    c = client(gateway)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user"}])
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="not-a-model", messages=MSG)
    fake_openai.push(Fault(status=429, headers={"retry-after": "7"}, message="Rate limit reached for requests"))
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ei.value.response.headers["retry-after"] == "7"
    assert "openai" in ei.value.message
    # the Retry-After is respected by later requests: answered at once, the upstream is not called
    calls = len(fake_openai.calls)
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert 6 <= int(ei.value.response.headers["retry-after"]) <= 7 and len(fake_openai.calls) == calls
    # (the cooldown is per model: gpt-4o is served meanwhile)
    # sticky: routing retries a 5xx once on the same provider (routing.retries)
    fake_openai.sticky = Fault(status=500)
    with pytest.raises(openai.InternalServerError) as ei:
        c.chat.completions.create(model="gpt-4o", messages=MSG)
    assert ei.value.status_code == 502 and "'openai'" in ei.value.message
    fake_openai.sticky = Fault(status=503)
    with pytest.raises(openai.InternalServerError) as ei:
        c.chat.completions.create(model="gpt-4o", messages=MSG)
    assert ei.value.status_code == 503
    fake_openai.sticky = None
    fake_openai.push(Fault(status=400, message="Invalid value for 'logit_bias'."))
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="gpt-4o", messages=MSG)
    assert "logit_bias" in ei.value.message


def test_upstream_key_never_leaks(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(api_key="sk-wrong-secret-key-999999")]})
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG})
    assert r.status_code == 502
    assert "sk-wrong-secret-key-999999" not in r.text and "999999" not in r.text
    assert "credentials" in r.json()["error"]["message"]


def test_timeout_and_reset(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(timeout_ms=400, max_retries=0)]})
    fake_openai.push(Fault(delay=3))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG}, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    fake_openai.push(Fault(reset=True))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG}, timeout=10)
    assert r.status_code == 502 and "openai" in r.json()["error"]["message"]


def test_stream_cut_midway_gives_error_event(gateway, fake_openai):
    fake_openai.push(Fault(cut_after=3, chunk_delay=0.05))
    with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c d e"}], "stream": True},
                      timeout=10) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] != "data: [DONE]"
    assert "error" in json.loads(lines[-1][6:])
    fake_openai.push(Fault(cut_after=3, chunk_delay=0.05))
    with pytest.raises(openai.APIError):
        list(client(gateway).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c d e"}], stream=True))


def test_request_id_honoured(gateway):
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG},
                   headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG})
    assert len(r.headers["x-request-id"]) >= 16


def test_master_key(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider()], "auth": {"master_key": "hx-master-key-0123456789"}})
    with pytest.raises(openai.AuthenticationError):
        client(gw, "wrong").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSG})
    assert r.status_code == 401
    ok = client(gw, "hx-master-key-0123456789").chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert ok.choices[0].message.content


def test_http_pool_limits_concurrent_upstream_connections(make_gateway, fake_openai):
    """http.max_conns_per_host bounds concurrent upstream requests; the rest wait for a slot."""
    import concurrent.futures
    gw = make_gateway({"providers": [fake_openai.provider()], "http": {"max_conns_per_host": 2, "max_idle_conns": 4}})
    fake_openai.sticky = Fault(delay=0.2)
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        codes = list(ex.map(lambda _: httpx.post(gw.url + "/v1/chat/completions", timeout=20,
                                                 json={"model": "gpt-4o-mini", "messages": MSG}).status_code, range(6)))
    assert codes == [200] * 6
    assert fake_openai.max_inflight == 2
