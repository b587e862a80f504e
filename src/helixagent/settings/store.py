"""``database:``, ``encryption:`` and ``retention:`` -- the completion records (docs/records.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Strict, parse_duration


class DatabaseConfig(Strict):
    url: str = "sqlite:///./helixagent.db"
    # Reads for reports (GET /v1/usage, `helixagent usage`) go here when set; writes never do.  See
    # docs/records.md#connection-pool-and-read-replica.
    read_url: str | None = None
    # Connection pool, per pool and per worker process (store/db.py maps them onto SQLAlchemy's):
    # max_open_conns is the hard cap, max_idle_conns the connections kept open when idle (pool_size is its
    # older name), conn_max_lifetime recycles older connections, pool_timeout is the longest wait for one.
    pool_size: int | None = Field(default=None, ge=1)
    max_open_conns: int | None = Field(default=None, ge=1)
    max_idle_conns: int | None = Field(default=None, ge=1)
    conn_max_lifetime: float | None = None
    pool_timeout: float = 10.0
    spool_dir: str = "./spool"
    batch_size: int = Field(default=500, ge=1)
    queue_size: int = Field(default=10000, ge=1)
    flush_interval: float = 0.2
    record_bodies: bool = True
    # run `migrate up` at start-up; default (None): yes for SQLite, no for PostgreSQL
    auto_migrate: bool | None = None
    # how often the writer probes an unreachable database, and fsyncs spool segments meanwhile
    retry_interval: float = 1.0
    spool_fsync_interval: float = 1.0

    _d = field_validator("flush_interval", "retry_interval", "spool_fsync_interval", "pool_timeout",
                         mode="before")(lambda v: parse_duration(v))
    _lt = field_validator("conn_max_lifetime", mode="before")(
        lambda v: None if v is None else parse_duration(v))

    @model_validator(mode="after")
    def _pool(self) -> "DatabaseConfig":
        if self.pool_size is not None and self.max_idle_conns is not None and self.pool_size != self.max_idle_conns:
            raise ValueError(f"database.pool_size ({self.pool_size}) and database.max_idle_conns "
                             f"({self.max_idle_conns}) are the same setting (pool_size is its older name): "
                             "give one of them")
        idle = self.max_idle_conns if self.max_idle_conns is not None else self.pool_size
        if idle is not None and self.max_open_conns is not None and idle > self.max_open_conns:
            key = "max_idle_conns" if self.max_idle_conns is not None else "pool_size"
            raise ValueError(f"database.{key} ({idle}) is more than database.max_open_conns "
                             f"({self.max_open_conns}): no more connections can be kept idle than may be open")
        if self.conn_max_lifetime is not None and self.conn_max_lifetime <= 0:
            raise ValueError("database.conn_max_lifetime must be a positive duration (e.g. 30m); leave it out "
                             "to keep connections without a limit")
        if self.pool_timeout <= 0:
            raise ValueError("database.pool_timeout must be a positive duration (e.g. 10s)")
        if self.read_url is not None and not self.read_url.strip():
            self.read_url = None   # `read_url: ${HELIXAGENT_DATABASE_READ_URL}` with the variable unset
        return self

    def pool_limits(self) -> tuple[int, int]:
        """(max_open, max_idle).  Neither given: 20 open, 10 kept.  Only the idle count (max_idle_conns or
        pool_size): twice as many open.  Only max_open_conns: all of them kept."""
        idle = self.max_idle_conns if self.max_idle_conns is not None else self.pool_size
        if self.max_open_conns is not None:
            return self.max_open_conns, idle if idle is not None else self.max_open_conns
        idle = idle if idle is not None else 10
        return 2 * idle, idle


class EncryptionConfig(Strict):
    enabled: bool = False
    algorithm: Literal["aes-256-gcm"] = "aes-256-gcm"
    key_rotation_days: int = Field(default=30, ge=1)
    key_file: str | None = None


class RetentionConfig(Strict):
    days: int = Field(default=90, ge=1)
    purge_interval: float = 3600.0
    batch_size: int = Field(default=1000, ge=1)

    _d = field_validator("purge_interval", mode="before")(lambda v: parse_duration(v))
