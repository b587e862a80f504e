"""The operations kit (deploy/scripts, deploy/loadtest): backup then restore round trips against SQLite and
the real PostgreSQL with records written through a running gateway, rotation, encryption, the refusal to
overwrite a database that holds records, and the Python load test against a gateway with the mock provider."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml

from conftest import need_postgres
from support.pg import fresh_schema
from support.servers import GatewayServer, wait_until

from helixagent.config import load_config
from helixagent.store.db import make_sync_engine
from helixagent.store.schema import completions as C

ROOT = Path(__file__).resolve().parent.parent
BACKUP = ROOT / "deploy" / "scripts" / "backup.sh"
RESTORE = ROOT / "deploy" / "scripts" / "restore.sh"
LOADTEST = ROOT / "deploy" / "loadtest" / "load_test.py"
BODY = {"model": "mock", "messages": [{"role": "user", "content": "remember this record"}]}
PASSPHRASE = "correct horse battery staple 42"


def script(path: Path, *args: str, cwd: Path, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "HELIXAGENT_"))}
    e["HELIXAGENT_PYTHON"] = sys.executable
    e.update(env or {})
    p = subprocess.run(["bash", str(path), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, f"{path.name} {args} failed ({p.returncode}):\n{p.stderr}"
    return p


def ids_in_db(url: str) -> set[str]:
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(C.c.request_id))}
    finally:
        eng.dispose()


def write_config(tmp: Path, db_url: str) -> Path:
    cfg = tmp / "helixagent.yaml"
    cfg.write_text(yaml.safe_dump({
        "providers": [{"name": "mock", "type": "mock"}],
        "logging": {"level": "warning", "file": str(tmp / "logs" / "helixagent.log")},
        "database": {"url": db_url, "spool_dir": str(tmp / "spool"), "flush_interval": "20ms",
                     "auto_migrate": True}}))
    (tmp / "logs").mkdir(exist_ok=True)
    (tmp / "logs" / "helixagent.log").write_text('{"msg": "a log line to keep"}\n')
    (tmp / "logs" / "helixagent.log.1").write_text('{"msg": "a rotated log line"}\n')
    return cfg


def record_through_gateway(cfg_path: Path, n: int) -> set[str]:
    """Start a gateway on the config, make ``n`` chat completions over HTTP, stop it (the writer flushes)."""
    cfg = load_config(cfg_path)
    gw = GatewayServer(cfg=cfg)
    try:
        ids = set()
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            for i in range(n):
                r = client.post("/v1/chat/completions", json={**BODY, "user": f"u{i}"})
                assert r.status_code == 200, r.text
                ids.add(r.headers["x-helixagent-request-id"])
    finally:
        gw.close()
    assert wait_until(lambda: ids <= ids_in_db(cfg.database.url), timeout=15)
    return ids


def wipe(url: str) -> None:
    eng = make_sync_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(sa.delete(C))
    finally:
        eng.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from fresh_schema(need_postgres())


@pytest.fixture
def pg_database_url() -> Iterator[str]:
    """A whole fresh database (public schema, no search_path in the URL): the usual deployment."""
    import uuid

    import psycopg2
    base = need_postgres().replace("postgresql+psycopg2://", "postgresql://")
    name = "helix_ops_" + uuid.uuid4().hex[:10]
    conn = psycopg2.connect(base)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def round_trip(tmp_path: Path, db_url: str) -> None:
    cfg = write_config(tmp_path, db_url)
    ids = record_through_gateway(cfg, 5)
    out = tmp_path / "backups"
    archive = Path(script(BACKUP, "--config", str(cfg), "--out", str(out), cwd=tmp_path).stdout.strip())
    assert archive.is_file() and archive.name.endswith(".tar.gz")
    with tarfile.open(archive) as tf:
        names = {Path(n).name for n in tf.getnames()}
    assert {"MANIFEST", "helixagent.yaml", "helixagent.log", "helixagent.log.1"} <= names
    assert ("db.sqlite" if db_url.startswith("sqlite") else "db.pgdump") in names

    # the database still holds the records: restore refuses without --force, and changes nothing
    p = script(RESTORE, str(archive), "--config", str(cfg), cwd=tmp_path, check=False)
    assert p.returncode != 0 and "--force" in p.stderr, p.stderr
    assert ids_in_db(db_url) == ids

    # lose the records (and add a stranger), then restore: exactly the backed-up records are back
    wipe(db_url)
    assert ids_in_db(db_url) == set()
    script(RESTORE, str(archive), "--config", str(cfg), cwd=tmp_path)
    assert ids_in_db(db_url) == ids
    assert (tmp_path / "helixagent.yaml.restored").read_text() == cfg.read_text()

    # a gateway runs on the restored database, and a forced restore replaces newer records
    later = record_through_gateway(cfg, 2)
    assert ids_in_db(db_url) == ids | later
    script(RESTORE, str(archive), "--config", str(cfg), "--force", cwd=tmp_path)
    assert ids_in_db(db_url) == ids


def test_sqlite_backup_restore_round_trip(tmp_path: Path) -> None:
    round_trip(tmp_path, f"sqlite:///{tmp_path / 'gw.db'}")


def test_postgres_backup_restore_round_trip(tmp_path: Path, pg_url: str) -> None:
    round_trip(tmp_path, pg_url)


def test_postgres_whole_database_round_trip(tmp_path: Path, pg_database_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a password in the URL (the test server trusts loopback and ignores it) is never printed by the scripts
    url = pg_database_url.replace("postgresql://postgres@", "postgresql://postgres:hunter2-ops-secret@")
    assert "hunter2-ops-secret" in url
    outputs: list[str] = []
    real = subprocess.run

    def spy(*a: object, **kw: object) -> object:
        p = real(*a, **kw)  # type: ignore[call-overload]
        outputs.append(f"{p.args} {p.stdout} {p.stderr}")
        return p
    monkeypatch.setattr(subprocess, "run", spy)
    round_trip(tmp_path, url)
    monkeypatch.undo()
    assert len(outputs) >= 4
    assert all("hunter2-ops-secret" not in o for o in outputs)


def test_sqlite_restore_into_a_missing_database_file(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    cfg = write_config(tmp_path, f"sqlite:///{db}")
    ids = record_through_gateway(cfg, 3)
    archive = script(BACKUP, "--config", str(cfg), "--out", str(tmp_path / "b"), cwd=tmp_path).stdout.strip()
    db.unlink()
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)
    script(RESTORE, archive, "--config", str(cfg), cwd=tmp_path)
    assert ids_in_db(f"sqlite:///{db}") == ids


def test_rotation_keeps_the_newest_n(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'gw.db'}")
    record_through_gateway(cfg, 1)
    out = tmp_path / "backups"
    made = [script(BACKUP, "--config", str(cfg), "--out", str(out), "--keep", "3", cwd=tmp_path).stdout.strip()
            for _ in range(5)]
    assert len(set(made)) == 5
    left = sorted(str(p) for p in out.glob("helixagent-*"))
    assert left == sorted(made[-3:])
    assert not list(out.glob(".staging-*"))


def test_encrypted_backup_has_no_plaintext_and_restores(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'gw.db'}"
    cfg = write_config(tmp_path, db_url)
    ids = record_through_gateway(cfg, 3)
    pw = tmp_path / "pass"
    pw.write_text(PASSPHRASE + "\n")
    archive = Path(script(BACKUP, "--config", str(cfg), "--out", str(tmp_path / "b"),
                          "--encrypt-to", f"file:{pw}", cwd=tmp_path).stdout.strip())
    assert archive.name.endswith(".tar.gz.enc")
    data = archive.read_bytes()
    assert data.startswith(b"Salted__")
    for plain in (b"remember this record", b"helixagent.yaml", b"MANIFEST", b"SQLite format", b"\x1f\x8b\x08"):
        assert plain not in data
    assert not tarfile.is_tarfile(archive)
    # without, or with a wrong, passphrase: no restore
    wipe(db_url)
    p = script(RESTORE, str(archive), "--config", str(cfg), cwd=tmp_path, check=False)
    assert p.returncode != 0 and "--decrypt-with" in p.stderr
    p = script(RESTORE, str(archive), "--config", str(cfg), "--decrypt-with", "env:BACKUP_PASS", cwd=tmp_path,
               check=False, env={"BACKUP_PASS": "wrong"})
    assert p.returncode != 0
    assert ids_in_db(db_url) == set()
    script(RESTORE, str(archive), "--config", str(cfg), "--decrypt-with", "env:BACKUP_PASS", cwd=tmp_path,
           env={"BACKUP_PASS": PASSPHRASE})
    assert ids_in_db(db_url) == ids
    assert PASSPHRASE not in " ".join([p.stdout, p.stderr])


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"sqlite:///{tmp_path / 'gw.db'}")
    for args in (["--keep", "x"], ["--encrypt-to", "plaintext-passphrase"], ["--config", str(tmp_path / "nope")],
                 ["--bogus"]):
        p = script(BACKUP, "--config", str(cfg), *args, cwd=tmp_path, check=False)
        assert p.returncode != 0 and p.stderr, args
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").glob("helixagent-*"))


def test_python_load_test_against_a_gateway(tmp_path: Path) -> None:
    gw = GatewayServer({"providers": [{"name": "mock", "type": "mock"}]})
    try:
        p = subprocess.run([sys.executable, str(LOADTEST), "--url", gw.url, "--vus", "8", "--duration", "2",
                            "--model", "mock"], capture_output=True, text=True, timeout=60)
    finally:
        gw.close()
    assert p.returncode == 0, p.stderr
    out = p.stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert int(fields["requests"]) > 0
    assert int(fields["errors"]) == 0
    assert fields["error rate"] == "0.00%"
    assert float(fields["req/s"]) > 0
    for k in ("p50", "p95", "p99"):
        assert fields[k].endswith("ms")


def test_load_test_refuses_a_non_loopback_url_without_allow_remote(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(LOADTEST), "--url", "http://192.0.2.1:8080", "--duration", "1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "--allow-remote" in p.stderr


def test_scripts_parse() -> None:
    for s in (BACKUP, RESTORE, BACKUP.parent / "_common.sh"):
        subprocess.run(["bash", "-n", str(s)], check=True)
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", "-x", "-P", str(BACKUP.parent), str(BACKUP), str(RESTORE)],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stdout


def test_logrotate_example_rotates_a_live_file_handler(tmp_path: Path) -> None:
    """The gateway opens logging.file once (logging.FileHandler, append mode) and never reopens it: the
    example rotates with copytruncate, so lines written after a rotation land in the live file, not in the
    rotated copy.  Run the example for real (logrotate -f with its own state file) on a file a FileHandler
    holds open."""
    import logging
    text = (ROOT / "deploy" / "logrotate" / "helixagent").read_text()
    assert "copytruncate" in text
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert os.path.exists(logrotate), "logrotate is not installed (scripts/test-setup.sh installs it)"
    log_file = tmp_path / "helixagent.log"
    conf = tmp_path / "logrotate.conf"
    body = text.replace("/var/log/helixagent/helixagent.log", str(log_file))
    body = "\n".join(ln for ln in body.splitlines() if not ln.strip().startswith("su "))
    conf.write_text(body + "\n")
    p = subprocess.run([logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0 and "error:" not in p.stderr, p.stderr
    handler = logging.FileHandler(log_file)
    logger = logging.Logger("ops-kit-test")
    logger.addHandler(handler)
    try:
        logger.warning("before rotation")
        handler.flush()
        p = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0 and "error:" not in p.stderr, p.stderr
        logger.warning("after rotation")
        handler.flush()
    finally:
        handler.close()
    rotated = [f for f in tmp_path.iterdir() if f.name.startswith("helixagent.log-")]
    assert len(rotated) == 1, list(tmp_path.iterdir())
    assert rotated[0].read_text() == "before rotation\n"
    live = log_file.read_bytes()
    assert live == b"after rotation\n"  # no hole of NUL bytes: the handler appends at the truncated end


def test_k6_script_matches_the_gateway() -> None:
    """k6 is not on this machine: check the script's syntax with node (as an ES module) and that it loads
    the route and checks the header the gateway really serves."""
    js = ROOT / "deploy" / "loadtest" / "load-test.js"
    text = js.read_text()
    assert "/v1/chat/completions" in text and "thresholds" in text and "vus: 100" in text
    assert "X-Helixagent-Request-Id" in text
    node = shutil.which("node")
    assert node, "node is not installed (the real-client tests need it too)"
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "load-test.mjs"
        copy.write_text(text)
        p = subprocess.run([node, "--check", str(copy)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    # the header k6 reads (Go canonicalises names) is the one a completion carries
    gw = GatewayServer({"providers": [{"name": "mock", "type": "mock"}]})
    try:
        r = httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=10)
    finally:
        gw.close()
    assert r.status_code == 200 and r.headers.get("x-helixagent-request-id")
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)
