"""Is the database already at the schema head?  Answered without importing Alembic (about 11 MB resident
with Mako and Pygments): the gateway's start-up migration asks this first and imports
:mod:`helixagent.store.migrate` only when a migration must actually run.

The head is read from the revision files in ``migrations/versions`` (their ``revision`` and
``down_revision`` lines -- the same source Alembic reads); the stored revision from Alembic's own
``alembic_version`` table through SQLAlchemy.  Anything unexpected (no table, no readable head, several
heads, a database error) answers "not current", so the caller runs the real migration and reports what
that says -- the start-up semantics are those of always running ``migrate.upgrade``.
"""
from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.exc import SQLAlchemyError

from .db import make_sync_engine

VERSIONS_DIR = Path(__file__).resolve().parent / "migrations" / "versions"
VERSION_TABLE = "alembic_version"   # Alembic's default, which migrations/env.py keeps
_REV = re.compile(r'^revision\s*(?::\s*str\s*)?=\s*["\']([^"\']+)["\']', re.M)
_DOWN = re.compile(r'^down_revision\s*(?::[^=]+)?=\s*(None|["\']([^"\']+)["\'])', re.M)


def heads() -> set[str]:
    """The head revision(s) of the migration scripts shipped with this version."""
    revs: set[str] = set()
    downs: set[str] = set()
    for path in VERSIONS_DIR.glob("[!_]*.py"):
        src = path.read_text(encoding="utf-8")
        rev, down = _REV.search(src), _DOWN.search(src)
        if rev is None or down is None:
            return set()   # a script this reader does not understand: let Alembic decide
        revs.add(rev.group(1))
        if down.group(2):
            downs.add(down.group(2))
    return revs - downs


def stored(url: str) -> set[str] | None:
    """The revision(s) recorded in the database; None if it has no version table."""
    eng = make_sync_engine(url)
    try:
        with eng.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            return {str(r[0]) for r in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))}
    finally:
        eng.dispose()


def at_head(url: str) -> bool:
    """True only if the database is certainly at the head: then ``migrate.upgrade`` would be a no-op."""
    head = heads()
    if len(head) != 1:
        return False
    try:
        cur = stored(url)
    except SQLAlchemyError:   # unreachable or unreadable: the real migration runs and reports it
        return False
    return cur == head
