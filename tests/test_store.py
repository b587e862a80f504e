"""Completion records: migrations, the writer, encryption, retention and the usage API.

The whole module runs twice: against SQLite and against the real PostgreSQL (a fresh schema per test)."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import uuid

import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletion

from conftest import need_postgres
from support.pg import fresh_schema

from helixagent import cli
from helixagent.config import ConfigError, load_config_dict
from helixagent.errors import GatewayError
from helixagent.pipeline import Identity
from helixagent.store import migrate, queries
from helixagent.store.crypto import Keyring, TamperedRecord, parse_keys
from helixagent.store.db import make_engine, make_sync_engine
from helixagent.store.schema import completions as C
from helixagent.store.spool import encode_frame
from helixagent.store.writer import RecordWriter

UTC = dt.timezone.utc
K1 = "k20200101:" + base64.b64encode(b"1" * 32).decode()
K2 = "k2-new:" + base64.b64encode(b"2" * 32).decode() + ":" + dt.date.today().isoformat()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/records.db"
        return
    gen = fresh_schema(need_postgres())
    yield next(gen)
    gen.close()


@pytest.fixture
def migrated(db_url):
    migrate.upgrade(db_url)
    return db_url


def rows(url, where=None):
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            q = sa.select(C)
            if where is not None:
                q = q.where(where)
            return [dict(r) for r in conn.execute(q.order_by(C.c.created_at)).mappings()]
    finally:
        eng.dispose()


def insert_rows(url, items):
    eng = make_sync_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(C.insert(), items)
    finally:
        eng.dispose()


def row(created_at, **kw):
    d = {"request_id": uuid.uuid4().hex, "client_request_id": None, "created_at": created_at, "user_id": None,
         "application": None, "key_id": None, "provider": "openai", "model": "gpt-4o-mini", "endpoint": "chat",
         "status": 200, "error_type": None, "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
         "cost": 0.001, "latency_ms": 12.0, "ttft_ms": None, "cache_hit": False, "streamed": False,
         "request_body": None, "response_body": None, "enc_key_id": None}
    d.update(kw)
    return d


def gw_cfg(db_url, tmp_path, fake=None, **extra):
    cfg = {"database": {"url": db_url, "spool_dir": str(tmp_path / "spool"), "auto_migrate": True,
                        "flush_interval": "50ms"}}
    if fake is not None:
        cfg["providers"] = [fake.provider()]
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def flush(gw):
    assert gw.run(gw.app.services["records"].writer.flush(20), timeout=30)


# -- migrations ------------------------------------------------------------------------------------------
def test_migrations_up_status_down(db_url, capsys):
    args = ["--database-url", db_url]
    assert cli.main(["migrate", "status", *args]) == 3
    assert "pending: 0001_completions" in capsys.readouterr().out
    assert cli.main(["migrate", "up", *args]) == 0
    assert cli.main(["migrate", "status", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    eng = make_sync_engine(db_url)
    try:
        insp = sa.inspect(eng)
        assert "completions" in insp.get_table_names()
        cols = {c["name"] for c in insp.get_columns("completions")}
        assert {"request_id", "client_request_id", "created_at", "user_id", "application", "key_id", "provider",
                "model", "status", "error_type", "prompt_tokens", "completion_tokens", "total_tokens", "cost",
                "latency_ms", "ttft_ms", "cache_hit", "streamed", "request_body", "response_body",
                "enc_key_id"} <= cols
        assert insp.get_pk_constraint("completions")["constrained_columns"] == ["request_id"]
        idx = {i["name"]: i["column_names"] for i in insp.get_indexes("completions")}
        assert idx["ix_completions_created_at"] == ["created_at"]
        assert idx["ix_completions_user_id"][0] == "user_id"
        assert idx["ix_completions_application"] == ["application", "created_at"]
    finally:
        eng.dispose()
    # down to the base (N = every applied revision; later issues add their own), then up again
    n = len(migrate.status(db_url)["applied"])
    assert cli.main(["migrate", "down", str(n), *args]) == 0
    eng = make_sync_engine(db_url)
    try:
        assert "completions" not in sa.inspect(eng).get_table_names()
    finally:
        eng.dispose()
    assert migrate.current(db_url) is None
    assert cli.main(["migrate", "up", *args]) == 0
    assert migrate.status(db_url)["up_to_date"]
    assert cli.main(["migrate", "down", "0", *args]) == 1   # N must be >= 1: a clear error, no traceback


def test_migrate_is_idempotent_and_concurrent(db_url):
    """Several processes (gateway workers) migrating at once: one applies, the others find it done."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
    procs = [subprocess.Popen([sys.executable, "-m", "helixagent", "migrate", "up", "--database-url", db_url],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    migrate.upgrade(db_url)   # and again in-process: nothing to do
    assert migrate.status(db_url)["up_to_date"]


# -- the gateway records every request -------------------------------------------------------------------
def test_every_request_is_recorded(db_url, tmp_path, make_gateway, fake_openai):
    gw = make_gateway(gw_cfg(db_url, tmp_path, fake_openai))
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                      messages=[{"role": "user", "content": "hello world"}])
    ChatCompletion.model_validate(orjson.loads(raw.content))
    rid_plain = raw.headers["x-request-id"]
    assert raw.headers["x-helixagent-request-id"] == rid_plain
    stream = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True,
        stream_options={"include_usage": True})
    rid_stream = stream.headers["x-request-id"]
    assert "".join(ch.choices[0].delta.content or "" for ch in stream.parse() if ch.choices) == \
        "echo:a echo:b echo:c"
    bad = httpx.post(gw.url + "/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400
    rid_bad = bad.headers["x-request-id"]
    # a client-supplied X-Request-ID, sent twice: two records, each with our own id
    dup = [httpx.post(gw.url + "/v1/chat/completions", headers={"x-request-id": "client-1"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
           for _ in range(2)]
    assert [r.headers["x-request-id"] for r in dup] == ["client-1", "client-1"]   # echoed
    dup_ids = [r.headers["x-helixagent-request-id"] for r in dup]                 # our own ids
    assert len(set(dup_ids)) == 2 and "client-1" not in dup_ids
    flush(gw)
    got = {r["request_id"]: r for r in rows(db_url)}
    assert set(got) == {rid_plain, rid_stream, rid_bad, *dup_ids}
    p = got[rid_plain]
    assert (p["provider"], p["model"], p["endpoint"], p["status"], p["streamed"]) == \
        ("openai", "gpt-4o-mini", "chat", 200, False)
    assert p["prompt_tokens"] > 0 and p["total_tokens"] == p["prompt_tokens"] + p["completion_tokens"]
    assert p["latency_ms"] > 0 and p["error_type"] is None and p["enc_key_id"] is None
    assert orjson.loads(p["request_body"])["messages"][0]["content"] == "hello world"
    assert orjson.loads(p["response_body"])["choices"][0]["message"]["content"] == "echo:hello echo:world"
    s = got[rid_stream]
    assert s["streamed"] is True and s["ttft_ms"] is not None and s["completion_tokens"] > 0
    assert orjson.loads(s["response_body"])["choices"][0]["message"]["content"] == "echo:a echo:b echo:c"
    b = got[rid_bad]
    assert b["status"] == 400 and b["error_type"] == "invalid_json" and b["request_body"] == b"{not json"
    assert [got[i]["client_request_id"] for i in dup_ids] == ["client-1", "client-1"]
    # and the usage API counts them
    u = httpx.get(gw.url + "/v1/usage", params={"group_by": "model"}).json()
    assert u["total"]["requests"] == 5 and u["total"]["errors"] == 1


def test_upstream_error_is_recorded(db_url, tmp_path, make_gateway, fake_openai):
    from fakes.openai_upstream import Fault
    fake_openai.push(Fault(status=400, message="bad thing upstream"))
    gw = make_gateway(gw_cfg(db_url, tmp_path, fake_openai))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "x"}]})
    assert r.status_code == 400
    flush(gw)
    (rec,) = rows(db_url)
    assert rec["request_id"] == r.headers["x-request-id"]
    assert rec["status"] == r.status_code and rec["error_type"]
    assert orjson.loads(rec["response_body"])["error"]["message"] == r.json()["error"]["message"]


def test_record_bodies_off(db_url, tmp_path, make_gateway, fake_openai):
    gw = make_gateway(gw_cfg(db_url, tmp_path, fake_openai, database={"record_bodies": False}))
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "secret words"}]})
    assert r.status_code == 200
    flush(gw)
    (rec,) = rows(db_url)
    assert rec["request_body"] is None and rec["response_body"] is None and rec["total_tokens"] > 0


# -- writer: queue overflow, torn spool, replay ------------------------------------------------------------
def _meta(rid, t=None, **kw):
    m = [rid, None, t or dt.datetime.now(UTC).timestamp(), kw.get("user"), None, None, "p", "m", "chat", 200,
         None, 1, 2, 3, 0.5, 1.0, None, False, False, None]
    return m


def test_sqlite_created_at_text_is_strftimes(tmp_path):
    """The writer's cached SQLite timestamp text equals fromtimestamp(...).strftime(...) exactly, rounding
    of the microseconds (half to even, carry into the next second) included."""
    import random
    w = RecordWriter(make_engine("sqlite://"), str(tmp_path / "spool"))
    rnd = random.Random(16)
    now = dt.datetime.now(UTC).timestamp()
    cases = [0.0, 1.0, 0.9999999, 0.9999995, 1700000000.0, 1700000000.9999996, 1700000000.0000005,
             1700000000.0000015, 1700000059.9999999, -1.5, -0.0000001, -86400.9999999, 253402300799.0]
    cases += [now + i * 0.000271 for i in range(20000)]            # in time order, as records come
    cases += [rnd.uniform(-1e9, 4e9) for _ in range(20000)]        # jumping about
    cases += [round(rnd.uniform(1e9, 2e9), rnd.randint(0, 7)) for _ in range(20000)]
    cases += [int(rnd.uniform(1e9, 2e9)) + rnd.randint(0, 10**6) / 1e6 + rnd.choice((0.0, 5e-7, -5e-7))
              for _ in range(20000)]
    for ts in cases:
        assert w._sqlite_time(ts) == dt.datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f"), ts


def test_sqlite_page_size_new_file_large_existing_file_kept(tmp_path):
    """A new SQLite file gets the writer's page size (db.SQLITE_PAGE_SIZE) and WAL; a file created before
    keeps its own page size and still migrates and records."""
    import sqlite3

    from helixagent.store.db import SQLITE_PAGE_SIZE
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    for f in (new, old):
        migrate.upgrade(f"sqlite:///{f}")
    for f, size in ((new, SQLITE_PAGE_SIZE), (old, 4096)):
        con = sqlite3.connect(f)
        try:
            assert con.execute("PRAGMA page_size").fetchone()[0] == size
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert con.execute("SELECT count(*) FROM completions").fetchone()[0] == 0
        finally:
            con.close()


async def test_writer_keeps_none_bool_and_bytes_values(migrated, tmp_path):
    """What the writer binds reads back unchanged: NULLs, both booleans and blobs (on SQLite they go through
    the identity adapters of db._sqlite_fast_binding and bools are bound as 0/1), and the latency rounded
    to the microsecond as the record's builder rounds it."""
    import sqlite3

    from helixagent.millis import ms3
    eng = make_engine(migrated)
    if migrated.startswith("sqlite"):
        for t in (bytes, bool, type(None)):
            assert (t, sqlite3.PrepareProtocol) in sqlite3.adapters
    w = RecordWriter(eng, str(tmp_path / "spool"), flush_interval=0.05)
    await w.start()
    a = _meta("r-true")
    a[17:19] = [True, True]
    a[15] = ms3(0.0123456789)
    b = _meta("r-false")
    b[16] = ms3(0.0000005)
    w.add(a, b"\x00req\xff", b"")
    w.add(b, None, b"resp")
    assert await w.flush(20)
    await w.close()
    await eng.dispose()
    got = {r["request_id"]: r for r in rows(migrated)}
    assert (got["r-true"]["cache_hit"], got["r-true"]["streamed"]) == (True, True)
    assert (got["r-false"]["cache_hit"], got["r-false"]["streamed"]) == (False, False)
    assert got["r-true"]["request_body"] == b"\x00req\xff" and got["r-true"]["response_body"] == b""
    assert got["r-false"]["request_body"] is None and got["r-false"]["response_body"] == b"resp"
    assert got["r-true"]["client_request_id"] is None and got["r-true"]["ttft_ms"] is None
    assert got["r-true"]["latency_ms"] == 12.346 and got["r-false"]["ttft_ms"] == 0.001


async def test_batch_is_one_transaction_in_slices_and_a_bad_record_is_set_aside(migrated, tmp_path):
    """A batch is one transaction, executed SLICE rows at a time (the event loop runs between slices); a
    writer that has fallen behind sends the rest at once.  A record the database refuses (here a NULL
    request id) fails the whole transaction,
    then the batch goes in one by one: every other record is stored, the refused one kept in rejected/."""
    from helixagent.store import writer as wmod
    eng = make_engine(migrated)
    calls: list[int] = []
    commits: list[int] = []

    def on_exec(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO completions"):
            calls.append(len(parameters) if executemany else 1)

    sa.event.listen(eng.sync_engine, "before_cursor_execute", on_exec)
    sa.event.listen(eng.sync_engine, "commit", lambda conn: commits.append(1))
    w = RecordWriter(eng, str(tmp_path / "spool"), batch_size=500, flush_interval=0.05)
    await w.start()
    for i in range(200):
        w.add(_meta(f"ok{i:03d}"), None, b"r")
    assert await w.flush(20)
    assert calls == [32] * 6 + [8] and len(commits) == 1
    # fallen behind: a whole batch (batch_size) waits in the queue while this one is written
    calls.clear()
    behind = RecordWriter(eng, str(tmp_path / "spool2"), batch_size=100)   # not started: nothing drains it
    behind.queue.extend([(None, _meta("unused"), None, None)] * 100)
    assert await behind._insert([(_meta(f"c{i:03d}"), None, b"r") for i in range(150)])
    assert calls == [150]
    calls.clear()
    for i in range(200):
        w.add(_meta(None if i == 150 else f"b{i:03d}"), None, b"r")
    assert await w.flush(20)
    assert w.rejected == 1
    await w.close()
    await eng.dispose()
    # the slice holding the refused record fails the transaction (the slices before it roll back with it),
    # then one insert per record
    assert calls == [32] * 5 + [1] * 200
    ids = {r["request_id"] for r in rows(migrated)}
    assert len(ids) == 549 and "b149" in ids and "b151" in ids and None not in ids
    assert os.listdir(tmp_path / "spool" / "rejected")
    assert wmod.SLICE == 32


async def test_a_bug_building_rows_is_loud_not_a_database_outage(migrated, tmp_path):
    """Rows are built slice by slice inside the transaction; an exception there is the gateway's own bug:
    it propagates (the writer's cycle logs it) instead of marking the database unavailable."""
    eng = make_engine(migrated)
    w = RecordWriter(eng, str(tmp_path / "spool"))

    def broken(item):
        raise TypeError("bug")

    w._params = broken
    with pytest.raises(TypeError, match="bug"):
        await w._insert([(_meta("x1"), None, None)])
    assert w.db_ok and w.db_error is None
    await eng.dispose()


async def test_written_segments_are_unlinked_off_the_event_loop(migrated, tmp_path, monkeypatch):
    """A sealed journal segment whose records are all committed is deleted in a worker thread: unlinking a
    full 16 MiB segment takes milliseconds, which on the loop delayed every request in flight."""
    import threading

    from helixagent.store import spool as spool_mod
    from helixagent.store import writer as wmod
    monkeypatch.setattr(wmod, "SEGMENT_MAX_BYTES", 2000)   # a new segment every few records
    where: list[str] = []
    orig = spool_mod.Segment.release

    def release(self, unlink):
        if unlink:
            where.append(threading.current_thread().name)
        return orig(self, unlink)

    monkeypatch.setattr(spool_mod.Segment, "release", release)
    eng = make_engine(migrated)
    w = RecordWriter(eng, str(tmp_path / "spool"), flush_interval=0.02)
    await w.start()
    for i in range(40):
        w.add(_meta(f"s{i:03d}"), b"q" * 200, b"r" * 200)
        await asyncio.sleep(0.005)
    assert await w.flush(20)
    await w.close()
    await eng.dispose()
    assert len(rows(migrated)) == 40
    assert where and threading.main_thread().name not in where
    assert not [f for f in os.listdir(tmp_path / "spool") if f.endswith(".spool")]


def test_ms3_is_round_to_the_microsecond():
    import random

    from helixagent.millis import ms3
    rnd = random.Random(3)
    for s in [0.0, 1e-7, 4e-7, 0.0012344, 0.5, 59.9999994, 3600.25] + [rnd.random() * 10 for _ in range(20000)]:
        assert ms3(s) == round(s * 1000.0, 3), s
        assert ms3(-s) == -ms3(s)


async def test_queue_overflow_spools_not_drops(migrated, tmp_path):
    eng = make_engine(migrated)
    w = RecordWriter(eng, str(tmp_path / "spool"), queue_size=7, batch_size=5, flush_interval=0.05)
    await w.start()
    ids = [f"r{i:04d}" for i in range(200)]
    for rid in ids:           # far more than the queue holds, with no await in between
        w.add(_meta(rid), b"req", b"resp")
    assert w.overflowed > 0
    assert await w.flush(20)
    await w.close()
    await eng.dispose()
    assert sorted(r["request_id"] for r in rows(migrated)) == ids
    assert not [f for f in os.listdir(tmp_path / "spool") if f.endswith(".spool")]


async def test_spool_left_by_a_crash_is_replayed_in_order_and_torn_tail_skipped(migrated, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    # a previous process died: two segments, the second with a torn last frame and a damaged one
    seg1 = b"".join(encode_frame(_meta(f"a{i}"), None, b"x") for i in range(3))
    damaged = bytearray(encode_frame(_meta("b-damaged"), None, b"yy"))
    damaged[-1] ^= 0xFF
    seg2 = encode_frame(_meta("b0"), None, None) + bytes(damaged) + encode_frame(_meta("b1"), b"q", None)
    seg2 += encode_frame(_meta("b-torn"), None, b"z" * 100)[:-40]
    (spool / "00000000000000000001-1-000001.spool").write_bytes(seg1)
    (spool / "00000000000000000002-1-000001.spool").write_bytes(seg2)
    # and one record already in the database (a replay must not duplicate it)
    insert_rows(migrated, [row(dt.datetime.now(UTC), request_id="a1")])
    eng = make_engine(migrated)
    w = RecordWriter(eng, str(spool), flush_interval=0.05)
    await w.start()
    assert await w.flush(20)
    await w.close()
    await eng.dispose()
    got = [r["request_id"] for r in rows(migrated)]
    assert sorted(got) == ["a0", "a1", "a2", "b0", "b1"]
    assert not [f for f in os.listdir(spool) if f.endswith(".spool")]


async def test_unreachable_database_spools_then_replays(migrated, tmp_path):
    """The writer's engine points at a closed port first (down), then at the real database."""
    from support.servers import free_port
    bad = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    w = RecordWriter(bad, str(tmp_path / "spool"), flush_interval=0.02, retry_interval=0.05,
                     dialect=make_engine(migrated).dialect.name)
    await w.start()
    for i in range(50):
        w.add(_meta(f"d{i:03d}"), b"r", b"p")
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not w.db_ok and not w.queue:
            break
    assert not w.db_ok and not w.queue
    assert [f for f in os.listdir(tmp_path / "spool") if f.endswith(".spool")]
    good = make_engine(migrated)
    w.engine = good               # the database "comes back"
    for i in range(50, 60):
        w.add(_meta(f"d{i:03d}"), b"r", b"p")
    assert await w.flush(20)
    await w.close()
    await bad.dispose()
    await good.dispose()
    assert sorted(r["request_id"] for r in rows(migrated)) == [f"d{i:03d}" for i in range(60)]


async def test_shutdown_with_database_down_keeps_the_spool_for_next_start(migrated, tmp_path):
    from support.servers import free_port
    bad = make_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    dialect = make_engine(migrated).dialect.name
    w = RecordWriter(bad, str(tmp_path / "spool"), flush_interval=0.02, retry_interval=0.05, dialect=dialect)
    await w.start()
    for i in range(20):
        w.add(_meta(f"s{i:02d}"), None, None)
    await w.close(timeout=5)
    await bad.dispose()
    assert [f for f in os.listdir(tmp_path / "spool") if f.endswith(".spool")]
    good = make_engine(migrated)
    w2 = RecordWriter(good, str(tmp_path / "spool"), flush_interval=0.02)
    await w2.start()
    assert await w2.flush(20)
    await w2.close()
    await good.dispose()
    assert len(rows(migrated)) == 20
    assert not [f for f in os.listdir(tmp_path / "spool") if f.endswith(".spool")]


# -- encryption ------------------------------------------------------------------------------------------
def test_encryption_at_rest_rotation_and_tamper(db_url, tmp_path, make_gateway, fake_openai, monkeypatch, capsys):
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    gw = make_gateway(gw_cfg(db_url, tmp_path, fake_openai, encryption={"enabled": True}))
    ids = []
    for i in range(7):
        r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": f"topsecret{i} plaintext"}]})
        assert r.status_code == 200
        ids.append(r.headers["x-request-id"])
    flush(gw)
    recs = rows(db_url)
    assert len(recs) == 7
    for rec in recs:
        assert rec["enc_key_id"] == "k20200101"
        for col in ("request_body", "response_body"):
            assert b"topsecret" not in rec[col] and b"plaintext" not in rec[col] and b"echo:" not in rec[col]
    # the spool on disk holds no plaintext either
    for f in (tmp_path / "spool").glob("*.spool"):
        assert b"topsecret" not in f.read_bytes()
    kr1 = Keyring(parse_keys(K1, "t"))

    async def get(rid, kr):
        eng = make_engine(db_url)
        try:
            return await queries.get_record(eng, kr, rid)
        finally:
            await eng.dispose()

    rec = asyncio.run(get(ids[0], kr1))
    assert orjson.loads(rec["request_body"])["messages"][0]["content"] == "topsecret0 plaintext"
    # rotate: a new active key; old rows stay readable; `encryption rotate` re-encrypts them in batches
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", f"{K1},{K2}")
    cfgfile = tmp_path / "enc.yaml"
    cfgfile.write_text(f"database: {{url: '{db_url}'}}\nencryption: {{enabled: true}}\n")
    assert cli.main(["encryption", "rotate", "-c", str(cfgfile), "--batch-size", "3"]) == 0
    assert "re-encrypted 7 record(s) to key k2-new" in capsys.readouterr().out
    assert {r["enc_key_id"] for r in rows(db_url)} == {"k2-new"}
    kr2_only = Keyring(parse_keys(K2, "t"))   # the old key can now be retired
    for i, rid in enumerate(ids):
        rec = asyncio.run(get(rid, kr2_only))
        assert orjson.loads(rec["request_body"])["messages"][0]["content"] == f"topsecret{i} plaintext"
    # a flipped byte is detected
    eng = make_sync_engine(db_url)
    try:
        with eng.begin() as conn:
            blob = bytearray(conn.execute(sa.select(C.c.response_body).where(C.c.request_id == ids[1])).scalar())
            blob[20] ^= 0x01
            conn.execute(C.update().where(C.c.request_id == ids[1]).values(response_body=bytes(blob)))
            # and a ciphertext moved to another row is detected too (AAD binds it to its row)
            other = conn.execute(sa.select(C.c.request_body).where(C.c.request_id == ids[3])).scalar()
            conn.execute(C.update().where(C.c.request_id == ids[2]).values(request_body=other))
    finally:
        eng.dispose()
    with pytest.raises(TamperedRecord, match="response_body failed authentication"):
        asyncio.run(get(ids[1], kr2_only))
    with pytest.raises(TamperedRecord, match="request_body"):
        asyncio.run(get(ids[2], kr2_only))
    assert cli.main(["records", "show", ids[1], "-c", str(cfgfile)]) == 1
    assert "failed authentication" in capsys.readouterr().err
    # rotating again with a newer key reports the tampered rows and leaves them as they are
    K3 = "k3:" + base64.b64encode(b"3" * 32).decode()
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", f"{K2},{K3}")
    assert cli.main(["encryption", "rotate", "-c", str(cfgfile)]) == 1
    err = capsys.readouterr().err
    assert ids[1] in err and ids[2] in err
    by_key = {r["request_id"]: r["enc_key_id"] for r in rows(db_url)}
    assert by_key[ids[1]] == by_key[ids[2]] == "k2-new"
    assert all(by_key[i] == "k3" for i in ids if i not in (ids[1], ids[2]))


def test_rotate_encrypts_rows_stored_in_the_clear(migrated, tmp_path, monkeypatch):
    insert_rows(migrated, [row(dt.datetime.now(UTC), request_id=f"c{i}", request_body=b'{"q":"clear"}',
                               response_body=b'{"a":"clear"}') for i in range(4)])
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(f"database: {{url: '{migrated}'}}\nencryption: {{enabled: true}}\n")
    assert cli.main(["encryption", "rotate", "-c", str(cfgfile)]) == 0
    recs = rows(migrated)
    assert all(r["enc_key_id"] == "k20200101" and b"clear" not in r["request_body"] for r in recs)


def test_encryption_without_key_fails_at_startup(monkeypatch, tmp_path):
    from helixagent.app import create_app
    monkeypatch.delenv("HELIXAGENT_ENCRYPTION_KEYS", raising=False)
    cfg = load_config_dict({"database": {"url": f"sqlite:///{tmp_path}/x.db", "spool_dir": str(tmp_path / "s")},
                            "encryption": {"enabled": True}})
    with pytest.raises(ConfigError, match="encryption.enabled is true but no key is configured.*"
                                          "HELIXAGENT_ENCRYPTION_KEYS.*encryption.key_file"):
        create_app(cfg)
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", "k1:" + base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="AES-256 needs 32"):
        create_app(cfg)


def test_key_file_and_age_warning(tmp_path, monkeypatch, caplog):
    from helixagent.store.record import RecordStore, keyring_for
    monkeypatch.delenv("HELIXAGENT_ENCRYPTION_KEYS", raising=False)
    kf = tmp_path / "keys"
    kf.write_text("# old key\n" + "old:" + base64.b64encode(b"o" * 32).decode() + ":2020-01-01\n")
    cfg = load_config_dict({"database": {"url": f"sqlite:///{tmp_path}/x.db", "spool_dir": str(tmp_path / "s")},
                            "encryption": {"enabled": True, "key_file": str(kf), "key_rotation_days": 30}})
    kr = keyring_for(cfg)
    assert kr.active_id == "old" and kr.active.age_days() > 30
    store = RecordStore(cfg, kr)
    with caplog.at_level(logging.WARNING, "helixagent.store"):
        store.check_key_age()
    assert "older" in caplog.text or "days old" in caplog.text
    assert "encryption.key_rotation_days" in caplog.text


# -- retention -------------------------------------------------------------------------------------------
def test_purge_command_deletes_old_rows_in_batches(migrated, capsys):
    now = dt.datetime.now(UTC)
    old = [row(now - dt.timedelta(days=100 + i % 5)) for i in range(25)]
    new = [row(now - dt.timedelta(days=i % 80)) for i in range(10)]
    insert_rows(migrated, old + new)
    args = ["--database-url", migrated]
    assert cli.main(["purge", "--older-than", "90d", "--dry-run", *args]) == 0
    assert "would delete 25 record(s)" in capsys.readouterr().out
    assert cli.main(["purge", "--older-than", "90d", "--batch-size", "4", "--yes", *args]) == 0
    assert "deleted 25 record(s)" in capsys.readouterr().out
    assert sorted(r["request_id"] for r in rows(migrated)) == sorted(r["request_id"] for r in new)
    assert cli.main(["purge", "--older-than", "soon", *args]) == 1


def test_gateway_purge_job(db_url, tmp_path, make_gateway, fake_openai):
    migrate.upgrade(db_url)
    now = dt.datetime.now(UTC)
    insert_rows(db_url, [row(now - dt.timedelta(days=40)) for _ in range(5)] + [row(now, request_id="keep")])
    make_gateway(gw_cfg(db_url, tmp_path, fake_openai, retention={"days": 30, "purge_interval": "50ms",
                                                                  "batch_size": 2}))
    from support.servers import wait_until
    assert wait_until(lambda: len(rows(db_url)) == 1, timeout=15)
    assert rows(db_url)[0]["request_id"] == "keep"


# -- usage -----------------------------------------------------------------------------------------------
class RoleAuth:
    """Stand-in for the keys feature: tokens name an identity."""

    IDS = {"admin": Identity(key_id="k-admin", role="admin"),
           "alice": Identity(key_id="k-alice", user_id="alice", application="app1", role="user"),
           "bob": Identity(key_id="k-bob", user_id="bob", application="app2", role="user"),
           "svc": Identity(key_id="k-svc", role="user")}

    open = False

    async def identify(self, token):
        if token not in self.IDS:
            raise GatewayError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        return self.IDS[token]

    async def authorize(self, token, action):
        return await self.identify(token)


def _usage_rows():
    d1 = dt.datetime(2025, 3, 1, 10, tzinfo=UTC)
    d2 = dt.datetime(2025, 3, 2, 23, 59, tzinfo=UTC)
    return [
        row(d1, user_id="alice", application="app1", key_id="k-alice", provider="openai", model="gpt-4o",
            prompt_tokens=100, completion_tokens=50, total_tokens=150, cost=0.25),
        row(d1, user_id="alice", application="app1", key_id="k-alice", provider="anthropic", model="claude",
            prompt_tokens=10, completion_tokens=5, total_tokens=15, cost=0.5, status=502, error_type="upstream_5xx"),
        row(d2, user_id="bob", application="app2", key_id="k-bob", provider="openai", model="gpt-4o",
            prompt_tokens=1, completion_tokens=2, total_tokens=3, cost=0.125, cache_hit=True),
        row(d2, user_id=None, key_id="k-svc", provider="openai", model="gpt-4o-mini", prompt_tokens=7,
            completion_tokens=0, total_tokens=7, cost=0),
        row(dt.datetime(2025, 4, 1, tzinfo=UTC), user_id="alice", provider="openai", model="gpt-4o"),  # outside
    ]


def test_usage_api_groups_and_scopes(db_url, tmp_path, make_gateway, fake_openai):
    migrate.upgrade(db_url)
    insert_rows(db_url, _usage_rows())
    gw = make_gateway(gw_cfg(db_url, tmp_path, fake_openai))
    gw.app.services["auth"] = RoleAuth()

    def get(token, **params):
        params.setdefault("from", "2025-03-01")
        params.setdefault("to", "2025-03-31")
        return httpx.get(gw.url + "/v1/usage", params=params, headers={"authorization": f"Bearer {token}"})

    r = get("admin", group_by="day").json()
    assert [d["group"] for d in r["data"]] == ["2025-03-01", "2025-03-02"]
    assert r["data"][0] == {"group": "2025-03-01", "requests": 2, "errors": 1, "prompt_tokens": 110,
                            "completion_tokens": 55, "total_tokens": 165, "cost": 0.75, "cache_hits": 0}
    assert r["total"]["requests"] == 4 and r["total"]["cost"] == 0.875 and r["scope"] == "all"
    by_provider = {d["group"]: d for d in get("admin", group_by="provider").json()["data"]}
    assert by_provider["openai"]["requests"] == 3 and by_provider["anthropic"]["errors"] == 1
    by_model = {d["group"]: d["total_tokens"] for d in get("admin", group_by="model").json()["data"]}
    assert by_model == {"claude": 15, "gpt-4o": 153, "gpt-4o-mini": 7}
    by_user = {d["group"]: d["requests"] for d in get("admin", group_by="user").json()["data"]}
    assert by_user == {None: 1, "alice": 2, "bob": 1}
    by_app = {d["group"]: d["requests"] for d in get("admin", group_by="application").json()["data"]}
    assert by_app == {None: 1, "app1": 2, "app2": 1}
    assert get("admin", group_by="user", user_id="bob").json()["total"]["requests"] == 1
    # a user sees only their own usage
    mine = get("alice", group_by="user").json()
    assert [d["group"] for d in mine["data"]] == ["alice"] and mine["total"]["requests"] == 2
    assert mine["scope"] == "user"
    assert get("bob", group_by="provider").json()["total"] == {
        "requests": 1, "errors": 0, "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
        "cost": 0.125, "cache_hits": 1}
    forbidden = get("alice", user_id="bob")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"
    svc = get("svc", group_by="model").json()   # a key without a user: its own key's usage
    assert svc["scope"] == "key" and svc["total"]["requests"] == 1
    # the end date includes that whole day
    assert get("admin", **{"from": "2025-03-02", "to": "2025-03-02"}).json()["total"]["requests"] == 2
    assert get("admin", **{"from": "2025-03-02T00:00:00Z", "to": str(int(dt.datetime(
        2025, 3, 3, tzinfo=UTC).timestamp()))}).json()["total"]["requests"] == 2
    # bad input: a clear error in the OpenAI shape
    for params, param in [({"group_by": "week"}, "group_by"), ({"from": "yesterday"}, "from"),
                          ({"from": "2025-03-05", "to": "2025-03-01"}, "from"), ({"frm": "x"}, "frm")]:
        bad = get("admin", **params)
        assert bad.status_code == 400, params
        assert bad.json()["error"]["param"] == param and bad.json()["error"]["type"] == "invalid_request_error"
    assert get("nobody").status_code == 401


def test_usage_cli(migrated, capsys):
    insert_rows(migrated, _usage_rows())
    args = ["--database-url", migrated, "--from", "2025-03-01", "--to", "2025-03-31"]
    assert cli.main(["usage", "--group-by", "provider", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["provider", "requests", "errors", "prompt_tokens", "completion_tokens",
                              "total_tokens", "cost", "cache_hits"]
    table = {ln.split()[0]: ln.split() for ln in out[3:] if not ln.startswith("-")}
    assert table["openai"][1:3] == ["3", "0"] and table["anthropic"][1:3] == ["1", "1"]
    assert table["TOTAL"][1] == "4" and table["TOTAL"][6] == "0.875000"
    assert cli.main(["usage", "--json", "--group-by", "user", "--user", "alice", *args]) == 0
    assert orjson.loads(capsys.readouterr().out)["total"]["requests"] == 2
