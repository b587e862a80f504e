"""Virtual API keys: generation, hashing, storage (SQLAlchemy 2 async; SQLite or PostgreSQL).

A key is ``hx-`` followed by 43 URL-safe base64 characters (32 random bytes, 256 bits).  Only its
SHA-256 digest is stored.  A slow password hash (bcrypt, scrypt, argon2) protects *low-entropy*
secrets against guessing; a 256-bit random key cannot be guessed, so a single SHA-256 is as safe and
lets the gateway find the key by an indexed equality lookup (and a dict lookup in memory) in well under
a microsecond, on every request.  The first characters (``prefix``) are kept for display.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import GatewayError

KEY_PREFIX = "hx-"
ROLES = ("admin", "user", "readonly")
DISPLAY_PREFIX_LEN = 10  # "hx-" + 7 characters of the random part

metadata = MetaData()

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True, index=True),
    Column("prefix", String(16), nullable=False),
    Column("user_id", String(255), nullable=True, index=True),
    Column("application", String(255), nullable=True, index=True),
    Column("role", String(16), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("limits", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("rotated_from", String(32), nullable=True),
    Column("grace_until", DateTime(timezone=True), nullable=True),
)


class KeyLimits(BaseModel):
    """Per-key overrides (stored as JSON on the key).  They replace the config's values for this key."""
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    cost_per_day: float | None = Field(default=None, ge=0)
    cost_per_month: float | None = Field(default=None, ge=0)
    # the provider queues (routing/queue.py): the priority of a request that sends no
    # x-helixagent-priority header, the highest one it may ask for, and the key's weight in the fair share
    priority: Literal["high", "normal", "low"] | None = None
    max_priority: Literal["high", "normal", "low"] | None = None
    queue_weight: float | None = Field(default=None, gt=0, le=1000)


def validate_limits(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GatewayError(400, "'limits' must be an object", param="limits", code="invalid_type")
    try:
        return KeyLimits.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as exc:
        e = exc.errors()[0]
        name = ".".join(str(x) for x in e["loc"])
        msg = "unknown limit (use requests_per_minute, tokens_per_minute, tokens_per_day, tokens_per_month, " \
              "cost_per_day, cost_per_month, priority, max_priority, queue_weight)" \
            if e["type"] == "extra_forbidden" else e["msg"]
        raise GatewayError(400, f"limits.{name}: {msg}", param=f"limits.{name}", code="invalid_value") from None


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_id() -> str:
    return "key_" + secrets.token_hex(8)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(v: dt.datetime | None) -> dt.datetime | None:
    if v is None:
        return None
    return v if v.tzinfo is not None else v.replace(tzinfo=dt.timezone.utc)


def _ts(v: dt.datetime | None) -> float | None:
    return None if v is None else v.timestamp()


@dataclass(slots=True)
class KeyRecord:
    id: str
    key_hash: str
    prefix: str
    user_id: str | None
    application: str | None
    role: str
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    limits: dict[str, Any]
    created_at: dt.datetime
    rotated_from: str | None
    grace_until: dt.datetime | None
    # epoch seconds (for the hot path: a float comparison, no datetime arithmetic)
    not_after: float | None = field(default=None)

    def __post_init__(self) -> None:
        ends = [t for t in (_ts(self.expires_at), _ts(self.grace_until)) if t is not None]
        self.not_after = min(ends) if ends else None

    @classmethod
    def from_row(cls, row: Any) -> "KeyRecord":
        m = row._mapping
        return cls(m["id"], m["key_hash"], m["prefix"], m["user_id"], m["application"], m["role"],
                   _aware(m["expires_at"]), _aware(m["revoked_at"]), dict(m["limits"] or {}),
                   _aware(m["created_at"]) or utcnow(), m["rotated_from"], _aware(m["grace_until"]))

    def status(self, now: float | None = None) -> str:
        now = dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at.timestamp():
            return "expired"
        if self.grace_until is not None:
            return "rotated" if now >= self.grace_until.timestamp() else "rotating"
        return "active"

    def public(self) -> dict[str, Any]:
        """What the admin API and CLI show: never the hash, never the secret."""
        def iso(v: dt.datetime | None) -> str | None:
            return v.isoformat() if v is not None else None
        return {"id": self.id, "object": "api_key", "prefix": self.prefix, "user_id": self.user_id,
                "application": self.application, "role": self.role, "status": self.status(),
                "expires_at": iso(self.expires_at), "revoked_at": iso(self.revoked_at),
                "limits": self.limits, "created_at": iso(self.created_at), "rotated_from": self.rotated_from,
                "grace_until": iso(self.grace_until)}


class KeyStore:
    """CRUD on the ``api_keys`` table.  Used by the gateway (lookups, admin API) and the CLI."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def has_table(self) -> bool:
        from sqlalchemy import inspect

        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda c: inspect(c).has_table("api_keys"))

    async def ensure_table(self) -> bool:
        """Create the table outside the migrations (for tests and embedding only; the gateway and the CLI
        use ``helixagent migrate``, revision 0002_api_keys).  Returns True if it had to be created."""
        from sqlalchemy import inspect

        async with self.engine.begin() as conn:
            exists = await conn.run_sync(lambda c: inspect(c).has_table("api_keys"))
            if exists:
                return False
            try:
                await conn.run_sync(lambda c: metadata.create_all(c, tables=[api_keys], checkfirst=True))
            except Exception:  # noqa: BLE001 - another instance created it at the same moment
                pass
            return True

    async def create(self, *, user_id: str | None, application: str | None, role: str,
                     expires_at: dt.datetime | None = None, limits: dict[str, Any] | None = None,
                     rotated_from: str | None = None) -> tuple[KeyRecord, str]:
        if role not in ROLES:
            raise GatewayError(400, f"'role' must be one of {', '.join(ROLES)}; got {role!r}", param="role",
                               code="invalid_value")
        secret = new_secret()
        rec = KeyRecord(new_id(), hash_key(secret), secret[:DISPLAY_PREFIX_LEN], user_id, application, role,
                        expires_at, None, validate_limits(limits), utcnow(), rotated_from, None)
        async with self.engine.begin() as conn:
            await conn.execute(api_keys.insert().values(
                id=rec.id, key_hash=rec.key_hash, prefix=rec.prefix, user_id=user_id, application=application,
                role=role, expires_at=expires_at, revoked_at=None, limits=rec.limits, created_at=rec.created_at,
                rotated_from=rotated_from, grace_until=None))
        return rec, secret

    async def by_hash(self, key_hash: str) -> KeyRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.key_hash == key_hash))).first()
        return KeyRecord.from_row(row) if row is not None else None

    async def get(self, key_id: str) -> KeyRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return KeyRecord.from_row(row) if row is not None else None

    async def list(self, user_id: str | None = None, application: str | None = None) -> list[KeyRecord]:
        q = select(api_keys).order_by(api_keys.c.created_at)
        if user_id is not None:
            q = q.where(api_keys.c.user_id == user_id)
        if application is not None:
            q = q.where(api_keys.c.application == application)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [KeyRecord.from_row(r) for r in rows]

    async def get_or_404(self, key_id: str) -> KeyRecord:
        return await self._must(key_id)

    async def _must(self, key_id: str) -> KeyRecord:
        rec = await self.get(key_id)
        if rec is None:
            raise GatewayError(404, f"no API key with id {key_id!r}", code="key_not_found", param="id")
        return rec

    async def revoke(self, key_id: str) -> KeyRecord:
        rec = await self._must(key_id)
        if rec.revoked_at is None:
            now = utcnow()
            async with self.engine.begin() as conn:
                await conn.execute(update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                                   .values(revoked_at=now))
            rec = await self._must(key_id)
        return rec

    async def rotate(self, key_id: str, grace_seconds: float) -> tuple[KeyRecord, str, KeyRecord]:
        """A new key with the same owner, role, expiry and limits; the old one keeps working for the grace
        period.  Returns (new record, new secret, old record)."""
        old = await self._must(key_id)
        st = old.status()
        if st in ("revoked", "expired", "rotated", "rotating"):
            raise GatewayError(409, f"the key {key_id!r} is {st} and cannot be rotated", code="key_not_active")
        if grace_seconds < 0:
            raise GatewayError(400, "'grace' must not be negative", param="grace", code="invalid_value")
        grace_until = utcnow() + dt.timedelta(seconds=grace_seconds)
        secret = new_secret()
        new = KeyRecord(new_id(), hash_key(secret), secret[:DISPLAY_PREFIX_LEN], old.user_id, old.application,
                        old.role, old.expires_at, None, dict(old.limits), utcnow(), old.id, None)
        async with self.engine.begin() as conn:  # one transaction: two concurrent rotations cannot both win
            res = await conn.execute(update(api_keys).where(
                api_keys.c.id == key_id, api_keys.c.grace_until.is_(None), api_keys.c.revoked_at.is_(None))
                .values(grace_until=grace_until))
            if res.rowcount != 1:
                raise GatewayError(409, f"the key {key_id!r} was rotated or revoked concurrently",
                                   code="key_not_active")
            await conn.execute(api_keys.insert().values(
                id=new.id, key_hash=new.key_hash, prefix=new.prefix, user_id=new.user_id,
                application=new.application, role=new.role, expires_at=new.expires_at, revoked_at=None,
                limits=new.limits, created_at=new.created_at, rotated_from=new.rotated_from, grace_until=None))
        return new, secret, await self._must(key_id)
