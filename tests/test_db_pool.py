"""PostgreSQL pool settings (database.max_open_conns / max_idle_conns / conn_max_lifetime / pool_timeout)
and the read replica (database.read_url) for the usage API and the CLI's report, on real servers.

Connections are counted in pg_stat_activity by application_name: a unique one per test on the shared
server (set in the URL's libpq options), or the gateway's own names on a private server no one else uses."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg2
import pytest
import sqlalchemy as sa
import yaml

from conftest import need_postgres
from support.pg import PrivatePostgres, fresh_schema
from support.servers import free_port, wait_until

from helixagent import cli
from helixagent.config import ConfigError, load_config_dict
from helixagent.store import migrate
from helixagent.store.db import engine_for, make_sync_engine, pool_kwargs
from helixagent.store.schema import completions as C

UTC = dt.timezone.utc
DAY = dt.datetime(2025, 3, 1, 10, tzinfo=UTC)
PARAMS = {"from": "2025-03-01", "to": "2025-03-31", "group_by": "provider"}


# -- helpers ---------------------------------------------------------------------------------------------
def _dsn(url: str) -> str:
    return url.split("?")[0]


def with_app_name(url: str, name: str) -> str:
    """Add ``-c application_name=<name>`` to the URL's libpq options (the schema URLs already have some)."""
    if "options=" in url:
        return url.replace("options=", f"options=-capplication_name%3D{name}%20", 1)
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-capplication_name%3D{name}"


def count_conns(dsn: str, app: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


class Sampler:
    """Counts the server connections named ``app`` every few milliseconds in a thread; ``peak`` is the
    most seen at once."""

    def __init__(self, dsn: str, app: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.app = app
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app,))
                self.peak = max(self.peak, int(cur.fetchone()[0]))
                self.samples += 1
                time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join(5)
        self.conn.close()
        return self.peak


def row(provider: str, **kw):
    d = {"request_id": uuid.uuid4().hex, "client_request_id": None, "created_at": DAY, "user_id": None,
         "application": None, "key_id": None, "provider": provider, "model": "gpt-4o-mini", "endpoint": "chat",
         "status": 200, "error_type": None, "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
         "cost": 0.001, "latency_ms": 12.0, "ttft_ms": None, "cache_hit": False, "streamed": False,
         "request_body": None, "response_body": None, "enc_key_id": None}
    d.update(kw)
    return d


def insert(url: str, rows: list[dict]) -> None:
    eng = make_sync_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(C.insert(), rows)
    finally:
        eng.dispose()


def ids(url: str) -> set[str]:
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(C.c.request_id))}
    finally:
        eng.dispose()


def providers_in(body: dict) -> dict[str, int]:
    return {d["group"]: d["requests"] for d in body["data"]}


@pytest.fixture
def schema():
    """A fresh schema on the shared server, by URL; each call of the returned function makes another."""
    gens = []

    def make() -> str:
        gen = fresh_schema(need_postgres())
        gens.append(gen)
        return next(gen)
    yield make
    for g in gens:
        g.close()


@pytest.fixture(scope="module")
def private_pg():
    pg = PrivatePostgres()   # raises (fails the test) when the server binaries are missing: no silent skip
    yield pg
    pg.close()


def db_cfg(**kw):
    return load_config_dict({"database": kw}).database


def gw_cfg(tmp_path: Path, url: str, fake=None, **db):
    cfg = {"database": {"url": url, "spool_dir": str(tmp_path / "spool"), "auto_migrate": True,
                        "flush_interval": "50ms", **db},
           "providers": [fake.provider() if fake is not None else {"name": "mock", "type": "mock"}]}
    return cfg


# -- mapping and validation ------------------------------------------------------------------------------
def test_pool_keys_map_onto_the_sqlalchemy_pool(tmp_path):
    assert pool_kwargs(3, 3, None, 10.0) == {"pool_size": 3, "max_overflow": 0, "pool_recycle": -1,
                                             "pool_timeout": 10.0}
    assert pool_kwargs(5, 2, 300.0, 1.5) == {"pool_size": 2, "max_overflow": 3, "pool_recycle": 300.0,
                                             "pool_timeout": 1.5}
    # precedence: neither given -> 20 open / 10 kept; pool_size (the older name of max_idle_conns) alone ->
    # twice as many open, as before; max_open_conns alone -> all kept
    assert db_cfg().pool_limits() == (20, 10)
    assert db_cfg(pool_size=4).pool_limits() == (8, 4)
    assert db_cfg(max_idle_conns=4).pool_limits() == (8, 4)
    assert db_cfg(max_open_conns=3).pool_limits() == (3, 3)
    assert db_cfg(max_open_conns=6, pool_size=2).pool_limits() == (6, 2)
    c = db_cfg(max_open_conns=5, max_idle_conns=2, conn_max_lifetime="5m", pool_timeout="1500ms")
    assert (c.pool_limits(), c.conn_max_lifetime, c.pool_timeout) == ((5, 2), 300.0, 1.5)
    eng = engine_for(c, "postgresql://u:pw@127.0.0.1:1/x")
    p = eng.pool
    assert (p.size(), p._max_overflow, p._recycle, p._timeout) == (2, 3, 300.0, 1.5)
    # a SQLite file takes the same pool; an in-memory database has its single connection
    sq = engine_for(c, f"sqlite:///{tmp_path}/x.db").pool
    assert (sq.size(), sq._max_overflow, sq._recycle, sq._timeout) == (2, 3, 300.0, 1.5)
    assert type(engine_for(c, "sqlite://").pool).__name__ == "StaticPool"


@pytest.mark.parametrize("db,keys", [
    ({"pool_size": 4, "max_idle_conns": 5}, ["database.pool_size", "database.max_idle_conns"]),
    ({"max_open_conns": 2, "max_idle_conns": 3}, ["database.max_idle_conns", "database.max_open_conns"]),
    ({"max_open_conns": 2, "pool_size": 3}, ["database.pool_size", "database.max_open_conns"]),
    ({"max_open_conns": 0}, ["database.max_open_conns"]),
    ({"max_idle_conns": 0}, ["database.max_idle_conns"]),
    ({"conn_max_lifetime": "0s"}, ["database.conn_max_lifetime"]),
    ({"conn_max_lifetime": "soon"}, ["database.conn_max_lifetime"]),
    ({"pool_timeout": 0}, ["database.pool_timeout"]),
    ({"max_open_conns": "three"}, ["database.max_open_conns"]),
])
def test_pool_conflicts_name_the_keys(db, keys):
    with pytest.raises(ConfigError) as ei:
        load_config_dict({"database": db})
    for k in keys:
        assert k in str(ei.value), (k, str(ei.value))


def test_an_equal_pool_size_and_max_idle_conns_are_accepted_and_blank_read_url_is_none():
    c = db_cfg(pool_size=4, max_idle_conns=4, read_url="")
    assert c.pool_limits() == (8, 4) and c.read_url is None


def test_read_url_is_checked_and_its_password_is_a_secret(tmp_path):
    from helixagent.preflight import check_runtime
    from helixagent.redaction import config_secrets
    cfg = load_config_dict({"database": {"url": f"sqlite:///{tmp_path}/x.db", "spool_dir": str(tmp_path / "s"),
                                         "read_url": "mysql://u:topsecretpw@db/x"}})
    problems = [p for p in check_runtime(cfg) if "read_url" in p]
    assert problems and "topsecretpw" not in problems[0] and "unsupported" in problems[0], problems
    assert "topsecretpw" in config_secrets(cfg)


# -- the pool on a real PostgreSQL -----------------------------------------------------------------------
async def _concurrent_reads(eng, n: int, sleep: float = 0.02) -> list[int]:
    async def one() -> int:
        async with eng.connect() as conn:
            return int((await conn.execute(sa.text(f"SELECT 1 FROM pg_sleep({sleep})"))).scalar_one())
    return await asyncio.gather(*(one() for _ in range(n)))


def test_max_open_conns_caps_server_connections_under_50_concurrent_reads(schema):
    base = schema()
    app = "hxpool_" + uuid.uuid4().hex[:10]
    url = with_app_name(base, app)
    db = db_cfg(url=url, max_open_conns=3, max_idle_conns=1, pool_timeout="60s")
    sampler = Sampler(_dsn(base), app)

    async def go() -> tuple[list[int], int]:
        eng = engine_for(db)
        try:
            got = await _concurrent_reads(eng, 50)
            # the connections beyond max_idle_conns are closed as they come back (the server notices a
            # moment later)
            for _ in range(250):
                if count_conns(_dsn(base), app) <= 1:
                    break
                await asyncio.sleep(0.02)
            return got, count_conns(_dsn(base), app)
        finally:
            await eng.dispose()

    got, after = asyncio.run(go())
    peak = sampler.stop()
    assert got == [1] * 50
    assert sampler.samples > 0
    assert peak <= 3, f"{peak} server connections were open at once with max_open_conns: 3"
    assert peak >= 2, f"the 50 reads never ran side by side ({peak} connection at most)"
    assert after == 1, f"max_idle_conns: 1 keeps one connection after the burst, found {after}"


def test_gateway_usage_api_50_concurrent_reads_stay_within_max_open_conns(private_pg, tmp_path, make_gateway):
    # a private server: only this gateway connects, under its own application_name ("helixagent" for the
    # records pool that serves GET /v1/usage, "helixagent-keys" for the keys)
    url = private_pg.url
    migrate.upgrade(url)
    insert(url, [row("openai") for _ in range(200)])
    gw = make_gateway(gw_cfg(tmp_path, url, max_open_conns=3, pool_timeout="60s"))
    sampler = Sampler(url, "helixagent")

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60,
                                     limits=httpx.Limits(max_connections=50)) as client:
            return await asyncio.gather(*(client.get("/v1/usage", params=PARAMS) for _ in range(50)))

    rs = asyncio.run(load())
    peak = sampler.stop()
    assert [r.status_code for r in rs] == [200] * 50, [r.text for r in rs if r.status_code != 200][:2]
    assert all(providers_in(r.json()) == {"openai": 200} for r in rs)
    assert 1 <= peak <= 3, peak
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("TRUNCATE completions")
    conn.close()


def test_conn_max_lifetime_recycles_connections(schema):
    url = schema()

    async def pids(db, pause: float) -> tuple[int, int, int]:
        eng = engine_for(db)
        try:
            async def pid() -> int:
                async with eng.connect() as conn:
                    return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
            a = await pid()
            b = await pid()
            await asyncio.sleep(pause)
            return a, b, await pid()
        finally:
            await eng.dispose()

    a, b, c = asyncio.run(pids(db_cfg(url=url, max_open_conns=1, conn_max_lifetime="1s"), 1.3))
    assert a == b, "a connection younger than conn_max_lifetime is reused"
    assert c != a, "a connection older than conn_max_lifetime is replaced by a new server connection"
    a, b, c = asyncio.run(pids(db_cfg(url=url, max_open_conns=1), 1.3))
    assert a == b == c, "without conn_max_lifetime the idle connection is kept"


def test_pool_wait_timeout_is_a_clear_error(schema, tmp_path, make_gateway):
    url = schema()
    db = db_cfg(url=url, max_open_conns=1, pool_timeout="300ms")

    async def engine_level() -> str:
        eng = engine_for(db)
        try:
            async with eng.connect():
                with pytest.raises(sa.exc.TimeoutError) as ei:
                    async with eng.connect():
                        pass
            async with eng.connect() as conn:   # the pool works again once the connection is back
                assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
            return str(ei.value)
        finally:
            await eng.dispose()
    assert "timed out" in asyncio.run(engine_level())

    # the usage API: a 503 in the OpenAI error shape naming the keys, not a hang
    migrate.upgrade(url)
    gw = make_gateway(gw_cfg(tmp_path, url, max_open_conns=1, pool_timeout="300ms"))
    store = gw.app.services["records"]
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with store.engine.connect():
            held.set()
            await release.wait()

    async def start_hold() -> None:
        asyncio.get_running_loop().create_task(hold())
        await held.wait()

    gw.run(start_hold())
    try:
        r = httpx.get(gw.url + "/v1/usage", params=PARAMS, timeout=30)
    finally:
        gw.run(_set(release))
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "database_pool_exhausted"
    assert "database.max_open_conns: 1" in err["message"] and "database.pool_timeout (0.3s)" in err["message"]
    assert httpx.get(gw.url + "/v1/usage", params=PARAMS, timeout=30).status_code == 200


async def _set(ev: asyncio.Event) -> None:
    ev.set()


# -- the read replica ------------------------------------------------------------------------------------
def test_reports_read_the_replica_and_writes_go_to_the_primary(schema, tmp_path, make_gateway, fake_openai,
                                                               capsys, caplog):
    primary, replica = schema(), schema()
    for u in (primary, replica):
        migrate.upgrade(u)
    insert(primary, [row("openai"), row("openai")])
    insert(replica, [row("anthropic"), row("anthropic"), row("anthropic")])
    # a password in the replica URL (the shared server trusts local connections and ignores it)
    secret = "replicaPw-" + uuid.uuid4().hex[:8]
    replica_pw = replica.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    assert secret in replica_pw
    caplog.set_level(logging.DEBUG)
    gw = make_gateway(gw_cfg(tmp_path, primary, fake_openai, read_url=replica_pw))

    r = httpx.get(gw.url + "/v1/usage", params=PARAMS)
    assert r.status_code == 200 and r.headers["x-helixagent-read-source"] == "replica"
    assert providers_in(r.json()) == {"anthropic": 3}

    # a completion's record goes to the primary only
    before_replica = ids(replica)
    c = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini",
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert c.status_code == 200, c.text
    rid = c.headers["x-helixagent-request-id"]
    assert gw.run(gw.app.services["records"].writer.flush(20), timeout=30)
    assert rid in ids(primary) and ids(replica) == before_replica

    ready = httpx.get(gw.url + "/readyz").json()
    assert ready["checks"]["database_replica"] == "ok"

    # the CLI report reads the replica named by the config; --database-url alone reads that database
    cfgfile = tmp_path / "helix.yaml"
    cfgfile.write_text(yaml.safe_dump({"database": {"url": primary, "read_url": replica_pw}}))
    args = ["--from", "2025-03-01", "--to", "2025-03-31", "--group-by", "provider", "--json"]
    capsys.readouterr()
    assert cli.main(["usage", "-c", str(cfgfile), *args]) == 0
    out = capsys.readouterr()
    assert providers_in(json.loads(out.out)) == {"anthropic": 3}
    assert "read from: replica" in out.err and secret not in out.err
    assert cli.main(["usage", "--database-url", primary, *args]) == 0
    assert providers_in(json.loads(capsys.readouterr().out)) == {"openai": 2}
    assert cli.main(["usage", "--database-url", primary, "--read-url", replica, *args]) == 0
    assert providers_in(json.loads(capsys.readouterr().out)) == {"anthropic": 3}

    # maintenance writes (purge) go to the primary even with a read_url configured
    assert cli.main(["purge", "--older-than", "1d", "--yes", "-c", str(cfgfile)]) == 0
    assert ids(primary) == {rid} and ids(replica) == before_replica
    assert secret not in caplog.text


def test_replica_down_falls_back_to_the_primary_with_a_warning(schema, tmp_path, make_gateway, capsys, caplog):
    primary = schema()
    migrate.upgrade(primary)
    insert(primary, [row("openai")])
    secret = "downPw-" + uuid.uuid4().hex[:8]
    closed = f"postgresql://postgres:{secret}@127.0.0.1:{free_port()}/replica"
    caplog.set_level(logging.WARNING, logger="helixagent.store")
    gw = make_gateway(gw_cfg(tmp_path, primary, read_url=closed, retry_interval="200ms"))

    for _ in range(3):
        r = httpx.get(gw.url + "/v1/usage", params=PARAMS)
        assert r.status_code == 200, r.text
        assert r.headers["x-helixagent-read-source"] == "primary-fallback"
        assert providers_in(r.json()) == {"openai": 1}
    warnings = [rec.getMessage() for rec in caplog.records if "read replica" in rec.getMessage()]
    assert len(warnings) == 1, warnings   # one line when it goes away, not one per request
    assert "unavailable" in warnings[0] and "127.0.0.1" in warnings[0] and secret not in warnings[0]

    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 200, ready.text   # a detail, never fatal
    assert ready.json()["checks"]["database_replica"].startswith("unavailable")
    assert ready.json()["failing"] == [] and secret not in ready.text

    cfgfile = tmp_path / "helix.yaml"
    cfgfile.write_text(yaml.safe_dump({"database": {"url": primary, "read_url": closed}}))
    capsys.readouterr()
    assert cli.main(["usage", "-c", str(cfgfile), "--from", "2025-03-01", "--to", "2025-03-31", "--json",
                     "--group-by", "provider"]) == 0
    out = capsys.readouterr()
    assert providers_in(json.loads(out.out)) == {"openai": 1}
    assert "primary-fallback" in out.err and secret not in out.err
    assert secret not in caplog.text


def test_private_replica_goes_away_and_comes_back(private_pg, schema, tmp_path, make_gateway, caplog):
    primary = schema()
    migrate.upgrade(primary)
    insert(primary, [row("openai")])
    # the private server plays the replica, with data of its own
    conn = psycopg2.connect(private_pg.url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS replica")
        cur.execute("CREATE DATABASE replica")
    conn.close()
    replica = private_pg.url.rsplit("/", 1)[0] + "/replica"
    migrate.upgrade(replica)
    insert(replica, [row("anthropic"), row("anthropic")])
    caplog.set_level(logging.WARNING, logger="helixagent.store")
    gw = make_gateway(gw_cfg(tmp_path, primary, read_url=replica, retry_interval="100ms"))

    def usage() -> tuple[str, dict[str, int]]:
        r = httpx.get(gw.url + "/v1/usage", params=PARAMS, timeout=30)
        assert r.status_code == 200, r.text
        return r.headers["x-helixagent-read-source"], providers_in(r.json())

    assert usage() == ("replica", {"anthropic": 2})
    private_pg.stop("immediate")
    try:
        assert usage() == ("primary-fallback", {"openai": 1})
        time.sleep(0.2)   # past retry_interval: the replica is tried again, and is still away
        assert usage() == ("primary-fallback", {"openai": 1})
        assert httpx.get(gw.url + "/readyz").json()["checks"]["database_replica"].startswith("unavailable")
    finally:
        private_pg.start()
    assert wait_until(lambda: usage()[0] == "replica", timeout=20, interval=0.1)
    assert usage() == ("replica", {"anthropic": 2})
    msgs = [rec.getMessage() for rec in caplog.records if "read replica" in rec.getMessage()]
    assert any("unavailable" in m for m in msgs) and any("answers again" in m for m in msgs), msgs
