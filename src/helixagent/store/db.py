"""Database engines: SQLite by default, PostgreSQL when configured.

``database.url`` is written the usual way (``sqlite:///./helixagent.db``, ``postgresql://user@host/db``);
the async driver (aiosqlite, asyncpg) is chosen here.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


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
    return u.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, pool_size: int = 10, **kw: Any) -> AsyncEngine:
    if is_sqlite(url):
        return create_async_engine(async_url(url), **kw)
    return create_async_engine(async_url(url), pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **kw)
