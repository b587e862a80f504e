"""Reads for reports from ``database.read_url`` (a read replica), with the primary as the fallback.

Only reports read here: ``GET /v1/usage`` and the CLI's ``helixagent usage``.  Writes -- records, keys,
migrations, purge, key rotation -- always use ``database.url``.

* No ``read_url``: every read goes to the primary (``source`` ``primary``).
* The replica answers: ``source`` ``replica``.  A replica lags behind the primary (streaming replication:
  usually below a second, more under load or after a network break); a report may miss the newest records.
* The replica is unavailable (refused, reset, timed out, its pool exhausted, a missing table -- the
  :data:`~.db.DB_UNAVAILABLE` errors): the read is repeated on the primary (``source``
  ``primary-fallback``) with one warning log line when the replica goes away, and one when it answers again.
  For ``database.retry_interval`` after a failure reads go straight to the primary, so a replica that
  hangs does not slow every report by its connect timeout; then the replica is tried again.  A bug of ours
  (any other exception) propagates.

The URL is never logged or shown with its password (:func:`~helixagent.preflight.mask_url`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import ConfigError, DatabaseConfig
from .db import DB_UNAVAILABLE, engine_for

log = logging.getLogger("helixagent.store")
T = TypeVar("T")

PRIMARY = "primary"
REPLICA = "replica"
FALLBACK = "primary-fallback"


def _where(url: str) -> str:
    """host:port/database of a URL, for log lines (no user, no password)."""
    from sqlalchemy.engine import make_url
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"sqlite:{u.database or ':memory:'}"
    return f"{u.host or 'localhost'}:{u.port or 5432}/{u.database or ''}"


class ReadRouter:
    def __init__(self, primary: AsyncEngine, db: DatabaseConfig, clock: Callable[[], float] = time.monotonic):
        self.primary = primary
        self.read_url = db.read_url
        self.replica: AsyncEngine | None = None
        if db.read_url:
            try:
                self.replica = engine_for(db, db.read_url, application_name="helixagent-read")
            except ValueError as exc:  # an unsupported database: name the key that holds it
                raise ConfigError(str(exc).replace("database.url", "database.read_url")) from None
        self.retry_interval = db.retry_interval
        self._clock = clock
        self._down_since: float | None = None    # the replica's last failure (None: it answers)
        self._last_error = ""

    @property
    def replica_state(self) -> str | None:
        """None without a replica; ``ok``; or ``unavailable (<error type>)``."""
        if self.replica is None:
            return None
        return "ok" if self._down_since is None else f"unavailable ({self._last_error}); reading from the primary"

    async def read(self, fn: Callable[[AsyncEngine], Awaitable[T]]) -> tuple[T, str]:
        """``fn(engine)`` on the replica, else on the primary; returns (result, source)."""
        if self.replica is None:
            return await fn(self.primary), PRIMARY
        if self._down_since is None or self._clock() - self._down_since >= self.retry_interval:
            try:
                result = await fn(self.replica)
            except DB_UNAVAILABLE as exc:  # an outage of the replica; a bug of ours propagates
                self._failed(exc)
            else:
                self._recovered()
                return result, REPLICA
        return await fn(self.primary), FALLBACK

    async def probe(self, timeout: float) -> str | None:
        """For /readyz: ``SELECT 1`` on the replica within ``timeout`` seconds; its state afterwards (None
        without a replica).  A failure or a recovery found here switches the reads as a report's would."""
        if self.replica is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                async with self.replica.connect() as conn:
                    await conn.execute(text("SELECT 1"))
        except DB_UNAVAILABLE as exc:
            self._failed(exc)
        else:
            self._recovered()
        return self.replica_state

    def _recovered(self) -> None:
        if self._down_since is not None:
            self._down_since = None
            log.warning("read replica %s answers again: reports read from it again", _where(self.read_url or ""))

    def _failed(self, exc: BaseException) -> None:
        first = self._down_since is None
        self._down_since = self._clock()
        self._last_error = type(exc).__name__
        if first:
            # the type only: a driver's message may quote the connection string
            log.warning("read replica %s (database.read_url) is unavailable (%s): reports read from the primary "
                        "(database.url) and the replica is tried again every %gs", _where(self.read_url or ""),
                        self._last_error, self.retry_interval)

    async def close(self) -> None:
        if self.replica is not None:
            await self.replica.dispose()
