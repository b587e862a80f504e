"""Reads and maintenance on the completions table: usage aggregation, retention purge, key rotation,
and fetching one record with its bodies decrypted."""
from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any, Callable

from sqlalchemy import and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from .crypto import Keyring, TamperedRecord, UnknownKey
from .schema import completions as C

UTC = dt.timezone.utc
GROUP_BY = ("day", "provider", "model", "user", "application")
# A request that failed: an error status, or a response that did not end as it should although its head
# said 200 (a stream cut by the upstream, the client, the shutdown).
_FAILED = or_(C.c.status >= 400, C.c.outcome.in_(("upstream_error", "client_gone", "shutdown", "response_failed")))
_GROUP_COLUMNS = {"provider": C.c.provider, "model": C.c.model, "user": C.c.user_id, "application": C.c.application}


def parse_time(value: str, name: str, end: bool = False) -> dt.datetime:
    """ISO date / datetime or Unix seconds -> aware UTC datetime.  A bare date as ``end`` means the end of
    that day (``to=2025-01-31`` includes the 31st).  Anything that is no representable time (including
    dates at the ends of the calendar that would overflow) is a ValueError naming ``name``."""
    v = value.strip()
    try:
        if re.fullmatch(r"\d+(\.\d+)?", v) and len(v) != 8:
            return dt.datetime.fromtimestamp(float(v), UTC)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            d = dt.datetime.combine(dt.date.fromisoformat(v), dt.time(), UTC)
            if not end:
                return d
            return d + dt.timedelta(days=1) if d.date() < dt.date.max else dt.datetime.max.replace(tzinfo=UTC)
        t = dt.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"{name}: {value!r} is not a date between 0001-01-01 and 9999-12-31 (use 2025-01-31, "
                         "2025-01-31T12:00:00Z or Unix seconds)") from None


def _day_expr(dialect: str) -> Any:
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", C.c.created_at), "YYYY-MM-DD")
    return func.substr(C.c.created_at, 1, 10)   # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)


def _db_time(t: dt.datetime, dialect: str) -> dt.datetime:
    # SQLite keeps datetimes as text without an offset: compare in naive UTC.
    return t.astimezone(UTC).replace(tzinfo=None) if dialect == "sqlite" else t


async def usage(engine: AsyncEngine, start: dt.datetime, end: dt.datetime, group_by: str = "day", *,
                user_id: str | None = None, key_id: str | None = None,
                application: str | None = None) -> dict[str, Any]:
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by: {group_by!r} is not one of {', '.join(GROUP_BY)}")
    dialect = engine.dialect.name
    g = _day_expr(dialect) if group_by == "day" else _GROUP_COLUMNS[group_by]
    cond = [C.c.created_at >= _db_time(start, dialect), C.c.created_at < _db_time(end, dialect),
            # an ensemble's member calls are inside its parent record's totals (docs/ensemble.md)
            C.c.endpoint != "ensemble_member"]
    if user_id is not None:
        cond.append(C.c.user_id == user_id)
    if key_id is not None:
        cond.append(C.c.key_id == key_id)
    if application is not None:
        cond.append(C.c.application == application)
    grp = g.label("grp")
    q = (select(grp, func.count().label("requests"),
                func.coalesce(func.sum(case((_FAILED, 1), else_=0)), 0).label("errors"),
                func.coalesce(func.sum(C.c.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(C.c.completion_tokens), 0).label("completion_tokens"),
                func.coalesce(func.sum(C.c.total_tokens), 0).label("total_tokens"),
                func.coalesce(func.sum(C.c.cost), 0).label("cost"),
                func.coalesce(func.sum(case((C.c.cache_hit, 1), else_=0)), 0).label("cache_hits"))
         .where(and_(*cond)).group_by(g).order_by(g))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
    data = []
    total = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
             "cost": 0.0, "cache_hits": 0}
    for r in rows:
        item = {"group": r.grp, "requests": int(r.requests), "errors": int(r.errors),
                "prompt_tokens": int(r.prompt_tokens), "completion_tokens": int(r.completion_tokens),
                "total_tokens": int(r.total_tokens), "cost": round(float(r.cost), 10),
                "cache_hits": int(r.cache_hits)}
        data.append(item)
        for k in total:
            total[k] += item[k]
    total["cost"] = round(total["cost"], 10)
    return {"object": "usage", "group_by": group_by, "from": start.isoformat().replace("+00:00", "Z"),
            "to": end.isoformat().replace("+00:00", "Z"), "data": data, "total": total}


async def purge(engine: AsyncEngine, cutoff: dt.datetime, batch_size: int = 1000,
                pause: float = 0.0) -> int:
    """Delete records created before ``cutoff``, ``batch_size`` at a time (each batch its own short
    transaction, selected by the created_at index and deleted by primary key)."""
    dialect = engine.dialect.name
    when = _db_time(cutoff, dialect)
    total = 0
    sel = select(C.c.request_id).where(C.c.created_at < when).limit(batch_size)
    while True:
        async with engine.begin() as conn:
            ids = (await conn.execute(sel)).scalars().all()
            if not ids:
                break
            await conn.execute(delete(C).where(C.c.request_id.in_(ids)))
        total += len(ids)
        if len(ids) < batch_size:
            break
        await asyncio.sleep(pause)
    return total


async def count_older(engine: AsyncEngine, cutoff: dt.datetime) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(C).where(
            C.c.created_at < _db_time(cutoff, engine.dialect.name)))).scalar_one())


def decrypt_column(keyring: Keyring | None, blob: bytes | None, key_id: str | None, request_id: str,
                   column: str) -> bytes | None:
    if blob is None or key_id is None:
        return blob
    if keyring is None:
        raise UnknownKey(f"record {request_id}: {column} is encrypted with key {key_id!r} but encryption "
                         "is not configured (encryption.enabled and HELIXAGENT_ENCRYPTION_KEYS)")
    return keyring.decrypt(bytes(blob), key_id, request_id, column)


async def get_record(engine: AsyncEngine, keyring: Keyring | None, request_id: str) -> dict[str, Any] | None:
    """One record with its bodies decrypted; raises TamperedRecord / UnknownKey rather than return garbage."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(C).where(C.c.request_id == request_id))).mappings().first()
    if row is None:
        return None
    d = dict(row)
    kid = d["enc_key_id"]
    for col in ("request_body", "response_body"):
        d[col] = decrypt_column(keyring, d[col], kid, request_id, col)
    return d


async def rotate(engine: AsyncEngine, keyring: Keyring, batch_size: int = 500,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Re-encrypt every row not under the active key (including rows stored in the clear) with the
    active key, ``batch_size`` rows per transaction.  Rows that fail authentication are left untouched
    and reported."""
    active = keyring.active_id
    done = 0
    bad: list[tuple[str, str]] = []
    last = ""
    has_body = or_(C.c.request_body.is_not(None), C.c.response_body.is_not(None))
    # the key id must still be the one we decrypted with (a concurrent rotation may have moved the row on)
    vals: dict[str, Any] = dict(request_body=bindparam("rb"), response_body=bindparam("pb"),
                                enc_key_id=bindparam("kid"))
    upd_keyed = update(C).where(and_(C.c.request_id == bindparam("rid"), C.c.enc_key_id == bindparam("old"))
                                ).values(**vals)
    upd_clear = update(C).where(and_(C.c.request_id == bindparam("rid"), C.c.enc_key_id.is_(None))).values(**vals)
    while True:
        q = (select(C.c.request_id, C.c.request_body, C.c.response_body, C.c.enc_key_id)
             .where(and_(C.c.request_id > last, or_(C.c.enc_key_id.is_(None), C.c.enc_key_id != active),
                         has_body))
             .order_by(C.c.request_id).limit(batch_size))
        async with engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        if not rows:
            break
        params = []
        for rid, rb, pb, kid in rows:
            try:
                prb = decrypt_column(keyring, rb, kid, rid, "request_body")
                ppb = decrypt_column(keyring, pb, kid, rid, "response_body")
            except (TamperedRecord, UnknownKey) as exc:
                bad.append((rid, str(exc)))
                continue
            params.append({"rid": rid, "old": kid, "kid": active,
                           "rb": None if prb is None else keyring.encrypt(prb, rid, "request_body"),
                           "pb": None if ppb is None else keyring.encrypt(ppb, rid, "response_body")})
        keyed = [p for p in params if p["old"] is not None]
        clear = [{k: v for k, v in p.items() if k != "old"} for p in params if p["old"] is None]
        if params:
            async with engine.begin() as conn:
                if keyed:
                    await conn.execute(upd_keyed, keyed)
                if clear:
                    await conn.execute(upd_clear, clear)
        done += len(params)
        if progress is not None:
            progress(done)
        last = rows[-1][0]
    return {"reencrypted": done, "failed": bad, "active_key": active}
