"""The Files and Batches APIs through the official openai and anthropic SDKs, on SQLite and the real
PostgreSQL: local execution through the pipeline (a fake OpenAI upstream, records), output and error files
and request_counts in OpenAI's shapes, tenant isolation, bad input naming its line, 413, cancel, expiry."""
from __future__ import annotations

import base64
from typing import Any, Iterator

import anthropic
import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa

from conftest import need_postgres
from support.keys import MASTER, admin_create
from support.pg import fresh_schema
from support.servers import wait_until

K1 = "k20200101:" + base64.b64encode(b"5" * 32).decode()
MOCK = {"name": "mock", "type": "mock", "models": ["mock-1"], "mock_tokens": 4}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: Any, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/batches.db"
        return
    gen = fresh_schema(need_postgres())
    yield next(gen)
    gen.close()


def cfg(db_url: str, tmp_path: Any, providers: list[dict[str, Any]], n: int = 0, **batches: Any) -> dict[str, Any]:
    b = {"poll_interval": "50ms", **batches}
    return {"auth": {"master_key": MASTER}, "encryption": {"enabled": True}, "providers": providers,
            "database": {"url": db_url, "spool_dir": str(tmp_path / f"spool{n}"), "auto_migrate": True,
                         "flush_interval": "20ms"},
            "batches": b}


def oai(gw: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def chat_line(i: int, model: str = "gpt-4o-mini", url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": f"question number {i}"}]}}


def wait_status(client: openai.OpenAI, bid: str, want: tuple[str, ...], timeout: float = 60) -> Any:
    got: list[Any] = []

    def done() -> bool:
        got.append(client.batches.retrieve(bid))
        return got[-1].status in want

    assert wait_until(done, timeout=timeout, interval=0.1), got[-1]
    return got[-1]


def sync_engine(db_url: str) -> sa.Engine:
    return sa.create_engine(db_url if db_url.startswith("sqlite") else
                            db_url.replace("postgresql://", "postgresql+psycopg2://", 1))


def test_openai_sdk_batch_end_to_end_tenant_scoped_encrypted(db_url: str, tmp_path: Any, make_gateway: Any,
                                                               fake_openai: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(db_url, tmp_path, [fake_openai.provider(max_retries=0)]))
    a1 = admin_create(gw, user_id="alice", role="user")
    k1, k2 = a1["key"], admin_create(gw, user_id="bob", role="user")["key"]
    c = oai(gw, k1)
    n = 12
    f = c.files.create(file=("questions.jsonl", jsonl([chat_line(i) for i in range(n)])), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.filename == "questions.jsonl" and f.bytes > 0
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"job": "nightly"})
    assert b.status == "in_progress" and b.metadata == {"job": "nightly"} and b.request_counts.total == n
    b = wait_status(c, b.id, ("completed",))
    assert b.request_counts.completed == n and b.request_counts.failed == 0
    assert b.error_file_id is None and b.output_file_id and b.completed_at and b.in_progress_at
    assert b.usage is not None and b.usage.total_tokens > 0
    out = [orjson.loads(x) for x in c.files.content(b.output_file_id).content.splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(n))
    for x in out:
        assert x["error"] is None and x["response"]["status_code"] == 200 and x["id"].startswith("batch_req_")
        assert x["response"]["body"]["object"] == "chat.completion"
    # every line went through the upstream once (batches.mode auto tried the vendor's batch API first: this
    # fake has none, the upload's 404 made the batch run locally), and has its record under the line's id
    assert sum(1 for call in fake_openai.calls if call["path"].endswith("/chat/completions")) == n
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    rids = {x["response"]["request_id"] for x in out}
    writer = gw.app.services["records"].writer
    assert gw.run(writer.flush(30), timeout=40)
    eng = sync_engine(db_url)
    with eng.connect() as conn:
        recs = [dict(r._mapping) for r in conn.execute(sa.text("select request_id, key_id, provider from completions"))]
        blobs = [bytes(r[0]) for r in conn.execute(sa.text("select content from batch_files"))]
        blobs += [bytes(r[0]) + bytes(r[1] or b"") for r in conn.execute(sa.text("select body, result from batch_lines"))]
    eng.dispose()
    assert {r["request_id"] for r in recs} >= rids
    assert {r["key_id"] for r in recs if r["request_id"] in rids} == {a1["id"]}
    assert all(b"question number" not in x for x in blobs)  # encrypted at rest
    # listed for its owner only; every way in for another key is a 404
    assert [x.id for x in c.batches.list().data] == [b.id]
    other = oai(gw, k2)
    assert other.batches.list().data == [] and other.files.list().data == []
    for call in (lambda: other.batches.retrieve(b.id), lambda: other.batches.cancel(b.id),
                 lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
                 lambda: other.files.content(b.output_file_id), lambda: other.files.delete(f.id),
                 lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    # the owner lists and deletes its files
    assert {x.id for x in c.files.list().data} == {f.id, b.output_file_id}
    assert c.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_embeddings_and_errors_in_the_error_file(tmp_path: Any, make_gateway: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(f"sqlite:///{tmp_path}/b.db", tmp_path, [MOCK]))
    c = oai(gw, MASTER)
    lines = [{"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "mock-1", "input": "hi"}},
             {"custom_id": "e2", "method": "POST", "url": "/v1/embeddings", "body": {"model": "nope-9", "input": "x"}},
             {"custom_id": "e3", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "mock-1", "input": "hi", "stream": True}}]
    f = c.files.create(file=("e.jsonl", jsonl(lines)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    b = wait_status(c, b.id, ("completed",))
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (3, 1, 2)
    out = [orjson.loads(x) for x in c.files.content(b.output_file_id).content.splitlines()]
    err = {x["custom_id"]: x for x in (orjson.loads(x) for x in c.files.content(b.error_file_id).content.splitlines())}
    assert [x["custom_id"] for x in out] == ["e1"] and out[0]["response"]["body"]["data"][0]["embedding"]
    assert err["e2"]["response"]["status_code"] == 404 and err["e2"]["response"]["body"]["error"]["param"] == "model"
    assert err["e3"]["response"]["status_code"] == 400
    assert err["e3"]["response"]["body"]["error"]["param"] == "body.stream"
    # a file whose lines target another endpoint: the batch fails at once, naming the lines
    f2 = c.files.create(file=("m.jsonl", jsonl([chat_line(0, "mock-1"), chat_line(1, "mock-1", "/v1/embeddings")])),
                        purpose="batch")
    b2 = c.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b2.status == "failed" and b2.failed_at and b2.errors is not None
    assert [(e.line, e.param, e.code) for e in b2.errors.data or []] == [(2, "url", "invalid_url")]


@pytest.mark.parametrize("content, line, words", [
    (b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n{"custom_id":"b",',
     2, "not valid JSON"),
    (b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n\n'
     b'{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n', 3, "earlier line"),
    (b'{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{"model":"m"}}', 1, "method"),
    (b'{"custom_id":"a","method":"POST","url":"/v1/images","body":{"model":"m"}}', 1, "url"),
    (b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":[]}', 1, "body"),
    (b'[1, 2]', 1, "JSON object"),
    (b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}\n\xff\xfe', 2, "UTF-8"),
])
def test_malformed_jsonl_names_the_line(gateway_sqlite: Any, content: bytes, line: int, words: str) -> None:
    c = oai(gateway_sqlite, MASTER)
    with pytest.raises(openai.BadRequestError) as ei:
        c.files.create(file=("bad.jsonl", content), purpose="batch")
    err = ei.value.body
    assert isinstance(err, dict) and err["param"] == "file", err
    assert err["message"].startswith(f"line {line}: ") and words in err["message"], err


@pytest.fixture
def gateway_sqlite(make_gateway: Any, tmp_path: Any, monkeypatch: Any) -> Any:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    return make_gateway(cfg(f"sqlite:///{tmp_path}/m.db", tmp_path, [MOCK], max_file_bytes=4096))


def test_upload_bounds_and_form_errors(gateway_sqlite: Any) -> None:
    c = oai(gateway_sqlite, MASTER)
    big = jsonl([chat_line(i, "mock-1") for i in range(100)])
    assert len(big) > 4096
    with pytest.raises(openai.APIStatusError) as ei:
        c.files.create(file=("big.jsonl", big), purpose="batch")
    assert ei.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as e2:
        c.files.create(file=("x.jsonl", jsonl([chat_line(0)])), purpose="fine-tune")
    assert isinstance(e2.value.body, dict) and e2.value.body["param"] == "purpose"
    r = httpx.post(gateway_sqlite.url + "/v1/files", headers={"authorization": f"Bearer {MASTER}"},
                   json={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    with pytest.raises(openai.AuthenticationError):
        oai(gateway_sqlite, "wrong").files.list()
    with pytest.raises(openai.BadRequestError) as e3:
        f = c.files.create(file=("x.jsonl", jsonl([chat_line(0, "mock-1")])), purpose="batch")
        c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    assert isinstance(e3.value.body, dict) and e3.value.body["param"] == "completion_window"


def test_a_flood_of_unauthenticated_uploads_is_refused_before_the_body_is_read(gateway_sqlite: Any) -> None:
    """300 concurrent 1 MB multipart uploads with wrong or missing keys (and Anthropic batch creations): every
    one a 401 in its API's shape, nothing stored, and the gateway keeps answering its own clients."""
    import asyncio

    import aiohttp

    blob = b"x" * (1 << 20)

    async def upload(s: aiohttp.ClientSession, i: int) -> tuple[int, Any]:
        if i % 3 == 2:
            async with s.post(gateway_sqlite.url + "/v1/messages/batches", data=blob,
                              headers={"x-api-key": f"sk-ant-wrong-{i}", "content-type": "application/json"}) as r:
                return r.status, await r.json()
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", blob, filename="flood.jsonl", content_type="application/jsonl")
        headers = {"authorization": f"Bearer hx-wrong-{i}"} if i % 3 == 0 else {}
        async with s.post(gateway_sqlite.url + "/v1/files", data=form, headers=headers) as r:
            return r.status, await r.json()

    async def run() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as s:
            return list(await asyncio.gather(*(upload(s, i) for i in range(300))))

    res = asyncio.run(run())
    assert [st for st, _ in res] == [401] * 300, [b for st, b in res if st != 401][:3]
    for i, (_, body) in enumerate(res):
        if i % 3 == 2:
            assert body["type"] == "error" and body["error"]["type"] == "authentication_error", body
        else:
            want = "invalid_api_key" if i % 3 == 0 else "missing_api_key"
            assert body["error"]["code"] == want and set(body["error"]) == {"message", "type", "param", "code"}, body
    c = oai(gateway_sqlite, MASTER)
    assert c.files.list().data == []
    f = c.files.create(file=("ok.jsonl", jsonl([chat_line(0, "mock-1")])), purpose="batch")
    assert f.bytes > 0


def test_cancel_stops_claiming_and_marks_the_rest(tmp_path: Any, make_gateway: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    slow = dict(MOCK, latency_ms=150)
    gw = make_gateway(cfg(f"sqlite:///{tmp_path}/c.db", tmp_path, [slow], local_concurrency=2))
    c = oai(gw, MASTER)
    f = c.files.create(file=("c.jsonl", jsonl([chat_line(i, "mock-1") for i in range(40)])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_until(lambda: c.batches.retrieve(b.id).request_counts.completed >= 2, timeout=30)
    got = c.batches.cancel(b.id)
    assert got.status in ("cancelling", "cancelled") and got.cancelling_at
    b = wait_status(c, b.id, ("cancelled",))
    rc = b.request_counts
    assert rc.total == 40 and 2 <= rc.completed < 40 and rc.completed + rc.failed == 40
    out = c.files.content(b.output_file_id).content.splitlines()
    err = [orjson.loads(x) for x in c.files.content(b.error_file_id).content.splitlines()]
    assert len(out) == rc.completed and len(err) == rc.failed
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"} and all(e["response"] is None for e in err)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)


def test_completion_window_expiry(tmp_path: Any, make_gateway: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    slow = dict(MOCK, latency_ms=200)
    gw = make_gateway(cfg(f"sqlite:///{tmp_path}/x.db", tmp_path, [slow], local_concurrency=1,
                          completion_windows=["24h", "2s"]))
    c = oai(gw, MASTER)
    f = c.files.create(file=("x.jsonl", jsonl([chat_line(i, "mock-1") for i in range(60)])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="2s")  # type: ignore[arg-type]
    assert b.expires_at - b.created_at == 2
    b = wait_status(c, b.id, ("expired",), timeout=30)
    rc = b.request_counts
    assert b.expired_at and 1 <= rc.completed < 60 and rc.completed + rc.failed == 60
    err = [orjson.loads(x) for x in c.files.content(b.error_file_id).content.splitlines()]
    assert len(err) == rc.failed and {e["error"]["code"] for e in err} == {"batch_expired"}
    assert err[0]["error"]["message"] == "This request could not be executed before the completion window expired."


def test_anthropic_sdk_message_batches(db_url: str, tmp_path: Any, make_gateway: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(db_url, tmp_path, [MOCK]))
    k1 = admin_create(gw, user_id="carol", role="user")["key"]
    k2 = admin_create(gw, user_id="dave", role="user")["key"]
    c = anthropic.Anthropic(base_url=gw.url, api_key=k1, max_retries=0, timeout=20)
    reqs: list[Any] = [{"custom_id": f"m{i}", "params": {"model": "mock-1", "max_tokens": 32,
                                                          "messages": [{"role": "user", "content": f"hi {i}"}]}}
                       for i in range(5)]
    reqs.append({"custom_id": "bad", "params": {"model": "mock-1", "messages": []}})  # no max_tokens: errored
    b = c.messages.batches.create(requests=reqs)
    assert b.type == "message_batch" and b.processing_status == "in_progress" and b.request_counts.processing == 6
    with pytest.raises(anthropic.BadRequestError):  # not ended yet
        c.messages.batches.delete(b.id)
    assert wait_until(lambda: c.messages.batches.retrieve(b.id).processing_status == "ended", timeout=30)
    b = c.messages.batches.retrieve(b.id)
    rc = b.request_counts
    assert (rc.succeeded, rc.errored, rc.processing, rc.canceled, rc.expired) == (5, 1, 0, 0, 0) and b.ended_at
    results = {r.custom_id: r.result for r in c.messages.batches.results(b.id)}
    assert set(results) == {f"m{i}" for i in range(5)} | {"bad"}
    for i in range(5):
        res = results[f"m{i}"]
        assert res.type == "succeeded" and res.message.type == "message" and res.message.content
    assert results["bad"].type == "errored"
    assert [x.id for x in c.messages.batches.list()] == [b.id]
    other = anthropic.Anthropic(base_url=gw.url, api_key=k2, max_retries=0, timeout=20)
    assert list(other.messages.batches.list()) == []
    for call in (lambda: other.messages.batches.retrieve(b.id), lambda: other.messages.batches.cancel(b.id),
                 lambda: other.messages.batches.delete(b.id)):
        with pytest.raises(anthropic.NotFoundError):
            call()
    assert c.messages.batches.delete(b.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        c.messages.batches.retrieve(b.id)
    with pytest.raises(anthropic.BadRequestError) as ei:
        c.messages.batches.create(requests=[{"custom_id": "x!", "params": {"model": "mock-1"}}])  # type: ignore[typeddict-item]
    assert "requests.0.custom_id" in str(ei.value)


def test_migration_0006_matches_the_schema_up_and_down(db_url: str) -> None:
    from helixagent.store import migrate
    from helixagent.store.db import make_sync_engine
    from helixagent.store.schema import batch_files, batch_lines, batches
    migrate.upgrade(db_url)
    eng = make_sync_engine(db_url)
    try:
        insp = sa.inspect(eng)
        for t in (batch_files, batches, batch_lines):
            assert {c["name"] for c in insp.get_columns(t.name)} == {c.name for c in t.columns}, t.name
            assert {i["name"] for i in insp.get_indexes(t.name)} == {i.name for i in t.indexes}, t.name
        assert insp.get_pk_constraint("batch_lines")["constrained_columns"] == ["batch_id", "idx"]
        migrate.downgrade(db_url, 1)
        assert migrate.current(db_url) == "0005_completions_ensemble"
        names = set(sa.inspect(eng).get_table_names())
        assert not names & {"batch_files", "batches", "batch_lines"} and "responses" in names
        migrate.upgrade(db_url)
        assert {"batch_files", "batches", "batch_lines"} <= set(sa.inspect(eng).get_table_names())
    finally:
        eng.dispose()


def test_rate_limited_lines_pace_the_batch_and_run_again(tmp_path: Any, make_gateway: Any, fake_openai: Any,
                                                         monkeypatch: Any) -> None:
    """A 429 (here the upstream's, retries off) is not a line's result: the line is given back, the batch
    waits for the Retry-After, and the line runs again; its cut attempt keeps its own record."""
    from fakes.openai_upstream import Fault
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(f"sqlite:///{tmp_path}/r.db", tmp_path, [fake_openai.provider(max_retries=0)],
                          local_concurrency=1))
    fake_openai.push(Fault(status=429, headers={"retry-after": "1"}), Fault(status=429, headers={"retry-after": "1"}))
    c = oai(gw, MASTER)
    f = c.files.create(file=("r.jsonl", jsonl([chat_line(i) for i in range(3)])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_status(c, b.id, ("completed",), timeout=60)
    assert (b.request_counts.completed, b.request_counts.failed) == (3, 0)
    assert sum(1 for call in fake_openai.calls if call["path"].endswith("/chat/completions")) == 5
    assert gw.app.services["batches_runner"].rate_limited == 2
    out = [orjson.loads(x) for x in c.files.content(b.output_file_id).content.splitlines()]
    assert sorted(x["custom_id"] for x in out) == ["req-0", "req-1", "req-2"]
    assert gw.run(gw.app.services["records"].writer.flush(30), timeout=40)
    eng = sync_engine(f"sqlite:///{tmp_path}/r.db")
    with eng.connect() as conn:
        recs = {r[0]: r[1] for r in conn.execute(sa.text("select request_id, status from completions"))}
    eng.dispose()
    final = {x["response"]["request_id"] for x in out}
    assert {recs[r] for r in final} == {200}
    assert sorted(s for r, s in recs.items() if r not in final) == [429, 429]   # the attempts that were paced


def test_revoked_owner_key_fails_the_remaining_lines(tmp_path: Any, make_gateway: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(f"sqlite:///{tmp_path}/v.db", tmp_path, [dict(MOCK, latency_ms=100)], local_concurrency=1))
    k = admin_create(gw, user_id="erin", role="user")
    c = oai(gw, k["key"])
    f = c.files.create(file=("v.jsonl", jsonl([chat_line(i, "mock-1") for i in range(30)])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_until(lambda: c.batches.retrieve(b.id).request_counts.completed >= 1, timeout=30)
    r = httpx.post(f"{gw.url}/admin/keys/{k['id']}/revoke", headers={"authorization": f"Bearer {MASTER}"})
    assert r.status_code == 200, r.text
    master = oai(gw, MASTER)
    with pytest.raises(openai.NotFoundError):  # the master key is another tenant too
        master.batches.retrieve(b.id)
    eng = sync_engine(f"sqlite:///{tmp_path}/v.db")

    def status() -> str:
        with eng.connect() as conn:
            return str(conn.execute(sa.text("select status from batches where id = :b"), {"b": b.id}).scalar_one())
    assert wait_until(lambda: status() == "completed", timeout=30)
    with eng.connect() as conn:
        codes = [r[0] for r in conn.execute(sa.text("select status_code from batch_lines where batch_id = :b "
                                                    "order by idx"), {"b": b.id})]
    eng.dispose()
    assert codes[0] == 200 and codes[-1] == 401 and set(codes) == {200, 401}


def test_lists_page_newest_first(db_url: str, tmp_path: Any, make_gateway: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(cfg(db_url, tmp_path, [MOCK]))
    c = oai(gw, MASTER)
    files = [c.files.create(file=(f"f{i}.jsonl", jsonl([chat_line(j, "mock-1") for j in range(i + 1)])),
                            purpose="batch") for i in range(3)]
    page = c.files.list(limit=2)
    assert [x.id for x in page.data] == [files[2].id, files[1].id] and page.has_more
    rest = c.files.list(limit=2, after=files[1].id)
    assert [x.id for x in rest.data] == [files[0].id] and not rest.has_more
    assert [x.id for x in c.files.list(order="asc").data] == [f.id for f in files]
    bs = [c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
          for f in files]
    p1 = c.batches.list(limit=2)
    assert [x.id for x in p1.data] == [bs[2].id, bs[1].id] and p1.has_more
    assert [x.id for x in c.batches.list(limit=2, after=bs[1].id).data] == [bs[0].id]
    assert [x.id for x in c.batches.list()] == [b.id for b in reversed(bs)]   # the SDK's auto-paging
    for b in bs:  # each listed batch carries its own counts (one grouped query for the page)
        wait_status(c, b.id, ("completed",))
    assert {x.id: (x.request_counts.total, x.request_counts.completed) for x in c.batches.list().data} == {
        b.id: (i + 1, i + 1) for i, b in enumerate(bs)}
    a = anthropic.Anthropic(base_url=gw.url, api_key=MASTER, max_retries=0, timeout=20)
    ms = [a.messages.batches.create(requests=[{"custom_id": f"c{i}", "params": {
        "model": "mock-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}}]) for i in range(3)]
    first = a.messages.batches.list(limit=2)
    assert [x.id for x in first.data] == [ms[2].id, ms[1].id] and first.has_more
    assert [x.id for x in a.messages.batches.list(limit=2, after_id=ms[1].id).data] == [ms[0].id]
    assert [x.id for x in a.messages.batches.list(limit=1, before_id=ms[0].id).data] == [ms[1].id]
    assert [x.id for x in a.messages.batches.list(limit=1)] == [m.id for m in reversed(ms)]
    with pytest.raises(openai.BadRequestError):
        c.batches.list(limit=0)


def test_ip_limits_pace_the_lines_of_the_address_that_created_the_batch(tmp_path: Any, make_gateway: Any,
                                                                        monkeypatch: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    c_ = cfg(f"sqlite:///{tmp_path}/ip.db", tmp_path, [MOCK])
    c_["rate_limits"] = {"ip": {"requests_per_minute": 240, "burst_size": 2}}
    gw = make_gateway(c_)
    c = oai(gw, MASTER)
    f = c.files.create(file=("ip.jsonl", jsonl([chat_line(i, "mock-1") for i in range(6)])), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    b = wait_status(c, b.id, ("completed",), timeout=60)
    assert (b.request_counts.completed, b.request_counts.failed) == (6, 0)   # paced, never failed
    assert gw.app.services["batches_runner"].rate_limited >= 1
    eng = sync_engine(f"sqlite:///{tmp_path}/ip.db")
    with eng.connect() as conn:
        assert {r[0] for r in conn.execute(sa.text("select ip from batches"))} == {"127.0.0.1"}
    eng.dispose()
