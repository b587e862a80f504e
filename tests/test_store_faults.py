"""Fault tests for the record writer: the database goes away under load and comes back; the gateway is
killed with SIGKILL mid-load and restarted; SIGTERM flushes.  Afterwards every request that got a response
has exactly one row."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from support.pg import PrivatePostgres
from support.servers import GatewayServer, free_port, wait_until

from helixagent.config import load_config_dict
from helixagent.store.db import make_sync_engine
from helixagent.store.schema import completions as C

SRC = str(Path(__file__).resolve().parent.parent / "src")
pytestmark = pytest.mark.slow
BODY = {"model": "mock", "messages": [{"role": "user", "content": "count my record please"}]}


def ids_in_db(url: str) -> list[str]:
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            return [r[0] for r in conn.execute(sa.select(C.c.request_id))]
    finally:
        eng.dispose()


def spool_files(d: Path) -> list[str]:
    return [f.name for f in d.glob("*.spool")] if d.exists() else []


@pytest.fixture
def private_pg():
    if not any(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("PostgreSQL server binaries are not installed")
    pg = PrivatePostgres()
    yield pg
    pg.close()


def test_database_goes_away_under_load(private_pg, tmp_path):
    n = 240
    spool = tmp_path / "spool"
    cfg = load_config_dict({"providers": [{"name": "mock", "type": "mock"}],
                            "database": {"url": private_pg.url, "spool_dir": str(spool), "auto_migrate": True,
                                         "flush_interval": "20ms", "retry_interval": "50ms", "batch_size": 50,
                                         "pool_size": 4}})
    gw = GatewayServer(cfg=cfg)
    results: list[tuple[int, str]] = []
    phases: list[str] = []

    async def load() -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            sent = 0

            async def worker() -> None:
                nonlocal sent
                while sent < n:
                    sent += 1
                    r = await client.post("/v1/chat/completions", json=BODY)
                    results.append((r.status_code, r.headers["x-helixagent-request-id"]))

            async def chaos() -> None:
                while len(results) < n // 3:
                    await asyncio.sleep(0.005)
                await asyncio.to_thread(private_pg.stop, "immediate")
                phases.append(f"stopped at {len(results)}")
                while len(results) < 2 * n // 3:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.3)          # the writer notices and spools
                await asyncio.to_thread(private_pg.start)
                phases.append(f"started at {len(results)}")

            await asyncio.gather(chaos(), *(worker() for _ in range(6)))

    try:
        asyncio.run(load())
        assert len(phases) == 2, phases
        assert [s for s, _ in results] == [200] * n          # nothing blocked or failed a response
        writer = gw.app.services["records"].writer
        assert writer.spooled > 0 or writer.overflowed > 0   # the outage really hit the writer
        assert gw.run(writer.flush(60), timeout=70), writer.stats()
        got = ids_in_db(private_pg.url)
        want = [rid for _, rid in results]
        assert len(got) == len(set(got)) == n
        assert set(got) == set(want)
    finally:
        gw.close()
    assert spool_files(spool) == []


def _serve(cfg_path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("HELIXAGENT_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "-c", str(cfg_path), "--port", str(port)],
                            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    def ok() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {log.read_text()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    assert wait_until(ok, timeout=30, interval=0.1), log.read_text()[-2000:]


def _write_cfg(path: Path, db_url: str, spool: Path, flush: str) -> None:
    path.write_text(yaml.safe_dump({
        "providers": [{"name": "mock", "type": "mock"}],
        "logging": {"level": "warning"},
        "database": {"url": db_url, "spool_dir": str(spool), "flush_interval": flush, "auto_migrate": True}}))


@pytest.mark.parametrize("flush", ["60s", "20ms"])
def test_sigkill_mid_load_then_restart(tmp_path, flush):
    """flush 60s: nothing reached the database before the kill, every row comes from the spool;
    20ms: most rows were inserted, the rest (and some already inserted) are replayed idempotently."""
    db_url = f"sqlite:///{tmp_path}/gw.db"
    spool = tmp_path / "spool"
    cfg_path = tmp_path / "gw.yaml"
    log = tmp_path / "gw.log"
    _write_cfg(cfg_path, db_url, spool, flush)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(cfg_path, port, log)
    got: list[str] = []
    stop = threading.Event()
    try:
        _wait_healthy(url, proc, log)

        def load() -> None:
            with httpx.Client(base_url=url, timeout=10) as client:
                while not stop.is_set():
                    try:
                        r = client.post("/v1/chat/completions", json=BODY)
                    except httpx.HTTPError:
                        return                       # the gateway is gone
                    if r.status_code == 200:
                        got.append(r.headers["x-helixagent-request-id"])

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(got) >= 150, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)              # mid-load
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(15)
        answered = list(got)
        assert spool_files(spool), "the killed gateway left its journal behind"
        # restart: the journal of the dead process is replayed at start
        _write_cfg(cfg_path, db_url, spool, "20ms")
        proc = _serve(cfg_path, port, log)
        _wait_healthy(url, proc, log)
        assert wait_until(lambda: set(answered) <= set(ids_in_db(db_url)), timeout=30)
        rows = ids_in_db(db_url)
        assert len(rows) == len(set(rows))
        assert set(answered) <= set(rows)
        # rows beyond the answered ones can only be requests in flight at the kill (recorded, unanswered)
        assert len(set(rows) - set(answered)) <= 4
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert wait_until(lambda: spool_files(spool) == [], timeout=5)


def test_sigterm_flushes_the_queue(tmp_path):
    db_url = f"sqlite:///{tmp_path}/gw.db"
    spool = tmp_path / "spool"
    cfg_path = tmp_path / "gw.yaml"
    log = tmp_path / "gw.log"
    _write_cfg(cfg_path, db_url, spool, "60s")           # only shutdown writes to the database
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(cfg_path, port, log)
    try:
        _wait_healthy(url, proc, log)
        ids = [httpx.post(url + "/v1/chat/completions", json=BODY).headers["x-helixagent-request-id"] for _ in range(25)]
        assert ids_in_db(db_url) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal after its shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(ids_in_db(db_url)) == sorted(ids)
    assert spool_files(spool) == []
