"""Files, batches and batch lines in the database (tables of revision 0006_batches, store/schema.py).

Every row is tenant-scoped (:func:`helixagent.store.responses.tenant_of`: another tenant's lookup is a
miss, answered as a 404 like an unknown id) and every body is sealed with the record keyring when
encryption is on.  The runner's side -- claiming lines with a lease, writing a line's result fenced by
that lease, closing a batch exactly once -- is here too, so the SQL that makes a line exactly-once lives
in one place:

* claim: ``UPDATE batch_lines SET state='running', lease_owner=me, lease_until=now+lease WHERE idx IN
  (SELECT idx ... WHERE state='pending' OR (state='running' AND lease_until < now) LIMIT n
  [FOR UPDATE SKIP LOCKED on PostgreSQL])``: concurrent instances never claim the same line; a line
  whose instance died is claimed again once its lease has run out.
* result: ``UPDATE ... WHERE state='running' AND lease_owner=me``: a runner that lost its lease (it
  stalled past it and another instance took the line over) cannot write a second result.
* close: the batch row's status moves from its current one in the same transaction that writes the
  output files, so two instances racing to close a batch close it once."""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..store.crypto import Keyring
from ..store.schema import batch_files as F
from ..store.schema import batch_lines as L
from ..store.schema import batches as B

_TS_COLS = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at", "archived_at")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(v: dt.datetime | None) -> dt.datetime | None:
    if v is None:
        return None
    return v if v.tzinfo is not None else v.replace(tzinfo=dt.timezone.utc)


def unix(v: dt.datetime | None) -> int | None:
    v = aware(v)
    return None if v is None else int(v.timestamp())


def new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


@dataclass(slots=True)
class FileRow:
    id: str
    tenant: str
    created_at: dt.datetime
    purpose: str
    filename: str
    bytes: int
    batch_id: str | None


@dataclass(slots=True)
class BatchRow:
    id: str
    tenant: str
    api: str
    endpoint: str
    input_file_id: str | None
    completion_window: str
    status: str
    metadata: dict[str, Any] | None
    errors: list[dict[str, Any]] | None
    key_id: str | None
    user_id: str | None
    application: str | None
    role: str
    total: int
    output_file_id: str | None
    error_file_id: str | None
    times: dict[str, dt.datetime | None]
    mode: str = "local"
    provider: str | None = None
    upstream_id: str | None = None
    upstream_status: str | None = None
    upstream_cancelled: bool = False
    ip: str = ""

    @classmethod
    def from_row(cls, m: Any) -> "BatchRow":
        return cls(m["id"], m["tenant"], m["api"], m["endpoint"], m["input_file_id"], m["completion_window"],
                   m["status"], orjson.loads(m["metadata"]) if m["metadata"] else None,
                   orjson.loads(m["errors"]) if m["errors"] else None, m["key_id"], m["user_id"],
                   m["application"], m["role"], m["total"], m["output_file_id"], m["error_file_id"],
                   {c: aware(m[c]) for c in _TS_COLS}, m["mode"], m["provider"], m["upstream_id"],
                   m["upstream_status"], bool(m["upstream_cancelled"]), m["ip"] or "")

    def at(self, name: str) -> int | None:
        return unix(self.times.get(name))


@dataclass(slots=True)
class Claimed:
    idx: int
    custom_id: str
    body: bytes
    attempts: int
    gen: int


@dataclass(slots=True)
class Done:
    """A line's outcome as the output files and results render it."""
    idx: int
    custom_id: str
    state: str                 # succeeded | errored | cancelled | expired | pending | running
    status_code: int | None
    request_id: str | None
    result: Any                # the response body (succeeded / errored), else None


# The runner's poll (every poll_interval on every instance, mostly finding nothing): built once, and with
# plain binds rather than an IN list, whose expanding parameter would render the SQL anew at every execution.
_ACTIVE = (sa.select(B).where(sa.or_(B.c.status == "in_progress", B.c.status == "cancelling"))
           .order_by(B.c.created_at))


class BatchStore:
    def __init__(self, engine: AsyncEngine, keyring: Keyring | None):
        self.engine = engine
        self.keyring = keyring
        self.pg = engine.dialect.name == "postgresql"

    # -- sealing ----------------------------------------------------------------------------------------
    def seal(self, aid: str, column: str, data: bytes) -> bytes:
        return self.keyring.encrypt(data, aid, column) if self.keyring is not None else data

    def open(self, aid: str, column: str, blob: bytes | None, key_id: str | None) -> bytes | None:
        if blob is None:
            return None
        blob = bytes(blob)
        if key_id is None:
            return blob
        if self.keyring is None:
            raise RuntimeError(f"{aid}: {column} is encrypted with key {key_id!r} but encryption is off")
        return self.keyring.decrypt(blob, key_id, aid, column)

    @property
    def key_id(self) -> str | None:
        return self.keyring.active_id if self.keyring is not None else None

    # -- files ------------------------------------------------------------------------------------------
    def _file_values(self, fid: str, tenant: str, purpose: str, filename: str, content: bytes,
                     batch_id: str | None, now: dt.datetime) -> dict[str, Any]:
        return {"id": fid, "tenant": tenant, "created_at": now, "purpose": purpose, "filename": filename,
                "bytes": len(content), "batch_id": batch_id, "content": self.seal(fid, "content", content),
                "enc_key_id": self.key_id}

    async def add_file(self, tenant: str, purpose: str, filename: str, content: bytes) -> FileRow:
        fid, now = new_id("file-"), utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(F).values(**self._file_values(fid, tenant, purpose, filename, content,
                                                                       None, now)))
        return FileRow(fid, tenant, now, purpose, filename, len(content), None)

    _FILE_META = (F.c.id, F.c.tenant, F.c.created_at, F.c.purpose, F.c.filename, F.c.bytes, F.c.batch_id)

    @staticmethod
    def _file(m: Any) -> FileRow:
        return FileRow(m["id"], m["tenant"], aware(m["created_at"]) or utcnow(), m["purpose"], m["filename"],
                       m["bytes"], m["batch_id"])

    async def get_file(self, fid: str, tenant: str) -> FileRow | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(sa.select(*self._FILE_META).where(F.c.id == fid, F.c.tenant == tenant))).first()
        return None if r is None else self._file(r._mapping)

    async def file_content(self, fid: str, tenant: str) -> bytes | None:
        async with self.engine.connect() as conn:
            r = (await conn.execute(sa.select(F.c.content, F.c.enc_key_id)
                                    .where(F.c.id == fid, F.c.tenant == tenant))).first()
        if r is None:
            return None
        return self.open(fid, "content", r[0], r[1])

    async def list_files(self, tenant: str, purpose: str | None, limit: int, after: str | None,
                         order: str) -> tuple[list[FileRow], bool]:
        q = sa.select(*self._FILE_META).where(F.c.tenant == tenant)
        if purpose:
            q = q.where(F.c.purpose == purpose)
        desc = order == "desc"
        if after:
            async with self.engine.connect() as conn:
                a = (await conn.execute(sa.select(F.c.created_at).where(F.c.id == after,
                                                                        F.c.tenant == tenant))).first()
            if a is None:
                return [], False
            key = sa.tuple_(F.c.created_at, F.c.id)
            q = q.where(key < sa.tuple_(sa.literal(a[0]), sa.literal(after)) if desc
                        else key > sa.tuple_(sa.literal(a[0]), sa.literal(after)))
        q = q.order_by(F.c.created_at.desc(), F.c.id.desc()) if desc else q.order_by(F.c.created_at, F.c.id)
        async with self.engine.connect() as conn:
            rows = [self._file(r._mapping) for r in await conn.execute(q.limit(limit + 1))]
        return rows[:limit], len(rows) > limit

    async def delete_file(self, fid: str, tenant: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.delete(F).where(F.c.id == fid, F.c.tenant == tenant))
        return bool(res.rowcount)

    # -- batches ----------------------------------------------------------------------------------------
    async def create_batch(self, values: dict[str, Any], lines: list[tuple[str, bytes]]) -> None:
        bid = values["id"]
        kid = self.key_id
        rows = [{"batch_id": bid, "idx": i, "custom_id": cid, "state": "pending", "attempts": 0,
                 "body": self.seal(f"{bid}:{i}", "body", body), "enc_key_id": kid}
                for i, (cid, body) in enumerate(lines)]
        async with self.engine.begin() as conn:
            await conn.execute(sa.insert(B).values(**values))
            for k in range(0, len(rows), 500):
                await conn.execute(sa.insert(L), rows[k:k + 500])

    async def get_batch(self, bid: str, tenant: str | None) -> BatchRow | None:
        q = sa.select(B).where(B.c.id == bid)
        if tenant is not None:
            q = q.where(B.c.tenant == tenant)
        async with self.engine.connect() as conn:
            r = (await conn.execute(q)).first()
        return None if r is None else BatchRow.from_row(r._mapping)

    async def list_batches(self, tenant: str, api: str, limit: int, after: str | None,
                           before: str | None = None) -> tuple[list[BatchRow], bool]:
        """Newest first; ``after``: those older than that id, ``before``: newer (ascending, then reversed)."""
        q = sa.select(B).where(B.c.tenant == tenant, B.c.api == api, B.c.archived_at.is_(None))
        key = sa.tuple_(B.c.created_at, B.c.id)
        cursor = after or before
        if cursor:
            async with self.engine.connect() as conn:
                a = (await conn.execute(sa.select(B.c.created_at).where(B.c.id == cursor,
                                                                        B.c.tenant == tenant))).first()
            if a is None:
                return [], False
            pivot = sa.tuple_(sa.literal(a[0]), sa.literal(cursor))
            q = q.where(key < pivot if after else key > pivot)
        if before and not after:
            q = q.order_by(B.c.created_at, B.c.id)
        else:
            q = q.order_by(B.c.created_at.desc(), B.c.id.desc())
        async with self.engine.connect() as conn:
            rows = [BatchRow.from_row(r._mapping) for r in await conn.execute(q.limit(limit + 1))]
        more = len(rows) > limit
        rows = rows[:limit]
        if before and not after:
            rows.reverse()
        return rows, more

    async def counts(self, bid: str) -> dict[str, int]:
        """Lines per state, and the token sums as ``input_tokens`` / ``output_tokens``."""
        return (await self.counts_many([bid]))[bid]

    async def counts_many(self, bids: list[str]) -> dict[str, dict[str, int]]:
        """:meth:`counts` of every batch in ``bids`` (a list page) in one grouped query per 500 ids, not one
        query per batch."""
        out: dict[str, dict[str, int]] = {b: {"input_tokens": 0, "output_tokens": 0} for b in bids}
        async with self.engine.connect() as conn:
            for k in range(0, len(bids), 500):
                q = (sa.select(L.c.batch_id, L.c.state, sa.func.count(), sa.func.sum(L.c.input_tokens),
                               sa.func.sum(L.c.output_tokens))
                     .where(L.c.batch_id.in_(bids[k:k + 500])).group_by(L.c.batch_id, L.c.state))
                for bid, state, n, i, o in await conn.execute(q):
                    c = out[bid]
                    c[state] = int(n)
                    c["input_tokens"] += int(i or 0)
                    c["output_tokens"] += int(o or 0)
        return out

    async def set_status(self, bid: str, tenant: str, frm: tuple[str, ...], to: str, stamp: str) -> bool:
        """Move a batch from one of ``frm`` to ``to``, stamping ``<stamp>`` (cancel, archive)."""
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(B).where(B.c.id == bid, B.c.tenant == tenant, B.c.status.in_(frm))
                                     .values(status=to, **{stamp: utcnow()}))
        return bool(res.rowcount)

    async def archive(self, bid: str, tenant: str) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(B).where(B.c.id == bid, B.c.tenant == tenant,
                                                        B.c.archived_at.is_(None)).values(archived_at=utcnow()))
        return bool(res.rowcount)

    @staticmethod
    def _lines_query(bid: str) -> Any:
        """Every line of ``bid`` as :meth:`_done` reads it, in order."""
        return (sa.select(L.c.idx, L.c.custom_id, L.c.state, L.c.status_code, L.c.request_id, L.c.result,
                          L.c.enc_key_id).where(L.c.batch_id == bid).order_by(L.c.idx))

    async def lines(self, bid: str) -> list[Done]:
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(self._lines_query(bid)))
        return [self._done(bid, r) for r in rows]

    def _done(self, bid: str, r: Any) -> Done:
        raw = self.open(f"{bid}:{r[0]}", "result", r[5], r[6])
        return Done(r[0], r[1], r[2], r[3], r[4], orjson.loads(raw) if raw is not None else None)

    # -- the runner's side ------------------------------------------------------------------------------
    async def active(self) -> list[BatchRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(_ACTIVE)
            return [BatchRow.from_row(r._mapping) for r in rows]

    async def claim(self, bid: str, owner: str, n: int, lease: float) -> list[Claimed]:
        now = utcnow()
        cand = (sa.select(L.c.idx).where(L.c.batch_id == bid, sa.or_(
            L.c.state == "pending", sa.and_(L.c.state == "running", L.c.lease_until < now)))
            .order_by(L.c.idx).limit(n))
        if self.pg:
            cand = cand.with_for_update(skip_locked=True)
        stmt = (sa.update(L).where(L.c.batch_id == bid, L.c.idx.in_(cand.scalar_subquery()))
                .values(state="running", lease_owner=owner, lease_until=now + dt.timedelta(seconds=lease),
                        attempts=L.c.attempts + 1)
                .returning(L.c.idx, L.c.custom_id, L.c.body, L.c.enc_key_id, L.c.attempts, L.c.gen))
        async with self.engine.begin() as conn:
            rows = list(await conn.execute(stmt))
        out = []
        for idx, cid, body, kid, att, gen in sorted(rows, key=lambda r: r[0]):
            out.append(Claimed(idx, cid, self.open(f"{bid}:{idx}", "body", body, kid) or b"", att, gen))
        return out

    async def renew(self, owner: str, lease: float, lines: list[tuple[str, int]]) -> int:
        """Extend the leases of ``lines`` ((batch id, idx): the ones this runner has in flight).  Only those:
        a line this runner gave up on (its result or its release could not be written, its task failed) is
        left to run out its lease and be claimed again, as the module docstring promises."""
        if not lines:
            return 0
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(L).where(L.c.lease_owner == owner, L.c.state == "running",
                                                        sa.tuple_(L.c.batch_id, L.c.idx).in_(lines))
                                     .values(lease_until=utcnow() + dt.timedelta(seconds=lease)))
        return int(res.rowcount or 0)

    async def release(self, bid: str, idx: int, owner: str) -> bool:
        """Give a claimed line back (graceful shutdown cut it short).  Its attempt was recorded under its
        request id, so the next one gets a new id (``gen`` + 1): each upstream attempt has its record."""
        async with self.engine.begin() as conn:
            res = await conn.execute(
                sa.update(L).where(L.c.batch_id == bid, L.c.idx == idx, L.c.state == "running",
                                   L.c.lease_owner == owner)
                .values(state="pending", lease_owner=None, lease_until=None, gen=L.c.gen + 1))
        return bool(res.rowcount)

    async def finish_line(self, bid: str, idx: int, owner: str, *, state: str, status_code: int,
                          request_id: str, result: Any, input_tokens: int, output_tokens: int) -> bool:
        """The line's one result, written only while this runner still holds its lease."""
        blob = self.seal(f"{bid}:{idx}", "result", orjson.dumps(result))
        async with self.engine.begin() as conn:
            res = await conn.execute(
                sa.update(L).where(L.c.batch_id == bid, L.c.idx == idx, L.c.state == "running",
                                   L.c.lease_owner == owner)
                .values(state=state, status_code=status_code, request_id=request_id, result=blob,
                        enc_key_id=self.key_id, input_tokens=input_tokens, output_tokens=output_tokens,
                        lease_owner=None, lease_until=None))
        return bool(res.rowcount)

    async def close_unrun(self, bid: str, state: str) -> int:
        """Pending lines (and running ones whose lease ran out: their instance is gone) become ``state``
        (cancelled / expired)."""
        now = utcnow()
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(L).where(L.c.batch_id == bid, sa.or_(
                L.c.state == "pending", sa.and_(L.c.state == "running", L.c.lease_until < now)))
                .values(state=state, lease_owner=None, lease_until=None))
        return int(res.rowcount or 0)

    async def unfinished(self, bid: str) -> int:
        async with self.engine.connect() as conn:
            n = (await conn.execute(sa.select(sa.func.count()).select_from(L).where(
                L.c.batch_id == bid, L.c.state.in_(("pending", "running"))))).scalar_one()
        return int(n)

    # -- native batches (batches/native.py) --------------------------------------------------------------
    async def lease_batch(self, bid: str, owner: str, lease: float) -> bool:
        """The right to take the next step of a native batch (submit, poll, map back): one instance at a time."""
        now = utcnow()
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(B).where(B.c.id == bid, sa.or_(B.c.lease_until.is_(None),
                                                                              B.c.lease_until < now))
                                     .values(lease_owner=owner, lease_until=now + dt.timedelta(seconds=lease)))
        return bool(res.rowcount)

    async def update_native(self, bid: str, owner: str, **values: Any) -> bool:
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(B).where(B.c.id == bid, B.c.lease_owner == owner).values(**values))
        return bool(res.rowcount)

    async def pending_lines(self, bid: str) -> list[Claimed]:
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(sa.select(L.c.idx, L.c.custom_id, L.c.body, L.c.enc_key_id, L.c.attempts,
                                                     L.c.gen).where(L.c.batch_id == bid, L.c.state == "pending")
                                           .order_by(L.c.idx)))
        return [Claimed(i, c, self.open(f"{bid}:{i}", "body", b, k) or b"", a, g) for i, c, b, k, a, g in rows]

    async def settle_lines(self, bid: str, rows: list[dict[str, Any]]) -> int:
        """Results mapped back from a vendor batch: each pending line gets its one result (a line already
        settled -- a step retried after a crash -- is left as it is)."""
        n = 0
        async with self.engine.begin() as conn:
            for r in rows:
                blob = None if r["result"] is None else self.seal(f"{bid}:{r['idx']}", "result",
                                                                 orjson.dumps(r["result"]))
                res = await conn.execute(
                    sa.update(L).where(L.c.batch_id == bid, L.c.idx == r["idx"], L.c.state == "pending")
                    .values(state=r["state"], status_code=r["status_code"], request_id=r["request_id"], result=blob,
                            enc_key_id=self.key_id, input_tokens=r["input_tokens"],
                            output_tokens=r["output_tokens"]))
                n += int(res.rowcount or 0)
        return n

    async def close_batch(self, b: BatchRow, to: str,
                          build: Callable[[BatchRow, list[Done]], tuple[bytes, bytes]] | None) -> bool:
        """Close ``b`` (in_progress/cancelling -> completed/cancelled/expired) once: the status moves in the
        same transaction that writes its output and error files (``build``: their contents)."""
        now = utcnow()
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at",
                 "failed": "failed_at"}[to]
        async with self.engine.begin() as conn:
            res = await conn.execute(sa.update(B).where(B.c.id == b.id, B.c.status == b.status)
                                     .values(status="finalizing", finalizing_at=now))
            if not res.rowcount:
                return False  # another instance closed it (or its owner cancelled it meanwhile)
            values: dict[str, Any] = {"status": to, stamp: now}
            if build is not None:
                rows = list(await conn.execute(self._lines_query(b.id)))
                out, err = build(b, [self._done(b.id, r) for r in rows])
                for kind, content in (("output", out), ("error", err)):
                    if not content:
                        continue
                    fid = f"file-{b.id[6:]}{kind[0]}"
                    await conn.execute(sa.delete(F).where(F.c.id == fid))
                    await conn.execute(sa.insert(F).values(**self._file_values(
                        fid, b.tenant, "batch_output", f"batch_{b.id[6:]}_{kind}.jsonl", content, b.id, now)))
                    values[f"{kind}_file_id"] = fid
            await conn.execute(sa.update(B).where(B.c.id == b.id).values(**values))
        return True
