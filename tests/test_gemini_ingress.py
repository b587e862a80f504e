"""The Gemini API ingress (/v1beta/models/{model}:generateContent and siblings, and the same under /v1/)
driven by the official google-genai SDK and by raw HTTP, against a Gemini, an OpenAI and an Anthropic fake
upstream; answers validated with the SDK's own types (google.genai.types)."""
from __future__ import annotations

from typing import Any, Iterator

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from fakes.anthropic_upstream import FakeAnthropic, Fault
from fakes.gemini_upstream import FakeGemini
from fakes.openai_upstream import FakeOpenAI
from support.keys import MASTER, admin_create

# model name in the URL -> (provider name, the fake that serves it)
UPSTREAMS = {"gemini-2.5-flash": "gemini", "gpt-4o-mini": "openai", "claude/claude-sonnet-4-5": "claude"}
WEATHER = types.FunctionDeclaration(
    name="get_weather", description="Weather for a city",
    parameters=types.Schema(type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)},
                            required=["city"]))


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    f = {"gemini": FakeGemini(), "openai": FakeOpenAI(), "claude": FakeAnthropic()}
    yield f
    for x in f.values():
        x.close()


@pytest.fixture
def up(fakes: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for x in fakes.values():
        x.reset()
    yield fakes


@pytest.fixture
def gw(make_gateway: Any, up: dict[str, Any]) -> Any:
    return make_gateway({"auth": {"master_key": MASTER},
                         "providers": [up["gemini"].provider(max_retries=0), up["openai"].provider(max_retries=0),
                                       up["claude"].provider(max_retries=0)],
                         "routing": {"retries": {"max_attempts": 1}}})


@pytest.fixture
def key(gw: Any) -> str:
    return str(admin_create(gw)["key"])


def client(gw: Any, key: str) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=gw.url, timeout=20_000))


def last_call(up: dict[str, Any], name: str) -> dict[str, Any]:
    calls = up[name].calls
    assert calls, f"the {name} fake was not called"
    return dict(calls[-1])


def google_error(r: httpx.Response, code: int, status: str) -> dict[str, Any]:
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["status"] == status and isinstance(err["message"], str)
    assert isinstance(err["details"], list) and err["details"][0]["@type"].endswith("ErrorInfo")
    return dict(err)


def field_of(err: dict[str, Any]) -> str:
    for d in err["details"]:
        if d["@type"].endswith("BadRequest"):
            return str(d["fieldViolations"][0]["field"])
    raise AssertionError(f"no field violation in {err}")


# -- the SDK, every upstream ------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(UPSTREAMS))
def test_generate_content(gw: Any, key: str, up: dict[str, Any], model: str) -> None:
    c = client(gw, key)
    r = c.models.generate_content(
        model=model, contents="hello there world",
        config=types.GenerateContentConfig(system_instruction="be brief", temperature=0.5, max_output_tokens=50,
                                           stop_sequences=["END"]))
    assert isinstance(r, types.GenerateContentResponse)
    assert r.text == "echo:hello echo:there echo:world"
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
    u = r.usage_metadata
    assert u is not None and u.prompt_token_count and u.candidates_token_count == 3
    assert u.total_token_count == u.prompt_token_count + u.candidates_token_count
    assert r.response_id and r.model_version
    assert r.sdk_http_response is not None and r.sdk_http_response.headers is not None
    assert r.sdk_http_response.headers["x-helixagent-provider"] == UPSTREAMS[model]
    body = last_call(up, UPSTREAMS[model])["body"]
    if UPSTREAMS[model] == "gemini":
        assert body["systemInstruction"] == {"parts": [{"text": "be brief"}]}
        assert body["generationConfig"]["temperature"] == 0.5 and body["generationConfig"]["stopSequences"] == ["END"]
    elif UPSTREAMS[model] == "openai":
        assert body["messages"][0] == {"role": "system", "content": "be brief"} and body["temperature"] == 0.5
        assert body["max_tokens"] == 50 and body["stop"] == ["END"]
    else:
        assert body["system"] == "be brief" and body["max_tokens"] == 50 and body["stop_sequences"] == ["END"]


@pytest.mark.parametrize("model", list(UPSTREAMS))
def test_generate_content_stream(gw: Any, key: str, up: dict[str, Any], model: str) -> None:
    c = client(gw, key)
    chunks = list(c.models.generate_content_stream(model=model, contents="one two three four"))
    assert len(chunks) >= 2 and all(isinstance(c, types.GenerateContentResponse) for c in chunks)
    assert "".join(c.text or "" for c in chunks) == "echo:one echo:two echo:three echo:four"
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None and last.usage_metadata.candidates_token_count == 4
    assert len({c.response_id for c in chunks}) == 1
    assert last_call(up, UPSTREAMS[model])["body"]  # the upstream served it


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gpt-4o-mini"])
def test_count_tokens_is_local(gw: Any, key: str, up: dict[str, Any], model: str) -> None:
    c = client(gw, key)
    short = c.models.count_tokens(model=model, contents="hi")
    long = c.models.count_tokens(model=model, contents="a much longer prompt " * 20)
    assert isinstance(short, types.CountTokensResponse)
    assert short.total_tokens and long.total_tokens and long.total_tokens > short.total_tokens * 5
    assert not up["gemini"].calls and not up["openai"].calls


@pytest.mark.parametrize("model,name", [("text-embedding-004", "gemini"), ("openai/text-embedding-3-small", "openai")])
def test_embed_content(make_gateway: Any, up: dict[str, Any], model: str, name: str) -> None:
    oa = up["openai"].provider(models=["gpt-4o-mini", "text-embedding-3-small"])
    gw = make_gateway({"auth": {"master_key": MASTER}, "providers": [up["gemini"].provider(), oa]})
    c = client(gw, MASTER)
    one = c.models.embed_content(model=model, contents="hello world",
                                 config=types.EmbedContentConfig(output_dimensionality=6))
    assert isinstance(one, types.EmbedContentResponse) and one.embeddings and len(one.embeddings) == 1
    assert one.embeddings[0].values and len(one.embeddings[0].values) == 6
    many = c.models.embed_content(model=model, contents=["first text", "second, longer text"],
                                  config=types.EmbedContentConfig(output_dimensionality=6))
    assert many.embeddings and len(many.embeddings) == 2
    assert many.embeddings[0].values != many.embeddings[1].values
    assert up[name].calls


@pytest.mark.parametrize("model", list(UPSTREAMS))
def test_function_calling_round_trip(gw: Any, key: str, up: dict[str, Any], model: str) -> None:
    c = client(gw, key)
    tools = [types.Tool(function_declarations=[WEATHER])]
    no_afc = types.AutomaticFunctionCallingConfig(disable=True)
    question = types.Content(role="user", parts=[types.Part(text="weather in Paris")])
    r = c.models.generate_content(model=model, contents=[question], config=types.GenerateContentConfig(
        tools=tools, automatic_function_calling=no_afc,
        tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
            mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=["get_weather"]))))
    assert r.function_calls and r.function_calls[0].name == "get_weather"
    assert r.function_calls[0].args == {"q": "weather in Paris"}
    assert r.candidates and r.candidates[0].content is not None
    call_turn = r.candidates[0].content
    answer = types.Part.from_function_response(name="get_weather", response={"output": "sunny, 21C"})
    if r.function_calls[0].id:
        assert answer.function_response is not None
        answer.function_response.id = r.function_calls[0].id
    r2 = c.models.generate_content(
        model=model, contents=[question, call_turn, types.Content(role="user", parts=[answer])],
        config=types.GenerateContentConfig(tools=tools, automatic_function_calling=no_afc,
                                           tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
                                               mode=types.FunctionCallingConfigMode.NONE))))
    assert r2.text and not r2.function_calls
    body = last_call(up, UPSTREAMS[model])["body"]
    if UPSTREAMS[model] == "openai":
        call_msg, tool_msg = body["messages"][-2:]
        assert call_msg["tool_calls"][0]["function"]["name"] == "get_weather"
        assert tool_msg == {"role": "tool", "tool_call_id": call_msg["tool_calls"][0]["id"], "content": "sunny, 21C"}
        assert body["tool_choice"] == "none"
    elif UPSTREAMS[model] == "claude":
        use = body["messages"][-2]["content"][-1]
        result = body["messages"][-1]["content"][0]
        assert use["type"] == "tool_use" and result["type"] == "tool_result" and result["tool_use_id"] == use["id"]
    else:
        fr = body["contents"][-1]["parts"][0]["functionResponse"]
        assert fr["name"] == "get_weather" and "sunny, 21C" in str(fr["response"])
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


def test_thought_signature_round_trips_to_gemini(gw: Any, key: str, up: dict[str, Any]) -> None:
    up["gemini"].signature = "c2lnbmF0dXJl"
    c = client(gw, key)
    cfg = types.GenerateContentConfig(tools=[types.Tool(function_declarations=[WEATHER])],
                                      automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    r = c.models.generate_content(model="gemini-2.5-flash", contents="weather in Rome", config=cfg)
    assert r.candidates and r.candidates[0].content and r.candidates[0].content.parts
    part = r.candidates[0].content.parts[0]
    assert part.function_call is not None and part.thought_signature == b"signature"
    assert part.function_call.id and "~" not in part.function_call.id
    answer = types.Part.from_function_response(name="get_weather", response={"output": "rain"})
    c.models.generate_content(model="gemini-2.5-flash", config=cfg, contents=[
        types.Content(role="user", parts=[types.Part(text="weather in Rome")]), r.candidates[0].content,
        types.Content(role="user", parts=[answer])])
    sent = last_call(up, "gemini")["body"]["contents"][1]["parts"][0]
    assert sent["thoughtSignature"] == "c2lnbmF0dXJl" and sent["functionCall"]["name"] == "get_weather"


@pytest.mark.parametrize("model", list(UPSTREAMS))
def test_json_schema_output(gw: Any, key: str, up: dict[str, Any], model: str) -> None:
    schema = types.Schema(type=types.Type.OBJECT, properties={
        "city": types.Schema(type=types.Type.STRING), "rain": types.Schema(type=types.Type.BOOLEAN, nullable=True)},
        required=["city"])
    c = client(gw, key)
    r = c.models.generate_content(model=model, contents="json please", config=types.GenerateContentConfig(
        response_mime_type="application/json", response_schema=schema))
    assert isinstance(r, types.GenerateContentResponse) and r.text
    body = last_call(up, UPSTREAMS[model])["body"]
    want_props = {"city": {"type": "string"}, "rain": {"type": ["boolean", "null"]}}
    if UPSTREAMS[model] == "openai":
        js = body["response_format"]["json_schema"]["schema"]
        assert body["response_format"]["type"] == "json_schema" and js["properties"] == want_props
        assert js["type"] == "object" and js["required"] == ["city"]
    elif UPSTREAMS[model] == "claude":
        fmt = body["output_config"]["format"]
        assert fmt["type"] == "json_schema" and fmt["schema"]["properties"] == want_props
    else:
        gc = body["generationConfig"]
        assert gc["responseMimeType"] == "application/json"
        assert gc["responseSchema"]["properties"]["rain"] == {"type": "boolean", "nullable": True}


def test_response_json_schema_passes_as_json_schema(gw: Any, key: str, up: dict[str, Any]) -> None:
    js = {"type": "object", "properties": {"n": {"type": "integer"}}, "additionalProperties": False}
    c = client(gw, key)
    c.models.generate_content(model="gpt-4o-mini", contents="json", config=types.GenerateContentConfig(
        response_mime_type="application/json", response_json_schema=js))
    assert last_call(up, "openai")["body"]["response_format"]["json_schema"]["schema"] == js


def test_sdk_errors_are_google_shaped(gw: Any, key: str) -> None:
    c = client(gw, key)
    with pytest.raises(genai_errors.ClientError) as ei:
        c.models.generate_content(model="no-such-model-anywhere", contents="hi")
    assert ei.value.code == 404 and ei.value.status == "NOT_FOUND"
    bad = client(gw, "hx-" + "Z" * 43)
    with pytest.raises(genai_errors.ClientError) as ei:
        bad.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert ei.value.code == 401 and ei.value.status == "UNAUTHENTICATED"


# -- raw HTTP ---------------------------------------------------------------------------------------

def post(gw: Any, path: str, body: Any, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(gw.url + path, content=content, headers={"content-type": "application/json", **(headers or {})},
                      timeout=20, **kw)


HELLO = {"contents": [{"role": "user", "parts": [{"text": "hi there"}]}]}


@pytest.mark.parametrize("prefix", ["/v1beta", "/v1"])
def test_key_in_header_or_query(gw: Any, key: str, prefix: str) -> None:
    path = f"{prefix}/models/gemini-2.5-flash:generateContent"
    for r in (post(gw, path, HELLO, {"x-goog-api-key": key}), post(gw, path, HELLO, params={"key": key}),
              post(gw, path, HELLO, {"x-goog-api-key": MASTER})):
        assert r.status_code == 200, r.text
        types.GenerateContentResponse.model_validate(r.json())
        assert r.json()["candidates"][0]["content"]["parts"] == [{"text": "echo:hi echo:there"}]
    err = google_error(post(gw, path, HELLO), 401, "UNAUTHENTICATED")
    assert err["details"][0]["reason"] == "MISSING_API_KEY"
    google_error(post(gw, path, HELLO, {"x-goog-api-key": "wrong"}), 401, "UNAUTHENTICATED")
    google_error(post(gw, path, HELLO, params={"key": "hx-" + "Q" * 43}), 401, "UNAUTHENTICATED")


def test_readonly_key_is_403(gw: Any) -> None:
    ro = admin_create(gw, role="readonly")["key"]
    r = post(gw, "/v1beta/models/gemini-2.5-flash:generateContent", HELLO, {"x-goog-api-key": ro})
    google_error(r, 403, "PERMISSION_DENIED")
    listed = httpx.get(gw.url + "/v1beta/models", headers={"x-goog-api-key": ro}, timeout=20)
    assert listed.status_code == 200 and listed.json()["models"]
    c = client(gw, ro)
    assert list(c.models.list())


@pytest.mark.parametrize("body,field", [
    ({}, "contents"),
    ({"contents": []}, "contents"),
    ({"contents": [{"role": "user", "parts": [{"text": 5}]}]}, "contents[0].parts[0].text"),
    ({"contents": [{"role": "robot", "parts": [{"text": "x"}]}]}, "contents[0].role"),
    ({**HELLO, "generationConfig": {"temperature": "hot"}}, "generationConfig.temperature"),
    ({**HELLO, "generationConfig": {"maxOutputTokens": 0}}, "generationConfig.maxOutputTokens"),
    ({**HELLO, "generationConfig": {"stopSequences": ["a", "b", "c", "d", "e", "f"]}}, "generationConfig.stopSequences"),
    ({**HELLO, "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}}}, "toolConfig.functionCallingConfig.mode"),
    ({**HELLO, "tools": [{"functionDeclarations": [{"description": "no name"}]}]}, "tools[0].functionDeclarations[0].name"),
    ({**HELLO, "bogusField": 1}, "bogusField"),
    ({"contents": [{"role": "user", "parts": [{"text": "a", "inlineData": {"mimeType": "image/png", "data": "AA"}}]}]},
     "contents[0].parts[0]"),
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     "contents[0].parts[0].functionResponse"),
])
def test_malformed_bodies_are_400_naming_the_field(gw: Any, key: str, up: dict[str, Any], body: Any, field: str) -> None:
    r = post(gw, "/v1beta/models/gpt-4o-mini:generateContent", body, {"x-goog-api-key": key})
    err = google_error(r, 400, "INVALID_ARGUMENT")
    assert field_of(err) == field, err
    assert field in err["message"]
    assert not up["openai"].calls


def test_not_json_is_400(gw: Any, key: str) -> None:
    for raw in (b"{nope", b"[1]", b""):
        google_error(post(gw, "/v1beta/models/gpt-4o-mini:generateContent", raw, {"x-goog-api-key": key}),
                     400, "INVALID_ARGUMENT")


def test_unknown_method_and_model_are_google_404(gw: Any, key: str) -> None:
    h = {"x-goog-api-key": key}
    google_error(post(gw, "/v1beta/models/gpt-4o-mini:explode", HELLO, h), 404, "NOT_FOUND")
    r = httpx.get(gw.url + "/v1beta/models/nope-model", headers=h, timeout=20)
    google_error(r, 404, "NOT_FOUND")


def sse_frames(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in r.text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        out.append(orjson.loads(block[6:]))
    return out


@pytest.mark.parametrize("model", list(UPSTREAMS))
def test_streaming_sse_frames(gw: Any, key: str, model: str) -> None:
    r = post(gw, f"/v1beta/models/{model}:streamGenerateContent", HELLO, {"x-goog-api-key": key}, params={"alt": "sse"})
    assert r.status_code == 200, r.text
    frames = sse_frames(r)
    for f in frames:
        types.GenerateContentResponse.model_validate(f)
    assert "".join(p.get("text", "") for f in frames for c in f["candidates"] for p in c["content"]["parts"]) \
        == "echo:hi echo:there"
    assert [f["candidates"][0].get("finishReason") for f in frames][-1] == "STOP"
    assert all("finishReason" not in f["candidates"][0] for f in frames[:-1])
    assert frames[-1]["usageMetadata"]["candidatesTokenCount"] == 2


def test_streaming_without_alt_is_a_json_array(gw: Any, key: str) -> None:
    r = post(gw, "/v1beta/models/gpt-4o-mini:streamGenerateContent", HELLO, {"x-goog-api-key": key})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.headers
    arr = r.json()
    assert isinstance(arr, list) and len(arr) >= 2
    for f in arr:
        types.GenerateContentResponse.model_validate(f)
    assert arr[-1]["candidates"][0]["finishReason"] == "STOP"


def test_streamed_function_call_comes_whole(gw: Any, key: str) -> None:
    body = {**HELLO, "tools": [{"functionDeclarations": [{"name": "lookup", "parameters": {
        "type": "OBJECT", "properties": {"q": {"type": "STRING"}}}}]}]}
    r = post(gw, "/v1/models/gpt-4o-mini:streamGenerateContent", body, {"x-goog-api-key": key}, params={"alt": "sse"})
    frames = sse_frames(r)
    calls = [p["functionCall"] for f in frames for c in f["candidates"] for p in c.get("content", {}).get("parts", [])
             if "functionCall" in p]
    assert len(calls) == 1 and calls[0]["name"] == "lookup" and calls[0]["args"] == {"q": "hi there"}


def test_upstream_failure_is_google_shaped(gw: Any, key: str, up: dict[str, Any]) -> None:
    up["gemini"].push(Fault(status=429))
    err = google_error(post(gw, "/v1beta/models/gemini-2.5-flash:generateContent", HELLO, {"x-goog-api-key": key}),
                       429, "RESOURCE_EXHAUSTED")
    assert any(d["@type"].endswith("RetryInfo") for d in err["details"])


def test_gemini_only_fields(gw: Any, key: str, up: dict[str, Any]) -> None:
    h = {"x-goog-api-key": key}
    safety = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    extra = {"safetySettings": safety, "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}, "topK": 3}}
    r = post(gw, "/v1beta/models/gemini-2.5-flash:generateContent", {**HELLO, **extra}, h)
    assert r.status_code == 200, r.text
    sent = last_call(up, "gemini")["body"]
    assert sent["safetySettings"] == safety and sent["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    assert sent["generationConfig"]["topK"] == 3 and "x-helixagent-dropped-params" not in r.headers
    r = post(gw, "/v1beta/models/gpt-4o-mini:generateContent", {**HELLO, **extra}, h)
    assert r.status_code == 200, r.text
    assert set(r.headers["x-helixagent-dropped-params"].split(", ")) == {
        "safetySettings", "generationConfig.thinkingConfig", "generationConfig.topK"}
    sent = last_call(up, "openai")["body"]
    assert not {"safetySettings", "generationConfig", "top_k"} & set(sent)
    r = post(gw, "/v1beta/models/gpt-4o-mini:generateContent", {**HELLO, "cachedContent": "cachedContents/abc"}, h)
    assert field_of(google_error(r, 400, "INVALID_ARGUMENT")) == "cachedContent"
    r = post(gw, "/v1beta/models/claude/claude-sonnet-4-5:generateContent", {**HELLO, "tools": [{"googleSearch": {}}]}, h)
    assert field_of(google_error(r, 400, "INVALID_ARGUMENT")) == "tools[0].googleSearch"
    r = post(gw, "/v1beta/models/gemini-2.5-flash:generateContent", {**HELLO, "cachedContent": "cachedContents/abc"}, h)
    assert r.status_code == 200 and last_call(up, "gemini")["body"]["cachedContent"] == "cachedContents/abc"


def test_models_shared_with_the_openai_api(gw: Any, key: str) -> None:
    g = httpx.get(gw.url + "/v1/models", headers={"x-goog-api-key": key}, timeout=20)
    assert g.status_code == 200
    models = g.json()["models"]
    assert "models/claude/claude-sonnet-4-5" in {m["name"] for m in models}
    assert all(m["supportedGenerationMethods"] for m in models)
    o = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=20)
    assert o.status_code == 200 and o.json()["object"] == "list"
    one = httpx.get(gw.url + "/v1/models/gemini-2.5-flash", params={"key": key}, timeout=20)
    assert one.json()["name"] == "models/gemini-2.5-flash"
    c = client(gw, key)
    got = c.models.get(model="gemini-2.5-flash")
    assert isinstance(got, types.Model) and got.supported_actions and "generateContent" in got.supported_actions
    assert httpx.get(gw.url + "/v1/models/gemini-2.5-flash", headers={"authorization": f"Bearer {key}"},
                     timeout=20).json()["object"] == "model"
    page = httpx.get(gw.url + "/v1beta/models", params={"pageSize": 2}, headers={"x-goog-api-key": key}, timeout=20)
    assert len(page.json()["models"]) == 2 and page.json()["nextPageToken"]
    sdk = list(c.models.list(config={"page_size": 3}))
    assert len(sdk) == len(models)


def test_limits_apply_to_the_gemini_format(gw: Any) -> None:
    k = admin_create(gw, limits={"requests_per_minute": 1})["key"]
    path = "/v1beta/models/gpt-4o-mini:generateContent"
    assert post(gw, path, HELLO, {"x-goog-api-key": k}).status_code == 200
    google_error(post(gw, path, HELLO, {"x-goog-api-key": k}), 429, "RESOURCE_EXHAUSTED")


# -- fallback: a Gemini-only field is never served silently by a provider of another kind -------------------
def _fallback_gw(make_gateway: Any, up: dict[str, Any]) -> Any:
    return make_gateway({"auth": {"master_key": MASTER},
                         "providers": [up["gemini"].provider(max_retries=0, fallback_to=["openai"]),
                                       up["openai"].provider(max_retries=0, priority=2,
                                                             models=["gpt-4o-mini", "gemini-2.0-flash"])],
                         "routing": {"retries": {"max_attempts": 1}}})


def test_fallback_refuses_a_gemini_only_field(make_gateway: Any, up: dict[str, Any]) -> None:
    """Gemini is down; the request uses cachedContent, which only Gemini serves: OpenAI is skipped (never
    called) and the client gets Gemini's failure, not an answer that ignored the cached content."""
    gw = _fallback_gw(make_gateway, up)
    for _ in range(3):
        up["gemini"].push(Fault(status=503))
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "cachedContent": "cachedContents/abc"}
    r = httpx.post(f"{gw.url}/v1beta/models/gemini-2.0-flash:generateContent", json=body,
                   headers={"x-goog-api-key": MASTER}, timeout=20)
    assert r.status_code == 503, r.text
    assert "cachedContent" in r.json()["error"]["message"], r.text
    assert up["openai"].calls == []


def test_fallback_gets_no_gemini_only_hint(make_gateway: Any, up: dict[str, Any]) -> None:
    """Gemini is down; safetySettings (a hint) must not reach the OpenAI fallback, which serves the request."""
    gw = _fallback_gw(make_gateway, up)
    for _ in range(3):
        up["gemini"].push(Fault(status=503))
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]}
    r = httpx.post(f"{gw.url}/v1beta/models/gemini-2.0-flash:generateContent", json=body,
                   headers={"x-goog-api-key": MASTER}, timeout=20)
    assert r.status_code == 200, r.text
    sent = up["openai"].calls[-1]["body"]
    assert "safetySettings" not in sent and "generationConfig" not in sent, sent
