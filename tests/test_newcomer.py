"""A newcomer's path (issue 13): no silent mock in production, `config check` agrees with `serve`, a purge
that cannot be misread, CLI commands that say which database they use, the seed's token_usage metric."""
from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

import helixagent
from helixagent import cli
from helixagent.app import create_app
from helixagent.config import ConfigError, load_config_dict
from helixagent.preflight import check_runtime, describe_database
from helixagent.store import migrate
from helixagent.store.db import make_sync_engine
from helixagent.store.schema import completions as C
from support.servers import wait_until

ROOT = Path(__file__).resolve().parents[1]
SRC = str(Path(helixagent.__file__).resolve().parents[1])
VENDOR_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY")
KEY = "k1:" + base64.b64encode(b"k" * 32).decode()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a newcomer: no vendor keys, no config, no encryption keys."""
    env = {k: v for k, v in os.environ.items()
           if k not in VENDOR_KEYS and not k.startswith("HELIXAGENT_")}
    env["PYTHONPATH"] = SRC
    env.update(extra)
    return env


def helix(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
          stdin: int | None = subprocess.DEVNULL, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "helixagent", *args], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd, stdin=stdin, timeout=timeout)


@pytest.fixture
def no_vendor_keys(monkeypatch):
    for k in VENDOR_KEYS:
        monkeypatch.delenv(k, raising=False)


# -- 1. no silent mock outside development ----------------------------------------------------------------
def test_production_without_keys_refuses_to_start(no_vendor_keys, tmp_path):
    cfg = load_config_dict({"environment": "production", "providers": [{"name": "claude"}, {"name": "openai"}],
                            "database": {"url": f"sqlite:///{tmp_path}/x.db", "spool_dir": str(tmp_path / "s")}})
    problems = check_runtime(cfg)
    assert len(problems) == 1 and "ANTHROPIC_API_KEY" in problems[0] and "type: mock" in problems[0]
    with pytest.raises(ConfigError, match="no configured provider has an API key"):
        create_app(cfg)


@pytest.mark.parametrize("env", ["staging", "prod", "Production"])
def test_every_non_development_environment_refuses(no_vendor_keys, env, tmp_path):
    cfg = load_config_dict({"environment": env, "database": {"spool_dir": str(tmp_path / "s")}})
    assert any("no provider is configured" in p for p in check_runtime(cfg))


def test_production_with_explicit_mock_starts(no_vendor_keys, make_gateway):
    gw = make_gateway({"environment": "production", "providers": [{"name": "mock", "type": "mock",
                                                                   "models": ["gpt-4o-mini"]}]})
    r = httpx.post(gw.url + "/v1/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-helixagent-provider"] == "mock"
    assert httpx.get(gw.url + "/health").json()["status"] == "ok"  # asked for: not a stand-in


def test_serve_refuses_production_without_keys_at_once(tmp_path):
    f = tmp_path / "prod.yaml"
    f.write_text(f"environment: production\nproviders:\n  - name: claude\ndatabase:\n"
                 f"  url: sqlite:///{tmp_path}/x.db\n  spool_dir: {tmp_path}/spool\n")
    t = time.monotonic()
    r = helix("serve", "--config", str(f), "--port", "1", timeout=60)
    assert r.returncode == 2, r.stderr
    assert "ANTHROPIC_API_KEY" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t < 30


def test_development_stand_in_is_labelled_mock_everywhere(no_vendor_keys, make_gateway, tmp_path):
    db = f"sqlite:///{tmp_path}/records.db"
    gw = make_gateway({"auth": {"master_key": "hx-master-0123456789"},
                       "providers": [{"name": "claude", "models": ["claude-sonnet-4-5"]}],
                       "database": {"url": db, "flush_interval": "50ms"}})
    auth = {"authorization": "Bearer hx-master-0123456789"}
    # unauthenticated liveness: degraded, not ok
    h = httpx.get(gw.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "degraded"
    full = httpx.get(gw.url + "/health", headers=auth).json()
    assert full["status"] == "degraded" and full["mock_fallback"] is True
    assert full["providers"]["claude"]["stand_in_for"] == "anthropic"
    r = httpx.post(gw.url + "/v1/chat/completions", headers=auth,
                   json={"model": "claude-sonnet-4-5", "provider": "claude",
                         "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-helixagent-provider"] == "mock"
    assert r.json()["provider"] == "mock"
    request_id = r.headers["x-helixagent-request-id"]
    m = httpx.get(gw.url + "/metrics", headers=auth).text
    req_lines = [ln for ln in m.splitlines() if ln.startswith("helixagent_requests_total{")]
    assert any('provider="mock"' in ln for ln in req_lines), req_lines
    assert not any('provider="claude"' in ln for ln in req_lines), req_lines

    def recorded() -> list[dict]:
        eng = make_sync_engine(db)
        try:
            with eng.connect() as conn:
                return [dict(x) for x in conn.execute(sa.select(C).where(C.c.request_id == request_id)).mappings()]
        finally:
            eng.dispose()
    assert wait_until(lambda: bool(recorded()), 10)
    assert recorded()[0]["provider"] == "mock"


# -- 2. config check catches everything serve refuses --------------------------------------------------
def test_config_check_production_example_reports_what_serve_refuses(tmp_path):
    r = helix("config", "check", str(ROOT / "configs" / "production.yaml"))
    assert r.returncode == 2, r.stdout
    assert "valid" not in r.stdout
    assert "HELIXAGENT_ENCRYPTION_KEYS" in r.stderr  # encryption on, no key
    assert "no configured provider has an API key" in r.stderr
    # with what the file's header asks for, it is valid
    ok = helix("config", "check", str(ROOT / "configs" / "production.yaml"),
               env=clean_env(ANTHROPIC_API_KEY="sk-ant-test-0123456789", HELIXAGENT_ENCRYPTION_KEYS=KEY,
                             HELIXAGENT_API_KEY="hx-master-0123456789"))
    if os.access("/var/lib", os.W_OK):  # the example's spool_dir is under /var/lib/helixagent
        assert ok.returncode == 0, ok.stderr
        assert "valid" in ok.stdout and "sk-ant-test-0123456789" not in ok.stdout
    else:
        assert "database.spool_dir" in ok.stderr


@pytest.mark.parametrize("extra,expect", [
    ({"encryption": {"enabled": True}}, "no key is configured"),
    ({"database": {"url": "postgresql://u:hunter2@db:notaport/x"}}, "database.url"),
    ({"database": {"url": "mysql://u@db/x"}}, "unsupported database"),
    ({"database": {"url": "not a url"}}, "database.url"),
    ({"redis": {"url": "http://cache:6379"}}, "redis.url"),
    ({"cache": {"enabled": True, "type": "redis", "redis_url": "redis://h:99999999/0"}}, "cache.redis_url"),
    ({"providers": [{"name": "local", "type": "openai_compatible", "base_url": "127.0.0.1:8000/v1"}]},
     "providers[0].base_url"),
    ({"logging": {"file": "/nonexistent-dir-helix/x.log"}}, "logging.file"),
])
def test_config_check_and_serve_refuse_the_same(tmp_path, capsys, extra, expect):
    data = {"database": {"url": f"sqlite:///{tmp_path}/x.db", "spool_dir": str(tmp_path / "spool")}}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    import yaml
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    assert cli.main(["config", "check", str(f)]) == 2
    out, err = capsys.readouterr()
    assert expect in err and "valid" not in out, err + out
    assert "hunter2" not in err
    srv = helix("serve", "--config", str(f), "--port", "1")
    assert srv.returncode == 2 and expect in srv.stderr, srv.stderr
    assert "Traceback" not in srv.stderr and "hunter2" not in srv.stderr


def test_encryption_key_must_be_well_formed(monkeypatch, tmp_path):
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", "k1:" + base64.b64encode(b"short").decode())
    cfg = load_config_dict({"encryption": {"enabled": True}, "database": {"spool_dir": str(tmp_path / "s")}})
    assert any("AES-256 needs 32" in p for p in check_runtime(cfg))
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", KEY)
    assert check_runtime(cfg) == []


# -- 3. purge: a unit, an unambiguous month, a confirmation ----------------------------------------------
def _records_db(tmp_path: Path, ages_days: list[float]) -> str:
    url = f"sqlite:///{tmp_path}/rec.db"
    migrate.upgrade(url)
    now = dt.datetime.now(dt.timezone.utc)
    eng = make_sync_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(C.insert(), [{"request_id": uuid.uuid4().hex, "created_at": now - dt.timedelta(days=a),
                                       "endpoint": "chat", "status": 200} for a in ages_days])
    finally:
        eng.dispose()
    return url


def _count(url: str) -> int:
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(C)).scalar_one()
    finally:
        eng.dispose()


@pytest.mark.parametrize("age,msg", [("90", "give a unit"), ("3m", "ambiguous"), ("3 fortnights", "unknown unit"),
                                     ("0d", "positive")])
def test_purge_refuses_ambiguous_ages(tmp_path, age, msg):
    url = _records_db(tmp_path, [0.01, 1, 100])
    r = helix("purge", "--older-than", age, "--database-url", url, "--yes")
    assert r.returncode == 1 and msg in r.stderr, r.stderr
    assert _count(url) == 3


def test_purge_months_and_confirmation(tmp_path):
    url = _records_db(tmp_path, [1, 10, 80, 100, 200])
    dry = helix("purge", "--older-than", "3mo", "--database-url", url, "--dry-run")
    assert dry.returncode == 0 and "would delete 2 record(s)" in dry.stdout  # 3 months = 90 days
    # not a terminal and no --yes: says what it would do, refuses, deletes nothing
    r = helix("purge", "--older-than", "3mo", "--database-url", url)
    assert r.returncode == 1
    assert "will delete 2 record(s) created before" in r.stderr and "--yes" in r.stderr
    assert "# database: sqlite:///" in r.stderr
    assert _count(url) == 5
    ok = helix("purge", "--older-than", "3mo", "--database-url", url, "--yes")
    assert ok.returncode == 0 and "deleted 2 record(s)" in ok.stdout, ok.stderr
    assert _count(url) == 3
    ok = helix("purge", "--older-than", "9 days", "--database-url", url, "--yes")
    assert "deleted 2 record(s)" in ok.stdout and _count(url) == 1  # 10 and 80 days old


def test_purge_asks_on_a_terminal(tmp_path):
    """On a terminal purge asks; anything but y/yes keeps the records."""
    import pty
    url = _records_db(tmp_path, [100, 200])
    for answer, left in ((b"n\n", 2), (b"y\n", 0)):
        pid, fd = pty.fork()
        if pid == 0:  # child: stdin/stdout/stderr are the pty
            os.environ.clear()
            os.environ.update(clean_env())
            os.execv(sys.executable, [sys.executable, "-m", "helixagent", "purge", "--older-than", "90d",
                                      "--database-url", url])
        out = b""
        deadline = time.time() + 60
        while b"[y/N]" not in out and time.time() < deadline:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
        assert b"will delete 2 record(s)" in out, out
        os.write(fd, answer)
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == (0 if left == 0 else 1), out
        assert _count(url) == left


# -- 5. the CLI says which database it acts on and honours $HELIXAGENT_CONFIG -------------------------------
def test_keys_cli_honours_helixagent_config_and_names_its_database(tmp_path):
    db = tmp_path / "gateway.db"
    f = tmp_path / "gw.yaml"
    f.write_text(f"database:\n  url: sqlite:///{db}\n  spool_dir: {tmp_path}/spool\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = helix("keys", "create", "--user", "alice", "--json", env=clean_env(HELIXAGENT_CONFIG=str(f)), cwd=work)
    assert r.returncode == 0, r.stderr
    assert f"# database: sqlite:///{db}" in r.stderr and f"$HELIXAGENT_CONFIG={f}" in r.stderr
    assert not (work / "helixagent.db").exists()
    ls = helix("keys", "list", "--config", str(f), cwd=work)
    assert "alice" in ls.stdout and f"# database: sqlite:///{db} (from {f})" in ls.stderr
    # no config at all: the default file, shown with its absolute path and where it comes from
    d = helix("keys", "list", cwd=work)
    assert d.returncode == 0, d.stderr
    assert f"sqlite:///./helixagent.db ({work}/helixagent.db)" in d.stderr and "built-in default" in d.stderr
    u = helix("usage", "--group-by", "provider", env=clean_env(HELIXAGENT_CONFIG=str(f)), cwd=work)
    assert u.returncode == 0 and f"# database: sqlite:///{db}" in u.stderr, u.stderr


def test_database_line_masks_the_password():
    line = describe_database("postgresql://helix:s3cr3t-pw@db.internal:5432/helix", "/etc/helix.yaml")
    assert "s3cr3t-pw" not in line and "postgresql://helix:****@db.internal:5432/helix" in line


# -- 6. the seed's `curl /metrics | grep token_usage` ---------------------------------------------------------
def test_token_usage_metric_by_provider_and_model(gateway):
    r = httpx.post(gateway.url + "/v1/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b c"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    lines = [ln for ln in httpx.get(gateway.url + "/metrics").text.splitlines()
             if "token_usage" in ln and not ln.startswith("#")]
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in lines}
    assert values == {
        'helixagent_token_usage_total{model="gpt-4o-mini",provider="openai",type="prompt"}':
            usage["prompt_tokens"],
        'helixagent_token_usage_total{model="gpt-4o-mini",provider="openai",type="completion"}':
            usage["completion_tokens"],
    }, lines
    assert "helixagent_tokens_used_total{" in httpx.get(gateway.url + "/metrics").text


# -- 7. `make run` installs the runtime only; `make test` runs every test on a fresh machine ----------------
def _make_n(target: str, tmp_path: Path) -> str:
    r = subprocess.run(["make", "-n", target, f"VENV={tmp_path}/venv"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_run_installs_the_runtime_only(tmp_path):
    run = _make_n("run", tmp_path)
    assert "pip install -q -e ." in run and "[test]" not in run
    test = _make_n("test", tmp_path)
    assert "pip install -q -e '.[test]'" in test
    # separate stamps: an environment installed for `run` is not taken as installed for `test`
    stamp = [ln for ln in run.splitlines() if ln.startswith("touch ")]
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    for ln in stamp:
        Path(ln.split()[-1]).touch()
    assert "[test]" in _make_n("test", tmp_path)
    assert "pip install" not in _make_n("run", tmp_path)


def test_real_servers_are_reachable():
    """Run directly and by the test below with no URLs: the PostgreSQL and Redis the suite uses answer."""
    from conftest import need_postgres, need_redis
    import psycopg2
    import redis
    conn = psycopg2.connect(need_postgres())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    client = redis.Redis.from_url(need_redis())
    try:
        assert client.ping()
    finally:
        client.close()


def test_suite_without_urls_starts_private_servers():
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "HELIX_TEST_POSTGRES_URL", "HELIX_TEST_REDIS_URL")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        f"{__file__}::test_real_servers_are_reachable"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert "1 passed" in r.stdout and "skipped" not in r.stdout, r.stdout + r.stderr
