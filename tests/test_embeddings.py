"""/v1/embeddings through the official `openai` SDK, against the fake OpenAI upstream and the mock provider."""
from __future__ import annotations

import math

import httpx
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from fakes.openai_upstream import Fault

MOCK = {"name": "mock", "type": "mock", "models": ["mock-embed"]}


def client(gw, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture
def oa_gw(make_gateway, fake_openai):
    return make_gateway({"providers": [fake_openai.provider(models=["text-embedding-3-small"])]})


@pytest.fixture
def mock_gw(make_gateway):
    return make_gateway({"providers": [MOCK]})


def _vec(c, text, **kw):
    return c.embeddings.create(model="mock-embed", input=text, **kw).data[0].embedding


def test_openai_upstream_single_batch_dimensions(oa_gw, fake_openai):
    c = client(oa_gw)
    raw = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello world",
                                                encoding_format="float")
    assert raw.headers["x-helixagent-provider"] == "openai"
    r = CreateEmbeddingResponse.model_validate(raw.parse().model_dump())
    assert len(r.data) == 1 and len(r.data[0].embedding) == 8 and r.usage.prompt_tokens == 2
    assert fake_openai.calls[-1]["body"] == {"model": "text-embedding-3-small", "input": ["hello world"],
                                             "encoding_format": "float"}
    r = c.embeddings.create(model="text-embedding-3-small", input=["a", "bb", "ccc"], dimensions=4)
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(d.embedding) == 4 for d in r.data)
    assert fake_openai.calls[-1]["body"]["dimensions"] == 4
    # the SDK asks for base64 by default; the fake answers floats; the gateway hands the client base64
    assert fake_openai.calls[-1]["body"]["encoding_format"] == "base64"
    assert r.data[1].embedding == pytest.approx([0.02, 0.03, 0.04, 0.05], abs=1e-6)


def test_openai_upstream_token_arrays(oa_gw, fake_openai):
    c = client(oa_gw)
    c.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3])
    assert fake_openai.calls[-1]["body"]["input"] == [[1, 2, 3]]
    r = c.embeddings.create(model="text-embedding-3-small", input=[[1, 2], [3]])
    assert fake_openai.calls[-1]["body"]["input"] == [[1, 2], [3]] and len(r.data) == 2


def test_openai_upstream_errors(oa_gw, fake_openai):
    c = client(oa_gw)
    # sticky: routing retries a bad upstream answer once on the same provider (routing.retries)
    fake_openai.sticky = Fault(status=200, body=b"<html>oops</html>")
    with pytest.raises(openai.InternalServerError) as ei:
        c.embeddings.create(model="text-embedding-3-small", input="x")
    assert ei.value.status_code == 502 and "unexpected embeddings body" in ei.value.message
    fake_openai.sticky = Fault(status=200, body=b'{"object":"list","data":[]}')
    with pytest.raises(openai.InternalServerError):
        c.embeddings.create(model="text-embedding-3-small", input="x")
    fake_openai.sticky = None
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="no-such-embedder", input="x")
    assert fake_openai.api_key not in str(fake_openai.calls[-1]["body"])
    # a Retry-After above routing.retries.max_retry_after_ms is not waited for: the 429 reaches the client
    # (last: later requests for this model are answered from the cooldown without calling the upstream)
    fake_openai.push(Fault(status=429, headers={"retry-after": "30"}))
    with pytest.raises(openai.RateLimitError) as ei:
        c.embeddings.create(model="text-embedding-3-small", input="x")
    assert ei.value.response.headers["retry-after"] == "30"
    calls = len(fake_openai.calls)
    with pytest.raises(openai.RateLimitError) as ei:
        c.embeddings.create(model="text-embedding-3-small", input="x")
    assert 29 <= int(ei.value.response.headers["retry-after"]) <= 30 and len(fake_openai.calls) == calls


def test_mock_deterministic_vectors(mock_gw):
    c = client(mock_gw)
    a1 = _vec(c, "the quick fox", encoding_format="float")
    a2 = _vec(c, "the quick fox", encoding_format="float")
    b = _vec(c, "the quick dog", encoding_format="float")
    assert a1 == a2 and a1 != b and len(a1) == 16
    assert math.isclose(sum(x * x for x in a1), 1.0, rel_tol=1e-6)
    d = _vec(c, "the quick fox", dimensions=48, encoding_format="float")
    assert len(d) == 48 and math.isclose(sum(x * x for x in d), 1.0, rel_tol=1e-6)
    # base64 (the SDK default) decodes to the same vector at float32 precision
    assert _vec(c, "the quick fox") == pytest.approx(a1, abs=1e-6)


def test_mock_batch_matches_singles_and_token_arrays(mock_gw):
    c = client(mock_gw)
    texts = ["alpha", "beta", "gamma"]
    batch = c.embeddings.create(model="mock-embed", input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    for t, d in zip(texts, batch.data, strict=True):
        assert d.embedding == _vec(c, t, encoding_format="float")
    tok = c.embeddings.create(model="mock-embed", input=[[5, 6, 7], [8]], encoding_format="float")
    assert tok.usage.prompt_tokens == 4 and len(tok.data) == 2
    assert tok.data[0].embedding == _vec(c, [5, 6, 7], encoding_format="float")
    assert tok.data[0].embedding != _vec(c, "5 6 7", encoding_format="float")


@pytest.mark.parametrize("body,param", [
    ({"model": "mock-embed"}, "input"),
    ({"model": "mock-embed", "input": ""}, "input"),
    ({"model": "mock-embed", "input": []}, "input"),
    ({"model": "mock-embed", "input": [[]]}, "input"),
    ({"model": "mock-embed", "input": ["a", 1]}, "input"),
    ({"model": "mock-embed", "input": [True, 2]}, "input"),
    ({"model": "mock-embed", "input": [[1, -2]]}, "input"),
    ({"model": "mock-embed", "input": {"text": "a"}}, "input"),
    ({"model": "mock-embed", "input": ["a"] * 2049}, "input"),
    ({"model": "mock-embed", "input": "a", "dimensions": 0}, "dimensions"),
    ({"model": "mock-embed", "input": "a", "dimensions": 10**9}, "dimensions"),
    ({"model": "mock-embed", "input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "mock-embed", "input": "a", "user": 5}, "user"),
    ({"model": 7, "input": "a"}, "model"),
])
def test_bad_input_400(mock_gw, body, param):
    r = httpx.post(mock_gw.url + "/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    # the param names the parameter, or the path inside it (input[1])
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param or err["param"].startswith(param + "["), err


def test_bad_input_sdk_error_class(mock_gw):
    with pytest.raises(openai.BadRequestError):
        client(mock_gw).embeddings.create(model="mock-embed", input="")


def test_embeddings_auth(make_gateway):
    gw = make_gateway({"providers": [MOCK], "auth": {"master_key": "sk-helix-master-0123456789"}})
    with pytest.raises(openai.AuthenticationError):
        client(gw, "wrong").embeddings.create(model="mock-embed", input="x")
    assert len(_vec(client(gw, "sk-helix-master-0123456789"), "x")) == 16
