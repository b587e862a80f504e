"""Schema migrations (Alembic), driven from code: no alembic.ini is needed in the working directory.

``upgrade(url)`` / ``downgrade(url, steps)`` / ``status(url)`` back the ``helixagent migrate`` command and
the gateway's start-up migration.  Concurrent runs are serialised: on PostgreSQL by an advisory lock (see
migrations/env.py), on SQLite by a lock file next to the database.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import Any, Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from .db import is_sqlite, make_sync_engine, sqlite_path

# Alembic's `context` is process-global: one migration at a time per process.
_PROCESS_LOCK = threading.Lock()
MIGRATIONS_DIR = str(Path(__file__).resolve().parent / "migrations")


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", MIGRATIONS_DIR)
    cfg.attributes["url"] = url     # not a main option: ConfigParser would choke on '%' in passwords
    return cfg


@contextlib.contextmanager
def _lock(url: str) -> Iterator[None]:
    with _PROCESS_LOCK:
        path = sqlite_path(url) if is_sqlite(url) else None
        if not path:
            yield
            return
        with _file_lock(path):
            yield


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd = os.open(os.path.abspath(path) + ".migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def upgrade(url: str, revision: str = "head") -> None:
    with _lock(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str, steps: int = 1) -> None:
    if steps < 1:
        raise ValueError("migrate down: N must be at least 1")
    target = current(url)
    if not target:
        raise ValueError("migrate down: the database has no migrations applied")
    with _lock(url):
        command.downgrade(alembic_config(url), f"-{steps}")


def current(url: str) -> str | None:
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            heads = MigrationContext.configure(conn).get_current_heads()
    finally:
        eng.dispose()
    return ",".join(heads) if heads else None


def status(url: str) -> dict[str, Any]:
    """Current revision, head, and the revisions still to apply (oldest first)."""
    script = ScriptDirectory.from_config(alembic_config(url))
    cur = current(url)
    head = script.get_current_head()
    pending: list[str] = []
    applied: list[str] = []
    cur_set = set(cur.split(",")) if cur else set()
    revs = list(script.walk_revisions())  # newest first
    revs.reverse()
    seen_current = not cur_set
    for rev in revs:
        if seen_current:
            pending.append(rev.revision)
        else:
            applied.append(rev.revision)
            if rev.revision in cur_set:
                seen_current = True
    if cur and not seen_current:   # the database is at a revision this version does not know
        pending = []
    return {"current": cur, "head": head, "applied": applied, "pending": pending,
            "up_to_date": cur == head}
