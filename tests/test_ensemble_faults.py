"""Ensembles under load and faults: concurrent requests with their records on PostgreSQL, a client that hangs
up mid-panel, a member whose circuit breaker is open, the metrics."""
from __future__ import annotations

import concurrent.futures as cf
import socket

import httpx
import orjson
import pytest

from conftest import need_postgres
from ensemble_support import MSG, Script, ensemble, flush, gateway_cfg, panel, panel_session, records
from support.pg import fresh_schema
from support.servers import wait_until

__all__ = ["panel", "panel_session"]

VOTE3 = {"strategy": "majority", "providers": ["a", "b", "c"]}


@pytest.fixture
def pg_url():
    gen = fresh_schema(need_postgres())
    yield next(gen)
    gen.close()


def test_concurrent_ensembles_each_decided_and_recorded_on_postgres(make_gateway, panel, tmp_path, pg_url):
    def answer(name):
        return lambda body: body["messages"][0]["content"].split()[-1] + ("" if name != "c" else " no")
    panel.scripts.update(a=Script(answer("a")), b=Script(answer("b")), c=Script(answer("c")))
    gw = make_gateway(gateway_cfg(panel, tmp_path, database={
        "url": pg_url, "spool_dir": str(tmp_path / "spool"), "auto_migrate": True, "flush_interval": "50ms"}))
    n = 16

    def one(i: int) -> tuple[int, str, str]:
        r = httpx.post(gw.url + "/v1/ensemble/completions", timeout=30, json={
            "model": "x", "messages": [{"role": "user", "content": f"say token{i}"}], "ensemble_config": VOTE3})
        assert r.status_code == 200, r.text
        return i, r.json()["choices"][0]["message"]["content"], r.headers["x-helixagent-ensemble-id"]

    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, range(n)))
    assert all(text == f"token{i}" for i, text, _ in got)  # no answer crossed into another request
    for _, _, eid in got:
        recs = records(gw, eid)
        assert len(recs) == 4 and recs[0]["request_id"] == eid and recs[0]["endpoint"] == "ensemble"
        assert all(x["request_id"].startswith(eid + ".") for x in recs[1:])
    assert panel.total() <= 3 * n  # c may be cancelled once a and b agree


def test_client_hanging_up_mid_panel_cancels_the_members(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("x", delay=3), b=Script("x", delay=3))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    body = orjson.dumps({"model": "x", "messages": MSG, "ensemble_config": {"providers": ["a", "b"]}})
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST /v1/ensemble/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert wait_until(lambda: panel.total() == 2, 5)
    s.close()

    def parent():
        flush(gw)
        from helixagent.store.db import make_sync_engine
        from helixagent.store.schema import completions as C
        import sqlalchemy as sa
        eng = make_sync_engine(gw.cfg.database.url)
        try:
            with eng.connect() as conn:
                return [dict(r) for r in conn.execute(sa.select(C).where(C.c.endpoint == "ensemble")).mappings()]
        finally:
            eng.dispose()
    assert wait_until(lambda: len(parent()) == 1, 10)
    p = parent()[0]
    assert p["outcome"] == "client_gone" and p["status"] == 499
    # the members were cancelled, not waited for: neither answered
    members = records(gw, p["request_id"])[1:]
    assert len(members) == 2 and all(m["error_type"] == "ensemble_left_out" for m in members)


def test_member_behind_an_open_breaker_is_left_out_without_a_call(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("x"), b=Script("x"), c=Script("y"))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    h = gw.app.router.health.get("c")
    gw.run(_trip(h))
    e = ensemble(gw, {**VOTE3, "min_providers": 2}).model_extra["ensemble"]
    assert panel.count("c") == 0 and e["answered"] == 2
    lo = e["left_out"]
    assert lo[0]["provider"] == "c" and "503" in lo[0]["reason"]


async def _trip(h) -> None:
    h._trip(h.clock())


def test_ensemble_metrics(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("x"), b=Script("x"), c=Script(status=500))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    ensemble(gw, {**VOTE3, "strategy": "confidence_weighted"})  # waits for every member (c fails)
    ensemble(gw, {"strategy": "judge", "providers": ["a", "b"], "judge": {"provider": "j"}})
    gw.app.services["metrics"].flush()
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    assert 'helixagent_ensemble_requests_total{decision="confidence",strategy="confidence_weighted"} 1.0' in text
    assert 'helixagent_ensemble_requests_total{decision="judge_synthesis",strategy="judge"} 1.0' in text
    assert 'helixagent_ensemble_members_left_out_total{reason="failed",strategy="confidence_weighted"} 1.0' in text
    assert 'helixagent_ensemble_panel_size_count{strategy="confidence_weighted"} 1.0' in text
    assert 'helixagent_ensemble_decision_seconds_count{strategy="judge"} 1.0' in text
    assert "helixagent_ensemble_agreement_ratio_bucket" in text and "helixagent_ensemble_cost_dollars_total" in text


def test_dashboard_data_has_the_ensembles(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("x"), b=Script("x"), c=Script(status=500))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    ensemble(gw, {**VOTE3, "strategy": "quality_weighted"})
    d = httpx.get(gw.url + "/dashboard/data", timeout=10).json()
    (row,) = d["ensembles"]
    assert row["strategy"] == "quality_weighted" and row["requests"] == 1 and row["errors"] == 0
    assert row["panel_size"] == 3 and row["answered"] == 2 and row["left_out"] == 1 and row["agreement"] == 1.0
    assert row["decision_ms"] is not None and row["cost"] > 0
    page = httpx.get(gw.url + "/dashboard", headers={"accept": "text/html"}, timeout=10).text
    assert 'id="ensembles"' in page


def test_gateway_sigkilled_while_the_judge_works_keeps_the_member_records(panel, tmp_path):
    """The members answered and were journaled; the gateway is SIGKILLed while the judge is still writing; on
    restart the journal is replayed: the member records are there, linked to an ensemble that never finished
    (no parent record -- nobody got an answer)."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from support.servers import free_port
    from test_store_faults import _wait_healthy

    from ensemble_support import providers

    spool = tmp_path / "spool"
    db = f"sqlite:///{tmp_path}/kill.db"
    cfg = tmp_path / "gw.yaml"

    def write_cfg(flush: str) -> None:
        cfg.write_text(yaml.safe_dump({"providers": providers(panel), "logging": {"level": "warning"},
                                       "database": {"url": db, "spool_dir": str(spool), "flush_interval": flush,
                                                    "auto_migrate": True}}))
    write_cfg("60s")  # the members' records stay in the journal until the kill
    panel.scripts.update(a=Script("x"), b=Script("x"), j=Script("late", delay=30))
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

    def serve(port: int) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=src)
        env.pop("HELIXAGENT_API_KEY", None)
        return subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "-c", str(cfg), "--port", str(port)],
                                env=env, stdout=open(tmp_path / "log", "ab"), stderr=subprocess.STDOUT)

    port = free_port()
    proc = serve(port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / "log")
        body = {"model": "x", "messages": MSG,
                "ensemble_config": {"strategy": "judge", "providers": ["a", "b"], "judge": {"provider": "j"}}}
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: httpx.post(f"http://127.0.0.1:{port}/v1/ensemble/completions", json=body,
                                               timeout=40))
            assert wait_until(lambda: panel.count("j") == 1, 15)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            with pytest.raises(httpx.HTTPError):
                fut.result(20)
        write_cfg("100ms")
        proc = serve(port)
        _wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / "log")
        from helixagent.store.db import make_sync_engine
        from helixagent.store.schema import completions as C
        import sqlalchemy as sa

        def rows():
            eng = make_sync_engine(db)
            try:
                with eng.connect() as conn:
                    return [dict(r) for r in conn.execute(sa.select(C).order_by(C.c.request_id)).mappings()]
            finally:
                eng.dispose()
        assert wait_until(lambda: len(rows()) == 2, 20)
        got = rows()
        assert {r["provider"] for r in got} == {"a", "b"} and {r["endpoint"] for r in got} == {"ensemble_member"}
        eid = got[0]["ensemble_id"]
        assert eid and all(r["ensemble_id"] == eid and r["request_id"].startswith(eid + ".") for r in got)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_client_leaving_a_stream_mid_panel_cancels_the_members(make_gateway, panel, tmp_path):
    panel.scripts.update(a=Script("x", delay=3), b=Script("x", delay=3))
    gw = make_gateway(gateway_cfg(panel, tmp_path))
    body = {"model": "x", "messages": MSG, "stream": True, "ensemble_config": {"providers": ["a", "b"]}}
    with httpx.stream("POST", gw.url + "/v1/ensemble/completions", json=body, timeout=20) as r:
        eid = r.headers["x-helixagent-ensemble-id"]
        lines = r.iter_lines()  # kept: a dropped iterator closes the response (the client would leave here)
        first = next(lines)
        assert '"role":"assistant"' in first
        assert wait_until(lambda: panel.total() == 2, 5)
    # the client is gone: the members are cancelled and every record says so

    def parent_done() -> bool:
        recs = records(gw, eid)
        return len(recs) == 3
    assert wait_until(parent_done, 10)
    recs = records(gw, eid)
    assert recs[0]["outcome"] == "client_gone"
    assert all(m["error_type"] == "ensemble_left_out" for m in recs[1:])
