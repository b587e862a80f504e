"""Heavy libraries are imported only when their feature is configured or needed (issue 16, RSS):
Alembic only when the start-up migration must actually run, redis-py only with a Redis URL, cryptography
only with encryption on, python-multipart on the first file upload, and never uvicorn's websockets support
(the server protocol refuses upgrades).  Each case runs in a fresh interpreter and reads its sys.modules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helixagent.store import migrate, revision

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("alembic", "redis", "cryptography", "opentelemetry", "python_multipart", "websockets")

# Builds the gateway for the config in argv[1] (JSON), runs its start-up and one request through the
# pipeline-free /livez probe path, then prints which heavy packages got imported.
_PROBE = textwrap.dedent("""
    import asyncio, json, sys
    from helixagent.app import create_app
    from helixagent.config import load_config_dict
    cfg = load_config_dict(json.loads(sys.argv[1]), "<test>")
    async def main():
        gw = create_app(cfg)
        await gw.startup()
        await gw.shutdown()
    asyncio.run(main())
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(",")))))
""")


def loaded(cfg: dict, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cfg), ",".join(HEAVY)], check=True,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _db(tmp_path: Path) -> dict:
    return {"url": f"sqlite:///{tmp_path}/gw.db", "spool_dir": str(tmp_path / "spool")}


def test_head_read_without_alembic_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite:///unused.db"))
    assert revision.heads() == set(script.get_heads())


def test_at_head_only_when_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    assert revision.stored(url) is None and not revision.at_head(url)      # empty database: no table
    migrate.upgrade(url, "0005_completions_ensemble")
    assert revision.stored(url) == {"0005_completions_ensemble"} and not revision.at_head(url)
    migrate.upgrade(url)
    assert revision.at_head(url)
    assert revision.stored(url) == {migrate.status(url)["head"]}
    migrate.downgrade(url, 1)
    assert not revision.at_head(url)


def test_at_head_false_on_database_error(tmp_path: Path) -> None:
    # a PostgreSQL that is not there: "not current", so the real migration runs and reports the outage
    assert not revision.at_head("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")


def test_fresh_database_still_migrated_at_start(tmp_path: Path) -> None:
    got = loaded({"database": _db(tmp_path)})
    assert "alembic" in got                                   # the migration had to run
    assert revision.at_head(_db(tmp_path)["url"])


def test_migrated_database_starts_without_alembic_redis_cryptography(tmp_path: Path) -> None:
    migrate.upgrade(_db(tmp_path)["url"])
    full = {"database": _db(tmp_path), "auth": {"master_key": "hx-test-master-key-0000000000000000"},
            "rate_limits": {"backend": "memory", "ip": {"requests_per_minute": 1000}},
            "cache": {"enabled": True, "type": "memory"}}
    assert loaded(full) == []


def test_behind_by_one_revision_is_upgraded_at_start(tmp_path: Path) -> None:
    url = _db(tmp_path)["url"]
    migrate.upgrade(url, "0005_completions_ensemble")
    assert "alembic" in loaded({"database": _db(tmp_path)})
    assert revision.at_head(url)


def test_redis_imported_when_configured(tmp_path: Path) -> None:
    url = os.environ.get("HELIX_TEST_REDIS_URL")
    if not url:
        pytest.fail("HELIX_TEST_REDIS_URL is required")
    migrate.upgrade(_db(tmp_path)["url"])
    cfg = {"database": _db(tmp_path),
           "rate_limits": {"backend": "redis", "redis_url": url, "key_prefix": f"lazy{os.getpid()}",
                           "ip": {"requests_per_minute": 1000}}}
    assert "redis" in loaded(cfg)


def test_cryptography_imported_when_encryption_on(tmp_path: Path) -> None:
    from helixagent.store.crypto import generate_key_entry
    migrate.upgrade(_db(tmp_path)["url"])
    got = loaded({"database": _db(tmp_path), "encryption": {"enabled": True}},
                 env={"HELIXAGENT_ENCRYPTION_KEYS": generate_key_entry()})
    assert "cryptography" in got


def test_redis_client_lazy_names() -> None:
    code = ("import sys, helixagent.redis_client as rc; assert 'redis' not in sys.modules; "
            "o = rc.OUTAGE; assert 'redis' in sys.modules; import redis.exceptions as e; "
            "assert e.ConnectionError in o and OSError in o; rc.make_client; rc.is_cluster; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "ok"
    import helixagent.redis_client as rc
    with pytest.raises(AttributeError):
        rc.no_such_name  # noqa: B018


def test_server_config_loads_no_websockets() -> None:
    """uvicorn's ws="auto" would import the websockets package wherever another package installed it (this
    venv has it, through google-genai): serve's config says ws="none"."""
    code = textwrap.dedent("""
        import sys, types
        from helixagent.api.server import uvicorn_config
        from helixagent.config import load_config_dict
        import websockets  # installed here: auto would pick it
        del sys.modules["websockets"]
        for m in [m for m in sys.modules if m.startswith("websockets.")]:
            del sys.modules[m]
        cfg = load_config_dict({}, "<test>")
        c = uvicorn_config(lambda: None, cfg.server, factory=True, lifespan="off", loop="uvloop")
        c.load()
        print(c.ws_protocol_class, sorted(m for m in sys.modules if m.split(".")[0] == "websockets"))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip().splitlines()[-1] == "None []"


def test_multipart_parser_imported_on_first_upload() -> None:
    code = ("import sys, helixagent.batches.openai_api, helixagent.batches.multipart as mp; "
            "assert 'python_multipart' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "ok"
