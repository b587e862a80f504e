"""Embedding coalescing (routing/coalesce.py) over real HTTP against the fake OpenAI upstream: concurrent requests
become a handful of upstream calls, and each caller gets exactly its own vectors, usage and record."""
from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from fakes.openai_upstream import Fault

from helixagent.routing.coalesce import split_tokens

client = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
N = 50


def gateway(make_gateway: Any, fake: Any, window_ms: float = 100, **provider: Any) -> Any:
    return make_gateway({"routing": {"embedding_coalesce": {"enabled": True, "window_ms": window_ms}},
                         "providers": [fake.provider(models=["text-embedding-3-small"], **provider)]})


def embed_calls(fake: Any) -> list[dict[str, Any]]:
    return [c for c in fake.calls if c["path"] == "/v1/embeddings"]


def fire(gw: Any, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    start = threading.Barrier(len(bodies))

    def one(body: dict[str, Any]) -> httpx.Response:
        start.wait()
        return client.post(gw.url + "/v1/embeddings", json={"model": "text-embedding-3-small", **body})

    with ThreadPoolExecutor(len(bodies)) as ex:
        return list(ex.map(one, bodies))


def fake_vector(x: Any, dims: int = 8) -> list[float]:
    """What the fake upstream answers for one input (tests/fakes/openai_upstream.py)."""
    return [round((len(str(x)) + j) / 100, 4) for j in range(dims)]


def token_inputs(r: int) -> list[list[int]]:
    # 1-3 token arrays per request, every one of a different length in the whole test (so a vector tells
    # which input it belongs to)
    return [list(range(1 + 3 * r + i)) for i in range(1 + r % 3)]


def records(db: str, n: int) -> dict[str, tuple[int, int, str]]:
    deadline = time.time() + 10
    rows: list[Any] = []
    while time.time() < deadline:
        with sqlite3.connect(db) as con:
            rows = con.execute("select request_id, status, prompt_tokens, provider from completions "
                               "where endpoint = 'embeddings'").fetchall()
        if len(rows) >= n:
            break
        time.sleep(0.1)
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def test_fifty_concurrent_requests_are_a_handful_of_calls_each_with_its_own_answer(make_gateway, fake_openai,
                                                                                   tmp_path):
    gw = gateway(make_gateway, fake_openai)
    inputs = [token_inputs(r) for r in range(N)]
    res = fire(gw, [{"input": x} for x in inputs])
    assert [r.status_code for r in res] == [200] * N, [r.text for r in res if r.status_code != 200][:2]
    calls = embed_calls(fake_openai)
    assert len(calls) <= 8, len(calls)  # a handful, not 50
    assert sum(len(c["body"]["input"]) for c in calls) == sum(len(x) for x in inputs)  # every input sent once
    for x, r in zip(inputs, res, strict=True):
        body = r.json()
        assert [d["index"] for d in body["data"]] == list(range(len(x)))
        assert [d["embedding"] for d in body["data"]] == [fake_vector(t) for t in x]
        want = sum(len(t) for t in x)  # the fake counts a token array's length: the split is exact
        assert body["usage"] == {"prompt_tokens": want, "total_tokens": want}
        assert body["model"] == "text-embedding-3-small" and body["object"] == "list"
    assert sum(int(r.headers["x-helixagent-coalesced"]) > 1 for r in res) >= N - 8
    recs = records(str(tmp_path / "helix-0.db"), N)
    assert len(recs) == N
    for x, r in zip(inputs, res, strict=True):
        assert recs[r.headers["x-helixagent-request-id"]] == (200, sum(len(t) for t in x), "openai")


def test_text_inputs_split_the_usage_and_keep_the_total(make_gateway, fake_openai):
    gw = gateway(make_gateway, fake_openai)
    texts = [[("w" * (r + 1) + " ") * (1 + r % 4)] for r in range(20)]
    res = fire(gw, [{"input": t if i % 2 else t[0]} for i, t in enumerate(texts)])  # a string or a list of one
    assert all(r.status_code == 200 for r in res)
    calls = embed_calls(fake_openai)
    assert len(calls) < 20
    upstream_total = sum(sum(len(str(x).split()) for x in c["body"]["input"]) for c in calls)
    assert sum(r.json()["usage"]["prompt_tokens"] for r in res) == upstream_total
    for t, r in zip(texts, res, strict=True):
        assert r.json()["data"][0]["embedding"] == fake_vector(t[0])


def test_different_parameters_are_never_combined(make_gateway, fake_openai):
    gw = gateway(make_gateway, fake_openai)
    res = fire(gw, [{"input": [f"text {i}"], "dimensions": 4 if i % 2 else 6} for i in range(12)])
    assert all(r.status_code == 200 for r in res)
    for i, r in enumerate(res):
        assert len(r.json()["data"][0]["embedding"]) == (4 if i % 2 else 6)
    dims = {c["body"].get("dimensions") for c in embed_calls(fake_openai)}
    assert dims == {4, 6} and len(embed_calls(fake_openai)) < 12


def test_a_failed_combined_call_fails_every_member_alike(make_gateway, fake_openai):
    gw = gateway(make_gateway, fake_openai, max_retries=0)
    fake_openai.sticky = Fault(status=500, message="upstream exploded")
    res = fire(gw, [{"input": [f"t{i}"]} for i in range(20)])
    assert {r.status_code for r in res} == {502}
    assert {r.json()["error"]["code"] for r in res} == {"upstream_error"}
    assert len(embed_calls(fake_openai)) < 20  # not retried one by one


def test_a_combined_call_refused_as_a_bad_request_is_retried_one_by_one(make_gateway, fake_openai):
    gw = gateway(make_gateway, fake_openai)
    fake_openai.push(Fault(status=400, message="one input is too long"))
    res = fire(gw, [{"input": [f"t{i}"]} for i in range(10)])
    assert [r.status_code for r in res] == [200] * 10  # the fault was the combined call's only
    calls = embed_calls(fake_openai)
    assert len(calls[0]["body"]["input"]) > 1
    assert any(len(c["body"]["input"]) == 1 for c in calls[1:])


def test_off_by_default(make_gateway, fake_openai):
    gw = make_gateway({"providers": [fake_openai.provider(models=["text-embedding-3-small"])]})
    res = fire(gw, [{"input": [f"t{i}"]} for i in range(8)])
    assert all(r.status_code == 200 and "x-helixagent-coalesced" not in r.headers for r in res)
    assert len(embed_calls(fake_openai)) == 8


def test_a_full_batch_leaves_at_once_and_a_lone_request_alone(make_gateway, fake_openai):
    gw = make_gateway({"routing": {"embedding_coalesce": {"enabled": True, "window_ms": 1000, "max_inputs": 4}},
                       "providers": [fake_openai.provider(models=["text-embedding-3-small"])]})
    res = fire(gw, [{"input": [f"a{i}", f"b{i}"]} for i in range(2)])  # 4 inputs: full, sent before the window
    assert all(r.status_code == 200 for r in res)
    assert len(embed_calls(fake_openai)) == 1 and res[0].headers["x-helixagent-coalesced"] == "2"
    r = client.post(gw.url + "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "alone"})
    assert r.status_code == 200 and "x-helixagent-coalesced" not in r.headers


@pytest.mark.parametrize("total,weights,want", [(10, [1, 1], [5, 5]), (7, [1, 2, 4], [1, 2, 4]),
                                                (10, [1, 1, 1], [4, 3, 3]), (0, [3, 4], [0, 0]), (5, [0, 0], [0, 0])])
def test_split_tokens(total, weights, want):
    got = split_tokens(total, weights)
    assert got == want and (sum(got) == total or not sum(weights))


def test_a_combined_call_takes_one_queue_slot(make_gateway, fake_openai):
    gw = gateway(make_gateway, fake_openai, max_concurrency=1)
    res = fire(gw, [{"input": [f"t{i}"]} for i in range(20)])
    assert all(r.status_code == 200 for r in res)
    q = gw.app.router.queues.get("openai")
    assert q is not None and q.active == 0 and q.served == len(embed_calls(fake_openai)) < 20
