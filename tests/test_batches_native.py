"""Native mode: batches whose every line routes to one OpenAI (or Anthropic) provider go to the vendor's
batch API (fakes in tests/support/vendor_batches.py, written to the documented formats) and are mapped back:
the official SDKs see the same shapes as in local mode, each line has one result and one record at the
batch discount; ``auto`` runs locally what cannot go native, ``native`` refuses it naming the line."""
from __future__ import annotations

import base64
from typing import Any, Iterator

import anthropic
import openai
import orjson
import pytest
import sqlalchemy as sa

from support.keys import MASTER
from support.servers import wait_until
from support.vendor_batches import FakeVendorBatches

K1 = "k20200101:" + base64.b64encode(b"6" * 32).decode()
MOCK = {"name": "mock", "type": "mock", "models": ["mock-1"], "mock_tokens": 4}


@pytest.fixture(scope="module")
def vendor_session() -> Iterator[FakeVendorBatches]:
    v = FakeVendorBatches()
    yield v
    v.close()


@pytest.fixture
def vendor(vendor_session: FakeVendorBatches) -> Iterator[FakeVendorBatches]:
    vendor_session.reset()
    yield vendor_session


def cfg(tmp_path: Any, providers: list[dict[str, Any]], **batches: Any) -> dict[str, Any]:
    return {"auth": {"master_key": MASTER}, "encryption": {"enabled": True}, "providers": providers,
            "database": {"url": f"sqlite:///{tmp_path}/n.db", "spool_dir": str(tmp_path / "spool"),
                         "auto_migrate": True, "flush_interval": "20ms"},
            "batches": {"poll_interval": "50ms", "native_poll_interval": "100ms", **batches}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def line(i: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"topic {i}"}]}}


def records(tmp_path: Any) -> list[dict[str, Any]]:
    eng = sa.create_engine(f"sqlite:///{tmp_path}/n.db")
    with eng.connect() as conn:
        out = [dict(r._mapping) for r in conn.execute(sa.text(
            "select request_id, provider, model, status, prompt_tokens, completion_tokens, cost from completions"))]
    eng.dispose()
    return out


def test_openai_native_batch(tmp_path: Any, make_gateway: Any, vendor: FakeVendorBatches, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    prov = vendor.openai_provider(models=["gpt-4o-mini", "missing-model"],
                                  model_prices={"missing-model": {"input_per_mtok": 1, "output_per_mtok": 2}})
    gw = make_gateway(cfg(tmp_path, [prov]))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    f = c.files.create(file=("n.jsonl", jsonl([line(0), line(1), line(2), line(3, "missing-model")])),
                       purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_until(lambda: c.batches.retrieve(b.id).status == "completed", timeout=30)
    b = c.batches.retrieve(b.id)
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (4, 3, 1)
    out = {x["custom_id"]: x for x in map(orjson.loads, c.files.content(b.output_file_id).content.splitlines())}
    err = [orjson.loads(x) for x in c.files.content(b.error_file_id).content.splitlines()]
    assert set(out) == {"q0", "q1", "q2"}
    assert out["q1"]["response"]["body"]["choices"][0]["message"]["content"] == "batched answer to topic 1"
    assert [e["custom_id"] for e in err] == ["q3"] and err[0]["response"]["status_code"] == 404
    # at the vendor: one upload, one batch, polled; no line went through the chat endpoint
    assert ("POST", "/v1/files") in vendor.calls and ("POST", "/v1/batches") in vendor.calls
    assert not any(p.endswith("/chat/completions") for _, p in vendor.calls)
    (vb,) = vendor.batches.values()
    assert vb["metadata"] == {"helixagent_batch": b.id} and vb["endpoint"] == "/v1/chat/completions"
    assert {x["custom_id"] for x in vb["_lines"]} == {"l0", "l1", "l2", "l3"}
    # one record per line, at the provider, cost at half the list price
    assert gw.run(gw.app.services["records"].writer.flush(30), timeout=40)
    recs = {r["request_id"]: r for r in records(tmp_path)}
    rids = [x["response"]["request_id"] for x in out.values()] + [err[0]["response"]["request_id"]]
    assert set(recs) == set(rids)
    from helixagent.config import load_config_dict
    from helixagent.routing.costs import cost_of, price
    pc = load_config_dict({"providers": [prov]}).providers[0]
    for x in out.values():
        r = recs[x["response"]["request_id"]]
        u = x["response"]["body"]["usage"]
        assert (r["provider"], r["status"], r["prompt_tokens"]) == ("openai", 200, u["prompt_tokens"])
        full = cost_of(price(pc, "gpt-4o-mini"), u["prompt_tokens"], u["completion_tokens"])
        assert full and r["cost"] == pytest.approx(full * 0.5)
    assert recs[err[0]["response"]["request_id"]]["status"] == 404


def test_openai_native_cancel(tmp_path: Any, make_gateway: Any, vendor: FakeVendorBatches, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    vendor.polls = 6
    try:
        gw = make_gateway(cfg(tmp_path, [vendor.openai_provider()], mode="native"))
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
        f = c.files.create(file=("n.jsonl", jsonl([line(i) for i in range(4)])), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert wait_until(lambda: bool(vendor.batches), timeout=20)
        c.batches.cancel(b.id)
        assert wait_until(lambda: c.batches.retrieve(b.id).status == "cancelled", timeout=30)
        b = c.batches.retrieve(b.id)
        assert ("POST", f"/v1/batches/{next(iter(vendor.batches))}/cancel") in vendor.calls
        assert (b.request_counts.completed, b.request_counts.failed) == (2, 2)
        err = [orjson.loads(x) for x in c.files.content(b.error_file_id).content.splitlines()]
        assert sorted(e["custom_id"] for e in err) == ["q1", "q3"]
        assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
    finally:
        vendor.polls = 2


def test_native_mode_refuses_and_auto_runs_locally(tmp_path: Any, make_gateway: Any, vendor: FakeVendorBatches,
                                                   monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(tmp_path, [vendor.openai_provider(), MOCK], mode="native"))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    f = c.files.create(file=("m.jsonl", jsonl([line(0), line(1, "mock-1")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as ei:
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert isinstance(ei.value.body, dict) and "line 2 ('mock-1')" in ei.value.body["message"]
    assert ei.value.body["code"] == "native_batch_unavailable"
    gw.close()
    gw2 = make_gateway(cfg(tmp_path, [vendor.openai_provider(), MOCK], mode="auto"))
    c2 = openai.OpenAI(base_url=gw2.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
    f2 = c2.files.create(file=("m.jsonl", jsonl([line(0, "mock-1"), line(1, "mock-1")])), purpose="batch")
    b = c2.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_until(lambda: c2.batches.retrieve(b.id).status == "completed", timeout=30)
    assert c2.batches.retrieve(b.id).request_counts.completed == 2
    assert vendor.calls == []   # nothing went to the vendor's batch API


def test_anthropic_native_message_batch(tmp_path: Any, make_gateway: Any, vendor: FakeVendorBatches,
                                        monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    prov = vendor.anthropic_provider(models=["claude-haiku-4-5", "missing-model"])
    gw = make_gateway(cfg(tmp_path, [prov], mode="native"))
    c = anthropic.Anthropic(base_url=gw.url, api_key=MASTER, max_retries=0, timeout=20)
    reqs: list[Any] = [{"custom_id": f"a{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 16,
                                                          "messages": [{"role": "user", "content": f"hello {i}"}]}}
                       for i in range(3)]
    reqs.append({"custom_id": "bad", "params": {"model": "missing-model", "max_tokens": 16,
                                                 "messages": [{"role": "user", "content": "x"}]}})
    b = c.messages.batches.create(requests=reqs)
    assert wait_until(lambda: c.messages.batches.retrieve(b.id).processing_status == "ended", timeout=30)
    b = c.messages.batches.retrieve(b.id)
    assert (b.request_counts.succeeded, b.request_counts.errored) == (3, 1)
    res = {r.custom_id: r.result for r in c.messages.batches.results(b.id)}
    ok = res["a2"]
    assert ok.type == "succeeded" and ok.message.content[0].text == "batched reply to hello 2"  # type: ignore[union-attr]
    assert res["bad"].type == "errored"
    (vb,) = vendor.msg_batches.values()
    assert [r["custom_id"] for r in vb["_reqs"]] == ["l0", "l1", "l2", "l3"]
    assert not any(p == "/v1/messages" for _, p in vendor.calls)
    assert gw.run(gw.app.services["records"].writer.flush(30), timeout=40)
    recs = records(tmp_path)
    assert len(recs) == 4 and {r["provider"] for r in recs} == {"claude"}
    assert sorted(r["status"] for r in recs) == [200, 200, 200, 400]


def test_interrupted_openai_submission_is_not_submitted_twice(tmp_path: Any, make_gateway: Any,
                                                              vendor: FakeVendorBatches, monkeypatch: Any) -> None:
    """A crash between the vendor's create call and our write of its id (simulated: the gateway stops, the
    id is wiped and the batch left 'submitting', a new gateway takes over): the retried step finds the vendor
    batch by its metadata and creates no second.  The wipe happens with no gateway running: a live runner's
    poll step in flight would write the vendor's status back over 'submitting' (a race a real crash has not)."""
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    vendor.polls = 8
    try:
        conf = cfg(tmp_path, [vendor.openai_provider()], mode="native", native_poll_interval="300ms")
        gw = make_gateway(conf)
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
        f = c.files.create(file=("n.jsonl", jsonl([line(i) for i in range(3)])), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        eng = sa.create_engine(f"sqlite:///{tmp_path}/n.db")

        def upstream() -> Any:
            with eng.connect() as conn:
                return conn.execute(sa.text("select upstream_id from batches where id = :b"), {"b": b.id}).scalar_one()
        assert wait_until(lambda: upstream() is not None, timeout=20)
        gw.close()
        with eng.begin() as conn:
            conn.execute(sa.text("update batches set upstream_id = null, upstream_status = 'submitting', "
                                 "lease_until = null where id = :b"), {"b": b.id})
        gw = make_gateway(conf)
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0, timeout=20)
        assert wait_until(lambda: c.batches.retrieve(b.id).status == "completed", timeout=30)
        eng.dispose()
        assert len(vendor.batches) == 1 and ("GET", "/v1/batches") in vendor.calls
        assert c.batches.retrieve(b.id).request_counts.completed == 3
    finally:
        vendor.polls = 2


def test_a_vendor_error_quoting_the_key_is_scrubbed_before_it_is_logged_or_stored() -> None:
    """A vendor error is quoted into the GatewayError that is logged and, for a failed native batch, stored
    in the batch's ``errors`` (returned to the client): the provider's key never goes along."""
    from helixagent.batches.native import _json
    from helixagent.config import load_config_dict
    from helixagent.errors import GatewayError
    from helixagent.providers import build_provider
    key = "sk-native-secret-" + "9" * 24
    cfg = load_config_dict({"providers": [{"name": "openai", "type": "openai", "api_key": key}]})
    p = build_provider(cfg.providers[0], cfg.http)
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}})
    with pytest.raises(GatewayError) as exc:
        _json(401, body, "create batch", p)
    assert key not in exc.value.message and "Incorrect API key provided" in exc.value.message
    assert exc.value.status == 401 and exc.value.provider == "openai" and not exc.value.retryable
    assert _json(200, b'{"id": "batch_1"}', "create batch", p) == {"id": "batch_1"}
    import asyncio
    asyncio.run(p.close())


def test_a_results_url_off_the_providers_api_is_not_followed(tmp_path: Any, make_gateway: Any,
                                                             vendor: FakeVendorBatches, monkeypatch: Any) -> None:
    """docs/batches.md: the results URL is followed only when it is on the provider's own API -- the
    vendor key is never sent anywhere else; the results come from the provider's own results endpoint."""
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    foreign = FakeVendorBatches()  # another host (it would even accept the key): it must see no request
    try:
        vendor.results_base = foreign.url
        gw = make_gateway(cfg(tmp_path, [vendor.anthropic_provider()], mode="native"))
        c = anthropic.Anthropic(base_url=gw.url, api_key=MASTER, max_retries=0, timeout=20)
        b = c.messages.batches.create(requests=[{"custom_id": "a0", "params": {
            "model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hello 0"}]}}])
        assert wait_until(lambda: c.messages.batches.retrieve(b.id).processing_status == "ended", timeout=30)
        (vb,) = vendor.msg_batches.values()
        assert vb["results_url"].startswith(foreign.url)
        res = {r.custom_id: r.result for r in c.messages.batches.results(b.id)}
        assert res["a0"].type == "succeeded"
        assert foreign.calls == []
        assert ("GET", f"/v1/messages/batches/{vb['id']}/results") in vendor.calls
    finally:
        vendor.results_base = None
        foreign.close()
