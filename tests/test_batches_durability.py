"""A local batch of 1,000 lines on the real PostgreSQL survives a SIGKILL of its gateway process mid-way:
a restarted instance (same spool directory) and a second instance joining share the rest without running a
line twice, and afterwards every line has exactly one result and exactly one completion record."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
import yaml

from conftest import need_postgres
from support.pg import fresh_schema
from support.servers import free_port, wait_until

SRC = str(Path(__file__).resolve().parent.parent / "src")
MASTER = "master-durability-key-0123456789"
H = {"authorization": f"Bearer {MASTER}"}
N = 1000
pytestmark = pytest.mark.slow


def _serve(cfg_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("HELIXAGENT_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "-c", str(cfg_path), "--port", str(port)],
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    def ok() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    assert wait_until(ok, timeout=30, interval=0.1), log.read_text()[-3000:]


def _cfg(path: Path, db_url: str, spool: Path, provider: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump({
        "auth": {"master_key": MASTER},
        "providers": [provider],
        "database": {"url": db_url, "spool_dir": str(spool), "auto_migrate": True, "flush_interval": "20ms"},
        "batches": {"mode": "local", "local_concurrency": 8, "lease": "2s", "poll_interval": "50ms"},
        "logging": {"level": "warning"},
    }))


def _batch(url: str, bid: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/batches/{bid}", headers=H, timeout=5)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_sigkill_mid_batch_then_restart_and_a_second_instance(tmp_path: Path, fake_openai: Any) -> None:
    from fakes.openai_upstream import Fault
    gen = fresh_schema(need_postgres())
    db_url = next(gen)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        spool_a, spool_c = tmp_path / "spool-a", tmp_path / "spool-c"
        cfg_a, cfg_c = tmp_path / "a.yaml", tmp_path / "c.yaml"
        prov = fake_openai.provider(max_retries=0, timeout_ms=30000)
        _cfg(cfg_a, db_url, spool_a, prov)
        _cfg(cfg_c, db_url, spool_c, prov)
        log = tmp_path / "gw.log"
        port_a = free_port()
        url_a = f"http://127.0.0.1:{port_a}"
        a = _serve(cfg_a, port_a, log)
        procs.append(a)
        _healthy(url_a, a, log)
        lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"number {i}"}]}}
                 for i in range(N)]
        content = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        r = httpx.post(url_a + "/v1/files", headers=H, files={"file": ("in.jsonl", content)},
                       data={"purpose": "batch"}, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(url_a + "/v1/batches", headers=H, timeout=30,
                       json={"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
                             "completion_window": "24h"})
        assert r.status_code == 200, r.text
        bid = r.json()["id"]
        assert wait_until(lambda: _batch(url_a, bid)["request_counts"]["completed"] >= 250, timeout=60, interval=0.02)
        fake_openai.sticky = Fault(delay=20.0)             # the upstream stalls: lines are surely in flight
        assert wait_until(lambda: _batch_db(db_url, bid)["running"] == 8, timeout=20, interval=0.02)
        os.kill(a.pid, signal.SIGKILL)                       # mid-way, with lines in flight
        a.wait(10)
        fake_openai.sticky = None
        before = _batch_db(db_url, bid)
        assert before["running"] == 8 and before["succeeded"] < N, before
        # A restarted (its spool: the records it journaled are replayed) and C joining with its own spool
        port_b, port_c = free_port(), free_port()
        b = _serve(cfg_a, port_b, log)
        c = _serve(cfg_c, port_c, log)
        procs += [b, c]
        url_b, url_c = f"http://127.0.0.1:{port_b}", f"http://127.0.0.1:{port_c}"
        _healthy(url_b, b, log)
        _healthy(url_c, c, log)
        assert wait_until(lambda: _batch(url_c, bid)["status"] == "completed", timeout=120, interval=0.1), \
            _batch(url_c, bid)
        got = _batch(url_b, bid)
        assert got["request_counts"] == {"total": N, "completed": N, "failed": 0}
        out = [orjson.loads(x) for x in httpx.get(f"{url_b}/v1/files/{got['output_file_id']}/content", headers=H,
                                                  timeout=30).content.splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(f"line-{i}" for i in range(N))  # each exactly once
        assert all(x["response"]["status_code"] == 200 for x in out)
        rids = [x["response"]["request_id"] for x in out]
        assert len(set(rids)) == N
        after = _batch_db(db_url, bid)
        assert after["succeeded"] == N and after["reclaimed"] == 8, after   # the killed one's lines ran again
        # upstream: every line once, plus once more for each of the 8 cut by the kill -- no other line twice
        assert sum(1 for call in fake_openai.calls if call["path"].endswith("/chat/completions")) == N + 8
        # exactly one completion record per line (B and C flush theirs; A's journal is replayed by B)
        def records() -> dict[str, int]:
            return _records(db_url, rids)
        assert wait_until(lambda: sum(records().values()) >= N, timeout=60, interval=0.2), len(records())
        time.sleep(0.5)  # let a late (duplicate) write land, if any could
        recs = records()
        assert set(recs) == set(rids) and set(recs.values()) == {1}
        assert _batch_record_count(db_url, "b" + bid.split("_", 1)[1]) == N  # no record under another id
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        gen.close()


def _engine(db_url: str) -> sa.Engine:
    return sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1))


def _batch_db(db_url: str, bid: str) -> dict[str, int]:
    eng = _engine(db_url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(sa.text("select state, count(*) from batch_lines where batch_id = :b group by state"),
                                {"b": bid}).all()
            re = conn.execute(sa.text("select count(*) from batch_lines where batch_id = :b and attempts > 1"),
                              {"b": bid}).scalar_one()
    finally:
        eng.dispose()
    out = {"pending": 0, "running": 0, "succeeded": 0, "errored": 0}
    out.update({s: int(n) for s, n in rows})
    out["reclaimed"] = int(re)
    return out


def _records(db_url: str, rids: list[str]) -> dict[str, int]:
    eng = _engine(db_url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(sa.text("select request_id, count(*) from completions where request_id = any(:r) "
                                        "group by request_id"), {"r": rids}).all()
    finally:
        eng.dispose()
    return {r: int(n) for r, n in rows}


def _batch_record_count(db_url: str, prefix: str) -> int:
    eng = _engine(db_url)
    try:
        with eng.connect() as conn:
            return int(conn.execute(sa.text("select count(*) from completions where request_id like :p"),
                                    {"p": prefix + "%"}).scalar_one())
    finally:
        eng.dispose()


@pytest.fixture
def private_pg() -> Any:
    from support.pg import PrivatePostgres
    if not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.fail("PostgreSQL server binaries are not installed (the database fault test needs its own server)")
    pg = PrivatePostgres()
    yield pg
    pg.close()


def test_database_goes_away_mid_batch_and_comes_back(private_pg: Any, tmp_path: Path) -> None:
    """The runner pauses while PostgreSQL is down (results it could not write are retried or rerun) and
    finishes once it is back: every line one result, one record."""
    from support.servers import GatewayServer
    from helixagent.config import load_config_dict
    n = 600
    gw = GatewayServer(cfg=load_config_dict({
        "auth": {"master_key": MASTER},
        "providers": [{"name": "mock", "type": "mock", "models": ["mock-1"], "latency_ms": 10}],
        "database": {"url": private_pg.url, "spool_dir": str(tmp_path / "spool"), "auto_migrate": True,
                     "flush_interval": "20ms", "retry_interval": "100ms", "pool_size": 4},
        "batches": {"local_concurrency": 4, "lease": "2s", "poll_interval": "50ms"}}))
    try:
        lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "mock-1", "messages": [{"role": "user", "content": f"n {i}"}]}} for i in range(n)]
        r = httpx.post(gw.url + "/v1/files", headers=H, data={"purpose": "batch"},
                       files={"file": ("in.jsonl", b"".join(orjson.dumps(x) + b"\n" for x in lines))})
        assert r.status_code == 200, r.text
        r = httpx.post(gw.url + "/v1/batches", headers=H, json={"input_file_id": r.json()["id"],
                                                                 "endpoint": "/v1/chat/completions",
                                                                 "completion_window": "24h"})
        bid = r.json()["id"]
        assert wait_until(lambda: _batch(gw.url, bid)["request_counts"]["completed"] >= 40, timeout=60, interval=0.02)
        private_pg.stop("immediate")
        time.sleep(1.5)
        runner = gw.app.services["batches_runner"]
        # the outage hit the runner mid-batch: its loop paused, or results waited to be written (or both)
        assert runner.outages + runner.write_retries >= 1 and runner.lines_run < n, runner.stats()
        private_pg.start()
        assert wait_until(lambda: _batch(gw.url, bid)["status"] == "completed", timeout=90, interval=0.2)
        got = _batch(gw.url, bid)
        assert got["request_counts"] == {"total": n, "completed": n, "failed": 0}
        out = [orjson.loads(x) for x in httpx.get(f"{gw.url}/v1/files/{got['output_file_id']}/content",
                                                  headers=H).content.splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(f"l{i}" for i in range(n))
        assert gw.run(gw.app.services["records"].writer.flush(60), timeout=70)
        rids = [x["response"]["request_id"] for x in out]
        assert set(_records(private_pg.url, rids)) == set(rids)
        assert _batch_record_count(private_pg.url, "b" + bid.split("_", 1)[1]) == n
    finally:
        gw.close()
