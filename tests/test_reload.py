"""Config reload (SIGHUP, POST /admin/reload) of a real `helixagent serve` process with a fake upstream:
under load with zero failed requests, with two workers, with invalid files, and limit counters that survive."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from support.keys import MASTER, admin_create
from support.servers import free_port, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")
AUTH = {"authorization": f"Bearer {MASTER}"}


# -- a serve process ---------------------------------------------------------------------------------------
class Serve:
    def __init__(self, tmp_path: Path, cfg: dict[str, Any], workers: int = 1):
        self.tmp = tmp_path
        self.port = free_port()
        self.cfgfile = tmp_path / "helix.yaml"
        self.write(cfg)
        env = dict(os.environ, PYTHONPATH=SRC, HELIXAGENT_API_KEY=MASTER)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.logpath = tmp_path / f"serve-{time.monotonic_ns()}.log"
        with open(self.logpath, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "helixagent", "serve", "--config", str(self.cfgfile), "--port", str(self.port),
                 "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write(self, cfg: dict[str, Any]) -> None:
        full = {"database": {"url": f"sqlite:///{self.tmp}/h.db", "spool_dir": str(self.tmp / "spool")},
                "logging": {"level": "info"}, **cfg}
        tmp = self.cfgfile.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(full))
        tmp.replace(self.cfgfile)  # atomic, as a config-management tool writes it

    def log(self) -> str:
        return self.logpath.read_text(errors="replace")

    def wait_up(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            try:
                return httpx.get(self.url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(up, timeout=60, interval=0.1), self.log()
        assert wait_until(lambda: "listening on" in self.log(), timeout=30), self.log()

    def health(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/health", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def reload(self) -> httpx.Response:
        return httpx.post(self.url + "/admin/reload", headers=AUTH, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def serve(tmp_path: Path):
    started: list[Serve] = []

    def make(cfg: dict[str, Any], workers: int = 1) -> Serve:
        s = Serve(tmp_path, cfg, workers)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def base_cfg(fake: Any, rpm: int = 1000, new_model: bool = False, second: bool = False) -> dict[str, Any]:
    providers = [fake.provider(models=["gpt-4o-mini", "gpt-4o"] + (["gpt-4.1-new"] if new_model else []))]
    if second:
        providers.append(fake.provider(name="openai-b", models=["brand-new-model"], priority=5))
    return {"providers": providers, "rate_limits": {"api_key": {"requests_per_minute": rpm}}}


def chat(url: str, key: str, model: str = "gpt-4o-mini", stream: bool = False,
         client: httpx.Client | None = None) -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    h = {"authorization": f"Bearer {key}"}
    c = client or httpx.Client(timeout=30)
    try:
        if not stream:
            r = c.post(url + "/v1/chat/completions", json=body, headers=h)
            return r.status_code, r.text
        with c.stream("POST", url + "/v1/chat/completions", json=body, headers=h) as r:
            text = r.read().decode()
            if r.status_code == 200 and not text.rstrip().endswith("data: [DONE]"):
                return 599, "stream did not end with [DONE]: " + text[-200:]
            return r.status_code, text
    finally:
        if client is None:
            c.close()


class Load:
    """``n`` clients looping requests (every other one streamed) until stopped; every outcome is kept."""

    def __init__(self, url: str, key: str, n: int = 20):
        self.url, self.key = url, key
        self.stop_ev = threading.Event()
        self.results: list[tuple[int, str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def run(self, i: int) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop_ev.is_set():
                try:
                    out = chat(self.url, self.key, stream=i % 2 == 1, client=c)
                except httpx.HTTPError as exc:
                    out = (0, f"{type(exc).__name__}: {exc}")
                with self.lock:
                    self.results.append(out)

    def finish(self) -> list[tuple[int, str]]:
        self.stop_ev.set()
        for t in self.threads:
            t.join(60)
        return self.results


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


# -- tests -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", ["sighup", "api"])
def test_reload_under_load_applies_new_model_provider_and_limit(serve, fake_openai, trigger):
    s = serve(base_cfg(fake_openai, rpm=1000))
    load_key = admin_create(s, limits={"requests_per_minute": 1_000_000})["key"]
    limited = admin_create(s)["key"]  # the configured api_key rpm applies
    assert s.health()["config"]["generation"] == 1
    assert chat(s.url, load_key, model="gpt-4.1-new")[0] == 404
    load = Load(s.url, load_key, n=20)
    try:
        assert wait_until(lambda: len(load.results) >= 40, timeout=60), load.results[:3]
        s.write(base_cfg(fake_openai, rpm=3, new_model=True, second=True))
        if trigger == "sighup":
            s.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: s.health()["config"]["generation"] == 2, timeout=30), s.log()
        else:
            r = s.reload()
            assert r.status_code == 200, r.text
            rep = r.json()
            assert rep["generation"] == 2 and rep["result"] == "success", rep
            assert set(rep["changed"]) == {"providers", "rate_limits"}, rep
            assert rep["providers"] == {"added": ["openai-b"], "removed": [], "changed": ["openai"]}, rep
            assert rep["restart_required"] == [], rep
        n_after = len(load.results)
        assert wait_until(lambda: len(load.results) >= n_after + 40, timeout=60)
    finally:
        results = load.finish()
    failed = [r for r in results if r[0] != 200]
    assert not failed, (len(failed), failed[:3])
    assert len(results) >= 80
    # the new model, the new provider and the new limit answer
    code, text = chat(s.url, load_key, model="gpt-4.1-new")
    assert code == 200, text
    code, text = chat(s.url, load_key, model="brand-new-model", stream=True)
    assert code == 200, text
    codes = [chat(s.url, limited)[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429], codes
    h = s.health()
    assert h["config"]["generation"] == 2 and h["config"]["last_reload"]["result"] == "success", h["config"]
    assert h["config"]["source"] == str(s.cfgfile)
    assert "openai-b" in h["providers"]
    assert "config reload" in s.log() and "applied generation 2" in s.log()


def test_two_workers_both_reload_on_sighup_and_on_the_api(serve, fake_openai):
    s = serve(base_cfg(fake_openai), workers=2)

    def generations() -> dict[int, int]:
        seen: dict[int, int] = {}
        for _ in range(200):  # a new connection each time: the kernel hands them to either worker
            r = httpx.get(s.url + "/health", headers={**AUTH, "connection": "close"}, timeout=10)
            c = r.json()["config"]
            seen[c["pid"]] = c["generation"]
            if len(seen) == 2 and len(set(seen.values())) == 1:
                break
        return seen

    def all_at(gen: int) -> bool:
        g = generations()
        return len(g) == 2 and set(g.values()) == {gen}

    assert wait_until(lambda: all_at(1), timeout=30)
    s.write(base_cfg(fake_openai, new_model=True))
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: all_at(2), timeout=30, interval=0.2), (generations(), s.log())
    s.write(base_cfg(fake_openai, new_model=True, second=True))
    r = s.reload()
    assert r.status_code == 200 and r.json()["generation"] == 3, r.text
    assert wait_until(lambda: all_at(3), timeout=30, interval=0.2), (generations(), s.log())
    # no worker was replaced: the same two processes answer
    assert len(generations()) == 2
    assert "died" not in s.log() and "failed to start" not in s.log()
    key = admin_create(s, limits={"requests_per_minute": 1000})["key"]
    for _ in range(6):
        assert chat(s.url, key, model="brand-new-model")[0] == 200


BAD_FILES = {
    "yaml": "providers:\n  - name: openai\n    api_key: \"sk-test-upstream-key-123456\n  models: [x\n",
    "unknown_key": None,  # built below (needs the fake's URL)
    "bad_provider_ref": None,
    "preflight": None,
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_invalid_file_changes_nothing(serve, fake_openai, kind):
    s = serve(base_cfg(fake_openai))
    key = admin_create(s, limits={"requests_per_minute": 1000})["key"]
    before = s.health()
    metrics0 = httpx.get(s.url + "/metrics", headers=AUTH, timeout=10).text
    fails0 = metric(metrics0, "helixagent_config_reloads_total", '{result="failure"}')
    if kind == "yaml":
        s.cfgfile.write_text(BAD_FILES["yaml"])
        expect = "not valid YAML"
    elif kind == "unknown_key":
        cfg = base_cfg(fake_openai, new_model=True)
        cfg["routing"] = {"strategy": "priority", "retires": {"max_attempts": 2}}
        s.write(cfg)
        expect = "routing.retires: unknown key"
    elif kind == "bad_provider_ref":
        cfg = base_cfg(fake_openai, new_model=True)
        cfg["providers"][0]["fallback_to"] = ["nowhere"]
        s.write(cfg)
        expect = "'nowhere' is not a configured provider"
    else:  # valid config models, refused by the start-up checks (preflight)
        cfg = base_cfg(fake_openai, new_model=True)
        cfg["providers"][0]["base_url"] = "ftp://upstream.example/v1"
        s.write(cfg)
        expect = "providers[0].base_url"
    r = s.reload()
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert expect in err["message"] and err["code"] == "invalid_config", err
    assert err["type"] == "invalid_request_error"
    assert fake_openai.api_key not in r.text and MASTER not in r.text
    # SIGHUP with the same file: one error line, nothing changes
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: s.log().count("config reload (SIGHUP) failed") == 1, timeout=20), s.log()
    line = next(ln for ln in s.log().splitlines() if "config reload (SIGHUP) failed" in ln)
    assert expect in line and fake_openai.api_key not in s.log()
    after = s.health()
    assert after["config"]["generation"] == 1
    assert after["providers"].keys() == before["providers"].keys()
    assert after["config"]["last_reload"]["result"] == "failure"
    assert expect in after["config"]["last_reload"]["error"]
    assert chat(s.url, key, model="gpt-4.1-new")[0] == 404  # the model of the invalid file is not served
    assert chat(s.url, key)[0] == 200 and chat(s.url, key, stream=True)[0] == 200
    metrics1 = httpx.get(s.url + "/metrics", headers=AUTH, timeout=10).text
    assert metric(metrics1, "helixagent_config_reloads_total", '{result="failure"}') == fails0 + 2
    assert metric(metrics1, "helixagent_config_generation") == 1


def test_limit_counters_survive_a_reload(serve, fake_openai):
    s = serve(base_cfg(fake_openai, rpm=3))
    key = admin_create(s)["key"]
    assert [chat(s.url, key)[0] for _ in range(4)] == [200, 200, 200, 429]
    cfg = base_cfg(fake_openai, rpm=3, new_model=True)  # a reload that leaves the limit alone
    s.write(cfg)
    assert s.reload().json()["generation"] == 2
    assert chat(s.url, key)[0] == 429, "a reload reset the rate limit"
    s.write(base_cfg(fake_openai, rpm=5, new_model=True))  # raised: exactly two more in this minute
    assert s.reload().json()["changed"] == ["rate_limits"]
    assert [chat(s.url, key)[0] for _ in range(3)] == [200, 200, 429]


def test_restart_only_settings_are_reported_not_applied(serve, fake_openai):
    s = serve(base_cfg(fake_openai))
    cfg = base_cfg(fake_openai)
    cfg["server"] = {"max_body_bytes": 1234}
    cfg["rate_limits"]["key_prefix"] = "other"
    s.write(cfg)
    r = s.reload()
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["restart_required"] == ["server", "rate_limits.key_prefix"] and rep["changed"] == [], rep
    assert rep["generation"] == 1
    h = s.health()["config"]
    assert h["restart_required"] == ["server", "rate_limits.key_prefix"]
    assert "need a restart: server, rate_limits.key_prefix" in s.log()
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 3000}]})
    r = httpx.post(s.url + "/v1/chat/completions", content=body, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text  # the running max_body_bytes (8 MiB) still applies


def test_removed_provider_finishes_its_streams_and_unchanged_ones_keep_their_state(serve, fake_openai):
    from fakes.openai_upstream import Fault
    s = serve(base_cfg(fake_openai, second=True))
    key = admin_create(s, limits={"requests_per_minute": 1000})["key"]
    for _ in range(3):
        assert chat(s.url, key)[0] == 200
    before = s.health()["providers"]["openai"]
    assert before["successes"] >= 3
    fake_openai.sticky = Fault(chunk_delay=0.3)  # streams of about 2 s
    out: list[tuple[int, str]] = []
    threads = [threading.Thread(target=lambda: out.append(chat(s.url, key, model="brand-new-model", stream=True)))
               for _ in range(5)]
    for t in threads:
        t.start()
    assert wait_until(lambda: fake_openai.inflight >= 5, timeout=20)
    s.write(base_cfg(fake_openai))  # openai-b removed while its streams run
    r = s.reload()
    assert r.status_code == 200, r.text
    assert r.json()["providers"] == {"added": [], "removed": ["openai-b"], "changed": []}, r.text
    for t in threads:
        t.join(60)
    fake_openai.sticky = None
    assert [c for c, _ in out] == [200] * 5, out  # in-flight streams finished on the old provider object
    assert chat(s.url, key, model="brand-new-model")[0] == 404
    after = s.health()["providers"]
    assert "openai-b" not in after
    assert after["openai"]["successes"] >= before["successes"], (before, after["openai"])  # state kept


def test_concurrent_reloads_and_a_half_written_file(serve, fake_openai):
    s = serve(base_cfg(fake_openai))
    key = admin_create(s, limits={"requests_per_minute": 100000})["key"]
    load = Load(s.url, key, n=8)
    try:
        s.cfgfile.write_text(yaml.safe_dump(base_cfg(fake_openai, new_model=True))[:40])  # cut mid-write
        assert s.reload().status_code == 422
        s.write(base_cfg(fake_openai, new_model=True))
        results: list[int] = []
        ts = [threading.Thread(target=lambda: results.append(s.reload().status_code)) for _ in range(6)]
        for t in ts:
            t.start()
        for _ in range(3):
            s.proc.send_signal(signal.SIGHUP)
        for t in ts:
            t.join(60)
        assert results == [200] * 6, results
    finally:
        res = load.finish()
    assert [r for r in res if r[0] != 200] == []
    assert s.health()["config"]["generation"] == 2  # one change, applied once whatever the number of reloads
    assert chat(s.url, key, model="gpt-4.1-new")[0] == 200


def test_breaker_settings_apply_and_breaker_state_is_kept():
    from helixagent.config import BreakerConfig
    from helixagent.routing.health import OPEN, Health
    t = [100.0]
    h = Health(BreakerConfig(failure_threshold=2, cooldown=30), ["a", "b"], clock=lambda: t[0])
    for _ in range(2):
        h.get("a").failure(h.get("a").acquire(t[0]))
    assert h.get("a").state is OPEN
    h.reconfigure(BreakerConfig(failure_threshold=2, cooldown=5), ["a", "b", "c"])
    assert h.get("a").state is OPEN and h.get("a").cfg.cooldown == 5 and h.get("a").stream.cfg.cooldown == 5
    assert h.state("a") == "open"
    t[0] += 6  # the new, shorter cooldown applies to the breaker that was already open
    assert h.state("a") == "half_open" and "c" in h.providers


def test_every_config_section_is_either_live_or_restart_only():
    """A top-level section in neither list would be half-applied (read live by some code, fixed in objects
    built at start-up by other code) and reported as neither changed nor restart_required."""
    from helixagent.config import Config
    from helixagent.reload import LIVE_SECTIONS, RESTART_SECTIONS
    assert set(LIVE_SECTIONS).isdisjoint(RESTART_SECTIONS)
    assert set(Config.model_fields) == set(LIVE_SECTIONS) | set(RESTART_SECTIONS)


def test_a_changed_batches_section_is_reported_as_restart_only():
    from helixagent.config import load_config_dict
    from helixagent.reload import changed_sections, split
    running = load_config_dict({"batches": {"enabled": True, "local_concurrency": 4}}, "a")
    new = load_config_dict({"batches": {"enabled": True, "local_concurrency": 32, "mode": "local"},
                            "features": {"streaming": {"enabled": False}}}, "b")
    effective, restart = split(running, new)
    assert "batches" in restart
    assert effective.batches == running.batches  # the runner's settings stay as it was built with
    assert changed_sections(running, effective) == ["features"]
