"""`helixagent serve --workers 2` as a real subprocess: known traffic spread over both workers, then every
scrape (whichever worker answers it, and the separate metrics port served by the supervisor) reports the
exact totals of both."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from helixagent.observability.metrics import FLUSH_SECONDS
from support.observability import parse_metrics, value
from support.servers import free_port, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")


def per_worker_requests(mpdir: str) -> dict[int, float]:
    """helixagent_requests_total per worker process, read from prometheus_client's per-process files."""
    from prometheus_client.mmap_dict import MmapedDict
    out: dict[int, float] = {}
    for f in glob.glob(os.path.join(mpdir, "counter_*.db")):
        pid = int(Path(f).stem.split("_")[-1])
        total = 0.0
        for key, val, _ts, _pos in MmapedDict.read_all_values_from_file(f):
            if json.loads(key)[0] == "helixagent_requests":
                total += val
        out[pid] = total
    return out


@pytest.mark.slow
def test_two_workers_exact_totals(tmp_path, fake_openai):
    port, mport = free_port(), free_port()
    mpdir = tmp_path / "prom"
    mpdir.mkdir()
    (mpdir / "counter_999999.db").write_bytes(b"stale")  # a leftover from an earlier run: must be cleaned
    cfg = {"server": {"port": port}, "providers": [fake_openai.provider(max_retries=0)], "metrics": {"port": mport},
           "database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")},
           "logging": {"level": "warning"}}
    cfgfile = tmp_path / "helix.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=SRC, PROMETHEUS_MULTIPROC_DIR=str(mpdir))
    env.pop("HELIXAGENT_API_KEY", None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config", str(cfgfile), "--workers", "2"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(base + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=40, interval=0.2), (tmp_path / "serve.log").read_text()
        assert not (mpdir / "counter_999999.db").exists()
        body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b"}]})
        bad = b"{nope"

        def one(i: int) -> int:
            # a fresh connection each time, so the kernel spreads them over both workers
            with httpx.Client(timeout=20) as c:
                r = c.post(base + "/v1/chat/completions", content=bad if i % 5 == 4 else body)
                return r.status_code

        sent_ok = sent_bad = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in range(15):
                codes = list(pool.map(one, range(20)))
                sent_ok += codes.count(200)
                sent_bad += codes.count(400)
                time.sleep(FLUSH_SECONDS + 0.3)  # workers hand their counts to the files every FLUSH_SECONDS
                workers = per_worker_requests(str(mpdir))
                if len([p for p, n in workers.items() if n > 0]) >= 2:
                    break
        assert set(codes) <= {200, 400}
        workers = per_worker_requests(str(mpdir))
        assert len([p for p, n in workers.items() if n > 0]) == 2, workers  # both workers served traffic
        assert sum(workers.values()) == sent_ok + sent_bad

        def settled() -> bool:
            with httpx.Client(timeout=10) as c:
                return value(parse_metrics(c.get(base + "/metrics").text), "helixagent_requests_total") == sent_ok + sent_bad

        assert wait_until(settled, timeout=10, interval=0.1)
        for _ in range(8):  # scrapes land on either worker: all report the same exact totals
            with httpx.Client(timeout=10) as c:
                m = parse_metrics(c.get(base + "/metrics").text)
            assert value(m, "helixagent_requests_total", provider="openai", model="gpt-4o-mini", status="200") == sent_ok
            assert value(m, "helixagent_requests_total", provider="none", status="400") == sent_bad
            assert value(m, "helixagent_errors_total") == sent_bad
            assert value(m, "helixagent_request_duration_seconds_count") == sent_ok + sent_bad
            assert value(m, "helixagent_tokens_used_total", type="completion") == sent_ok * 2  # "echo:a echo:b"
            assert value(m, "helixagent_requests_in_flight") == 0
            assert value(m, "helixagent_provider_availability", provider="openai") == 1
        m = parse_metrics(httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text)
        assert value(m, "helixagent_requests_total", status="200") == sent_ok
        assert value(m, "helixagent_requests_total") == sent_ok + sent_bad
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    # the workers marked themselves dead: no live gauge files remain
    assert not glob.glob(str(mpdir / "gauge_live*.db")), os.listdir(mpdir)
