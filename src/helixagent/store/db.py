"""Database engines: SQLite by default, PostgreSQL when configured.

``database.url`` is written the usual way (``sqlite:///./helixagent.db``, ``postgresql://user@host/db``);
the async driver (aiosqlite, asyncpg) is chosen here.

PostgreSQL server settings may be given the libpq way, ``?options=-csearch_path%3Dmyschema`` (e.g. to keep
HelixAgent's tables in their own schema): psycopg2 understands that natively and for asyncpg it is turned
into ``server_settings``.  SQLite files are opened in WAL mode with a busy timeout so the usage API can
read while the writer writes, and several processes can share one file.

Pools: :func:`engine_for` builds an engine from ``database:`` -- ``max_open_conns`` (hard cap),
``max_idle_conns`` / ``pool_size`` (kept when idle), ``conn_max_lifetime`` (recycle), ``pool_timeout``
(longest wait for a free connection) -- see :func:`pool_kwargs` and docs/records.md.  Each pool names
itself in PostgreSQL's ``application_name`` (``helixagent``, ``helixagent-keys``, ``helixagent-read``).
"""
from __future__ import annotations

import asyncio
import shlex
import sqlite3
from typing import Any, Callable, cast

import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..config import DatabaseConfig


# What "the database is unavailable" looks like to a caller: a driver error (refused, reset, server
# starting or gone, missing table), a socket error, a connect/pool timeout.  Anything else -- a TypeError,
# a KeyError -- is a bug of ours and must propagate as a loud 500, never pass for an outage.
DB_UNAVAILABLE: tuple[type[Exception], ...] = (sqlalchemy.exc.DBAPIError, sqlalchemy.exc.TimeoutError,
                                               sqlalchemy.exc.DisconnectionError, OSError, asyncio.TimeoutError)


def is_pool_timeout(exc: BaseException) -> bool:
    """True for "every connection of the pool is busy and none came free within pool_timeout"."""
    return isinstance(exc, sqlalchemy.exc.TimeoutError)


def async_url(url: str) -> str:
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"database.url: unsupported database {backend!r} (use sqlite:/// or postgresql://)")
    return u.render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """The URL for synchronous tools (Alembic runs migrations with the sync drivers)."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg2")
    elif backend == "sqlite":
        u = u.set(drivername="sqlite")
    else:
        raise ValueError(f"database.url: unsupported database {backend!r} (use sqlite:/// or postgresql://)")
    return u.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL (None for an in-memory database)."""
    db = make_url(url).database
    return None if not db or db == ":memory:" else db


def pg_server_settings(options: str) -> dict[str, str]:
    """libpq ``options`` (``-c key=value -c ...``) -> a dict of server settings."""
    out: dict[str, str] = {}
    parts = shlex.split(options)
    i = 0
    while i < len(parts):
        p = parts[i]
        if p == "-c" and i + 1 < len(parts):
            kv = parts[i + 1]
            i += 2
        elif p.startswith("-c"):
            kv = p[2:]
            i += 1
        elif p.startswith("--"):
            kv = p[2:]
            i += 1
        else:
            raise ValueError(f"database.url: unsupported options entry {p!r} (use -c name=value)")
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"database.url: options entry {kv!r} needs name=value")
        out[k.replace("-", "_")] = v
    return out


# Page size of a new SQLite file (set before the first write; an existing file keeps its own, and SQLite
# ignores the PRAGMA there).  A record row is 1-2 KB with its bodies: with 16 KiB pages instead of SQLite's
# 4 KiB default the writer's SQLite work per row is 14-19% less CPU (fewer WAL frames, pwrite(2) calls and
# checkpoint copies; interleaved A/B, bench/store_bench.py --sqlite-ab) and the file about 20% smaller.
# An existing file converts offline: ``PRAGMA journal_mode=DELETE; PRAGMA page_size=16384; VACUUM;``.
SQLITE_PAGE_SIZE = 16384


def _sqlite_fast_binding() -> None:
    """Identity adapters for the parameter types the stdlib driver would otherwise "adapt" the slow way.

    ``sqlite3`` binds exact ``int``/``float``/``str`` directly; every other value (``None``, ``bool``,
    ``bytes`` -- 12 of a default record row's 24 values) goes through the adapter protocol, which, finding no
    registered adapter, looks up ``PrepareProtocol.__adapt__`` and formats and discards an AttributeError
    each time: about 1,250 CPU instructions per value, 4.4% of a default-stage request (callgrind).  A
    registered adapter is found first.  These three change nothing that is bound: ``bytes(b)`` is ``b``,
    ``int(True)`` is the 1 SQLite stores for a bool anyway, and ``{}.get(None)`` is ``None`` (a C callable
    that returns its None argument).  The registry is the ``sqlite3`` module's, so this holds for every
    connection of the process; registering again is harmless."""
    sqlite3.register_adapter(bytes, bytes)
    sqlite3.register_adapter(bool, int)
    none = cast("Callable[[None], None]", {}.get)
    sqlite3.register_adapter(type(None), none)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")   # before journal_mode: that writes the header
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def pool_kwargs(max_open: int, max_idle: int, lifetime: float | None, timeout: float) -> dict[str, Any]:
    """The seed's pool settings in SQLAlchemy's terms.  QueuePool keeps ``pool_size`` connections and
    opens up to ``max_overflow`` more under load (closed again when returned), so ``pool_size`` is
    max_idle and ``pool_size + max_overflow`` the hard cap max_open; ``pool_recycle`` replaces a
    connection older than the lifetime when it is next checked out; a checkout that finds max_open busy
    waits ``pool_timeout`` seconds, then raises sqlalchemy's TimeoutError (:func:`is_pool_timeout`)."""
    if not 1 <= max_idle <= max_open:
        raise ValueError(f"database pool: max_idle_conns ({max_idle}) must be 1..max_open_conns ({max_open})")
    return {"pool_size": max_idle, "max_overflow": max_open - max_idle,
            "pool_recycle": -1 if lifetime is None else lifetime, "pool_timeout": timeout}


def engine_for(db: DatabaseConfig, url: str | None = None, application_name: str = "helixagent",
               **kw: Any) -> AsyncEngine:
    """An engine for ``url`` (default ``database.url``) with the pool settings of ``database:``."""
    max_open, max_idle = db.pool_limits()
    return make_engine(url or db.url, pool=pool_kwargs(max_open, max_idle, db.conn_max_lifetime,
                                                       db.pool_timeout),
                       application_name=application_name, **kw)


def make_engine(url: str, pool_size: int = 10, *, pool: dict[str, Any] | None = None,
                application_name: str = "helixagent", **kw: Any) -> AsyncEngine:
    """``pool`` (from :func:`pool_kwargs`) overrides the default pool (``pool_size`` kept, as many again
    under load).  An in-memory SQLite database has one connection (StaticPool) and takes no pool settings."""
    if pool is None:
        pool = {"pool_size": pool_size, "max_overflow": pool_size}
    if is_sqlite(url):
        _sqlite_fast_binding()
        if sqlite_path(url):
            for k, v in pool.items():
                kw.setdefault(k, v)
        eng = create_async_engine(async_url(url), **kw)
        if sqlite_path(url):
            event.listen(eng.sync_engine, "connect", _sqlite_pragmas)
        return eng
    u = make_url(async_url(url))
    ca = dict(kw.pop("connect_args", {}) or {})
    opts = u.query.get("options")
    if opts is not None:
        if isinstance(opts, tuple):
            opts = " ".join(opts)
        u = u.difference_update_query(["options"])
        ss = dict(ca.get("server_settings") or {})
        ss.update(pg_server_settings(opts))
        ca["server_settings"] = ss
    # who we are in pg_stat_activity (an application_name in the URL's options wins)
    ca["server_settings"] = {"application_name": application_name, **(ca.get("server_settings") or {})}
    # fail fast when the server is away (the writer spools meanwhile) instead of asyncpg's 60 s
    ca.setdefault("timeout", 10)
    ca.setdefault("command_timeout", 60)
    kw["connect_args"] = ca
    for k, v in pool.items():
        kw.setdefault(k, v)
    kw.setdefault("pool_pre_ping", True)
    return create_async_engine(u, **kw)


def make_sync_engine(url: str, **kw: Any) -> Any:
    """A synchronous engine (migrations, CLI maintenance)."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool
    kw.setdefault("poolclass", NullPool)
    eng = create_engine(sync_url(url), **kw)
    if is_sqlite(url) and sqlite_path(url):
        event.listen(eng, "connect", _sqlite_pragmas)
    return eng
