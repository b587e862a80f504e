"""Alembic environment for HelixAgent.  Built programmatically by helixagent.store.migrate (no alembic.ini
needed): the database URL arrives in ``config.attributes["url"]`` (or a live connection in
``config.attributes["connection"]``)."""
from __future__ import annotations

from alembic import context
from sqlalchemy import text

from helixagent.store.db import make_sync_engine
from helixagent.store.schema import metadata

config = context.config
target_metadata = metadata
# A fixed key for pg_advisory_xact_lock: concurrent `migrate up` (several workers) run one at a time.
_LOCK_KEY = 706100001


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic: no database URL (config.attributes['url'] or sqlalchemy.url)")
    engine = make_sync_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.attributes.get("url") or config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
