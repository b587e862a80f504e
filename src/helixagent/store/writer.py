"""The record writer: the request path journals and enqueues; a background task inserts in batches.

Request path (:meth:`RecordWriter.record`, called from the record stage's post-hook before the response is
sent): build the record's fields, encrypt the bodies, append one frame to the journal (see spool.py) and
put the record on an in-memory queue.  No await, no database round trip.

Writer task: every ``database.flush_interval`` (or as soon as ``batch_size`` records wait) it inserts the
queued records in one multi-row ``INSERT ... ON CONFLICT (request_id) DO NOTHING`` and deletes journal
segments whose records are all committed.  If the insert fails because the database is unreachable, the
affected segments are kept; the writer probes the database every ``database.retry_interval`` and, once it
answers, replays kept segments oldest first before it resumes with the queue.  When the queue is full
(``database.queue_size``) a record is still journaled, and its segment is replayed from disk instead
(back-pressure by spooling, never by dropping).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections import deque
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..millis import ms3
from .crypto import Keyring
from .schema import META_COLUMNS, completions
from .spool import Item, Journal, Segment, encode_frame, read_frames

log = logging.getLogger("helixagent.store")

_UTC = dt.timezone.utc
_IDX_CREATED = META_COLUMNS.index("created_at")
_IDX_RID = META_COLUMNS.index("request_id")
_IDX_KEY = META_COLUMNS.index("enc_key_id")
_N_META = len(META_COLUMNS)
_BOOL_IDX = (META_COLUMNS.index("cache_hit"), META_COLUMNS.index("streamed"))
# A batch is one transaction, executed this many rows at a time with the event loop running between.  In one
# executemany a 500-row batch is milliseconds of work the loop cannot take back: SQLite's runs in its
# driver's thread, which on a one-core process the OS slices against the loop (and the GIL changes hands only
# between rows); asyncpg encodes every row on the loop.  Measured on a pinned gateway at concurrency 1: the
# loop held 2.5 ms per batch, the p99 of every answer +1.8 ms over the bare proxy's.  Sliced: p99 with
# default stages 2.18 -> 0.54 ms, with every stage and limits in Redis and records in PostgreSQL 3.3 -> 1.6;
# 32 rows rather than 64: every stage 0.63 -> 0.46 ms.  A slice waits for a turn of the loop, so a writer
# that falls behind sends the rest of its batch at once (_insert).
SLICE = 32
SEGMENT_MAX_BYTES = 16 * 1024 * 1024
SEGMENT_MAX_AGE = 10.0
ORPHAN_SCAN_INTERVAL = 30.0


def _dumps_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("utf-8", "replace")
    return str(obj)


def response_payload(ctx: Any) -> Any:
    """The response as recorded: the OpenAI-shaped body, the error body, or (embeddings) the body
    without the vectors."""
    err = ctx.error
    if err is not None:
        return err.openai_body()
    resp = ctx.response
    if resp is None:
        return None
    body = getattr(resp, "body", None)
    if ctx.endpoint == "embeddings" and isinstance(body, dict) and isinstance(body.get("data"), list):
        body = dict(body)
        body["data"] = [{"object": "embedding", "index": d.get("index", i),
                         "dimensions": len(d.get("embedding") or ()) if isinstance(d, dict) else None}
                        for i, d in enumerate(body["data"])]
    return body


class RecordWriter:
    def __init__(self, engine: AsyncEngine, spool_dir: str, *, keyring: Keyring | None = None,
                 batch_size: int = 500, queue_size: int = 10000, flush_interval: float = 0.2,
                 retry_interval: float = 1.0, fsync_interval: float = 1.0, record_bodies: bool = True,
                 dialect: str | None = None):
        self.engine = engine
        self.journal = Journal(spool_dir)
        self.journal.on_new = self._track
        self.keyring = keyring
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.fsync_interval = fsync_interval
        self.record_bodies = record_bodies
        self.dialect = dialect or engine.dialect.name
        self.queue: deque[tuple[Segment | None, list[Any], bytes | None, bytes | None]] = deque()
        self.segments: list[Segment] = []      # this process's segments still on disk (oldest first)
        self.replay: list[Segment] = []        # sealed segments to replay from disk (oldest first)
        self.memory_only: list[Item] = []      # records the journal could not take (disk full)
        self.db_ok = True
        self.db_error: str | None = None
        self.inserted = 0
        self.replayed = 0
        self.spooled = 0
        self.overflowed = 0
        self.rejected = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._next_probe = 0.0
        self._next_orphan_scan = 0.0
        self._last_fsync = time.monotonic()
        self._cycle_done: asyncio.Event | None = None
        self._insert_stmt = self._make_insert()
        self._pg = self.dialect == "postgresql"
        self._behind = max(1, batch_size // 4)   # queued records that make _insert stop slicing
        self._ts_sec: int | None = None    # _sqlite_time's second and its text
        self._ts_prefix = ""

    def _make_insert(self) -> str:
        """The batch INSERT as driver SQL: executed with executemany on plain tuples, it skips SQLAlchemy's
        per-parameter processing (measured: about half the writer's CPU per row on SQLite).  Replays are
        idempotent: a request id already stored is left alone."""
        cols = META_COLUMNS + ("request_body", "response_body")
        if self.dialect == "postgresql":
            marks = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
        else:
            marks = ", ".join("?" for _ in cols)
        return (f"INSERT INTO completions ({', '.join(cols)}) VALUES ({marks}) "
                f"ON CONFLICT (request_id) DO NOTHING")

    # -- request path ---------------------------------------------------------------------------------
    def record(self, ctx: Any) -> None:
        """Journal and enqueue one finished request.  Never raises, never awaits."""
        try:
            ident = ctx.identity
            req = ctx.request
            usage = ctx.usage
            err = ctx.error
            rid = ctx.request_id
            first = ctx.first_token_at
            keyring = self.keyring
            # the status the client saw: that of the response head sent (a stream that failed, was cut
            # or was left by its client after its 200 head says 200; its outcome says how it ended)
            sent = ctx.status_sent
            meta = [
                rid, ctx.client_request_id, ctx.started_wall,
                ident.user_id if ident is not None else None,
                ident.application if ident is not None else None,
                ident.key_id if ident is not None else None,
                ctx.provider,
                ctx.upstream_model or (getattr(req, "model", None) if req is not None else None),
                ctx.endpoint, ctx.status if sent is None else sent, err.kind if err is not None else None,
                usage.prompt_tokens if usage is not None else 0,
                usage.completion_tokens if usage is not None else 0,
                (usage.total_tokens or usage.prompt_tokens + usage.completion_tokens) if usage is not None else 0,
                float(ctx.cost or 0.0),
                ms3((ctx.finished_at or time.perf_counter()) - ctx.started),
                None if first is None else ms3(first - ctx.started),
                ctx.cache_status == "HIT",
                bool(ctx.streamed or getattr(req, "stream", False)),
                keyring.active_id if keyring is not None else None,
                ctx.outcome,
                ctx.state.get("ensemble_id"),
            ]
            rb = pb = None
            if self.record_bodies:
                rb = ctx.raw_body or None
                body = response_payload(ctx)
                if body is not None:
                    try:
                        pb = orjson.dumps(body)
                    except TypeError:
                        pb = orjson.dumps(body, default=_dumps_default)
                    # right-sized while it waits in the queue (orjson's block is >= 4 KiB): see cache/backends
                    pb = bytes(memoryview(pb))
                if keyring is not None:
                    if rb is not None:
                        rb = keyring.encrypt(rb, rid, "request_body")
                    if pb is not None:
                        pb = keyring.encrypt(pb, rid, "response_body")
        except Exception:
            log.exception("could not build the record of request %s", getattr(ctx, "request_id", "?"))
            return
        self.add(meta, rb, pb)

    def add(self, meta: list[Any], rb: bytes | None, pb: bytes | None) -> None:
        seg: Segment | None
        try:
            seg = self.journal.append(encode_frame(meta, rb, pb))
        except Exception as exc:  # noqa: BLE001 - journal I/O: logged, the record is kept in memory
            seg = None
            if self.db_error != f"journal: {exc}":
                log.error("cannot write the record journal (%s): record %s kept in memory", exc, meta[_IDX_RID])
            self.db_error = f"journal: {exc}"
        q = self.queue
        if seg is not None and len(q) >= self.queue_size:
            seg.failed = True          # journaled: the writer replays the segment from disk
            self.overflowed += 1
            return
        if seg is not None:
            seg.pending += 1
        q.append((seg, meta, rb, pb))
        if len(q) >= self.batch_size and self._wake is not None:
            self._wake.set()

    def _track(self, seg: Segment) -> None:
        self.segments.append(seg)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._cycle_done = asyncio.Event()
        self.replay.extend(self.journal.orphans({s.name for s in self.segments}))
        if self.replay:
            log.info("replaying %d record spool segment(s) left by a previous run", len(self.replay))
        self._next_orphan_scan = time.monotonic() + ORPHAN_SCAN_INTERVAL
        self._task = asyncio.get_running_loop().create_task(self._run(), name="helixagent-record-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Flush the queue to the database; whatever cannot be written stays in the (fsynced) journal."""
        self._closing = True
        if self._task is not None:
            if self._wake is not None:
                self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - shutdown: cancelled, queue spooled
                self._task.cancel()
                try:
                    await self._task
                except BaseException:  # noqa: BLE001 - shutdown: the cancelled writer's end is not news
                    pass
        self._spool_memory_only()
        await self._fsync_all()
        left = [s for s in self.segments + self.replay if s.fd >= 0]
        for seg in left:
            seg.release(unlink=False)
        if self.journal.current is not None:
            self.journal.current.release(unlink=False)
            self.journal.current = None
        if left:
            log.warning("%d record spool segment(s) kept in %s for replay at the next start", len(left),
                        self.journal.dir)

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record so far is committed (tests, CLI).  False if the database stays down."""
        deadline = time.monotonic() + timeout
        assert self._cycle_done is not None and self._wake is not None
        while time.monotonic() < deadline:
            # always wait for a whole writer cycle: one may be inserting what it already took off the queue
            self._cycle_done.clear()
            self._next_probe = 0.0
            self._wake.set()
            try:
                await asyncio.wait_for(self._cycle_done.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if self._settled():
                return True
            if not self.db_ok:
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self._settled()

    def _settled(self) -> bool:
        return (not self.queue and not self.replay and not self.memory_only and self.db_ok
                and not any(s.failed for s in self.segments))

    def stats(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "inserted": self.inserted, "replayed": self.replayed,
                "spooled": self.spooled, "overflowed": self.overflowed, "rejected": self.rejected,
                "segments": len([s for s in self.segments if s.fd >= 0]), "replay_pending": len(self.replay),
                "database": "ok" if self.db_ok else "unavailable", "last_error": self.db_error}

    # -- writer task ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None and self._cycle_done is not None
        while True:
            if not self._closing:
                try:
                    await asyncio.wait_for(self._wake.wait(),
                                           self.flush_interval if self.db_ok else self.retry_interval)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("record writer cycle failed")
            self._cycle_done.set()
            if self._closing:
                return

    async def _cycle(self) -> None:
        now = time.monotonic()
        if now >= self._next_orphan_scan:
            self._next_orphan_scan = now + ORPHAN_SCAN_INTERVAL
            known = {s.name for s in self.segments + self.replay}
            self.replay.extend(await asyncio.to_thread(self.journal.orphans, known))
        if not self.db_ok:
            if self._closing or now >= self._next_probe:
                self.db_ok = await self._probe()
                self._next_probe = time.monotonic() + self.retry_interval
                if self.db_ok:
                    log.warning("the database is reachable again: replaying spooled records")
            if not self.db_ok:
                self._park_queue()
                await self._maybe_fsync()
                return
        seg: Segment | None
        # the database answers: first what is on disk (oldest first), then the queue
        if any(s.failed for s in self.segments) or self.replay or self.memory_only:
            cur = self.journal.current
            if cur is not None and cur.failed:
                self.journal.seal()
            for seg in list(self.segments):
                if seg.failed and seg.sealed and seg not in self.replay:
                    self.replay.append(seg)
            self.replay.sort(key=lambda s: s.name)
            while self.replay:
                seg = self.replay[0]
                if not await self._replay_segment(seg):
                    self._park_queue()
                    return
                self.replay.pop(0)
                if seg in self.segments:
                    self.segments.remove(seg)
            if self.memory_only:
                items = self.memory_only
                self.memory_only = []
                if not await self._insert(items):
                    self.memory_only = items + self.memory_only
                    self._park_queue()
                    return
        q = self.queue
        # Drain what was queued when the cycle began, in batches; what arrives meanwhile waits for the
        # next cycle (flush_interval, or sooner once batch_size records wait) so that batches stay large
        # under load instead of degenerating into many small inserts.
        left = len(q)
        while q and left > 0:
            batch = []
            segs = []
            n = min(len(q), self.batch_size, left)
            left -= n
            for _ in range(n):
                seg, meta, rb, pb = q.popleft()
                if seg is not None and seg.failed:
                    continue          # replayed from disk
                batch.append((meta, rb, pb))
                segs.append(seg)
            if not batch:
                continue
            if not await self._insert(batch):
                for seg, item in zip(segs, batch, strict=True):
                    if seg is None:
                        self.memory_only.append(item)
                    else:
                        seg.failed = True
                self._park_queue()
                return
            for seg in segs:
                if seg is not None:
                    seg.pending -= 1
            await self._reap()
        self._maybe_rotate()
        await self._reap()

    def _maybe_rotate(self) -> None:
        cur = self.journal.current
        if cur is not None and (cur.size >= SEGMENT_MAX_BYTES or
                                time.monotonic() - cur.opened >= SEGMENT_MAX_AGE or self._closing):
            self.journal.seal()

    async def _reap(self) -> None:
        keep: list[Segment] = []
        done: list[Segment] = []
        for seg in self.segments:
            (done if seg.sealed and seg.pending <= 0 and not seg.failed else keep).append(seg)
        self.segments = keep
        if done:
            # unlinking a full 16 MiB segment takes milliseconds (the filesystem frees its blocks): one such
            # unlink held the event loop 5.8 ms, so it happens off the loop
            await asyncio.to_thread(_release_all, done)

    def _park_queue(self) -> None:
        """The database is unavailable: queued records stay only in their (kept) journal segments."""
        q = self.queue
        while q:
            seg, meta, rb, pb = q.popleft()
            if seg is None:
                self.memory_only.append((meta, rb, pb))
            elif not seg.failed:
                seg.failed = True
            self.spooled += 1
        self._spool_memory_only()

    def _spool_memory_only(self) -> None:
        """Records the journal refused earlier (disk full): try again to put them on disk."""
        if not self.memory_only or self.db_ok and not self._closing:
            return
        left = []
        for meta, rb, pb in self.memory_only:
            try:
                seg = self.journal.append(encode_frame(meta, rb, pb))
                seg.failed = True
            except Exception:  # noqa: BLE001 - journal I/O: the record stays in memory, retried
                left.append((meta, rb, pb))
        self.memory_only = left

    async def _maybe_fsync(self) -> None:
        if time.monotonic() - self._last_fsync >= self.fsync_interval:
            await self._fsync_all()

    async def _fsync_all(self) -> None:
        self._last_fsync = time.monotonic()
        segs = [s for s in self.segments if s.dirty and s.fd >= 0]
        cur = self.journal.current
        if cur is not None and cur.dirty and cur not in segs:
            segs.append(cur)
        for s in segs:
            s.dirty = False
        if segs:
            def sync() -> None:
                for s in segs:
                    try:
                        os.fsync(s.fd)
                    except OSError:
                        pass
            await asyncio.to_thread(sync)

    async def _probe(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(select(completions.c.request_id).where(text("1=0")))
            return True
        except Exception as exc:  # noqa: BLE001 - database probe: the error is recorded (_set_error)
            self._set_error(exc)
            return False

    def _set_error(self, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if msg != self.db_error:
            if "completions" in msg and ("does not exist" in msg or "no such table" in msg or "no column" in msg):
                log.error("the completions table is missing or not migrated to this version: run `helixagent "
                          "migrate up` (records are spooled meanwhile)")
            else:
                log.error("cannot write records to the database (%s): spooling to %s", msg, self.journal.dir)
        self.db_error = msg

    async def _replay_segment(self, seg: Segment) -> bool:
        try:
            data = await asyncio.to_thread(seg.read)
        except FileNotFoundError:
            seg.release(unlink=False)
            return True
        items = list(read_frames(data, seg.path))
        for i in range(0, len(items), self.batch_size):
            if not await self._insert(items[i:i + self.batch_size]):
                return False
        self.replayed += len(items)
        await asyncio.to_thread(seg.release, True)
        return True

    def _params(self, item: Item) -> tuple[Any, ...]:
        meta, rb, pb = item
        row = meta.copy()
        if len(row) < _N_META:  # journaled by an older version: the newer columns are NULL
            row.extend([None] * (_N_META - len(row)))
        if self._pg:
            row[_IDX_CREATED] = dt.datetime.fromtimestamp(meta[_IDX_CREATED], _UTC)
        else:
            row[_IDX_CREATED] = self._sqlite_time(meta[_IDX_CREATED])
            # exact ints bind directly; a bool would go through sqlite3's adapter lookup (db._sqlite_fast_binding)
            for i in _BOOL_IDX:
                v = row[i]
                if v is not None:
                    row[i] = 1 if v else 0
        row += (rb, pb)
        return tuple(row)

    def _rows(self, items: list[Item]) -> list[tuple[Any, ...]]:
        """The driver's parameters of ``items``.  Built inside the transaction, one slice at a time; a failure
        here is a bug of ours and must not pass for the database's (:class:`_RowsFailed`)."""
        try:
            return [self._params(it) for it in items]
        except Exception as exc:
            raise _RowsFailed() from exc

    def _sqlite_time(self, ts: float) -> str:
        """``datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")``, the text SQLite keeps a
        DateTime as (SQLAlchemy's own format, naive UTC, which its queries compare), at a third of the cost:
        the date and time up to the second is formatted once per second (records come in time order), the
        microseconds are rounded as ``fromtimestamp`` rounds them (half to even)."""
        sec = int(ts)
        us = round((ts - sec) * 1e6)
        if us >= 1000000:
            sec += 1
            us -= 1000000
        elif us < 0:
            sec -= 1
            us += 1000000
        if sec != self._ts_sec:
            self._ts_prefix = dt.datetime.fromtimestamp(sec, _UTC).strftime("%Y-%m-%d %H:%M:%S.")
            self._ts_sec = sec
        return self._ts_prefix + "%06d" % us

    async def _insert(self, items: list[Item]) -> bool:
        """Insert; True when every record is committed (or set aside as rejected by the database)."""
        # one transaction, executed SLICE rows at a time (see there) while the writer keeps up; once a
        # quarter of a batch waits behind this one, the rest goes at once (a slice waits for a turn of a busy
        # loop: under saturation the queue's peak grew from 700 to 2,600 records and the RSS by 3 MB)
        n = len(items)
        try:
            async with self.engine.begin() as conn:
                i = 0
                while i < n:
                    j = i + SLICE if len(self.queue) < self._behind else n
                    await conn.exec_driver_sql(self._insert_stmt, self._rows(items[i:j]))
                    i = j
            self.inserted += len(items)
            self.db_error = None
            return True
        except asyncio.CancelledError:
            raise
        except _RowsFailed as exc:  # our bug, not the database's: loud, as before the slices
            raise exc.__cause__ from None  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - database boundary: recorded, records kept for retry
            self._set_error(exc)
            if not _is_data_error(exc):
                self._down()
                return False
        # one bad record must not hold back the others: insert one by one, set aside what is refused
        bad: list[bytes] = []
        for it in items:
            row = self._params(it)
            try:
                async with self.engine.begin() as conn:
                    await conn.exec_driver_sql(self._insert_stmt, [row])
                self.inserted += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database boundary: recorded, records kept for retry
                if not _is_data_error(exc):
                    self._set_error(exc)
                    self._down()
                    return False
                log.error("the database rejects record %s (%s); it is kept in %s/rejected", it[0][_IDX_RID],
                          str(exc).splitlines()[0][:200], self.journal.dir)
                bad.append(encode_frame(*it))
        if bad:
            self.rejected += len(bad)
            await asyncio.to_thread(self.journal.write_rejected, bad)
        return True

    def _down(self) -> None:
        self.db_ok = False
        self._next_probe = time.monotonic() + self.retry_interval


class _RowsFailed(Exception):
    """Building a slice's parameters failed (the cause is attached): re-raised as it is by ``_insert``."""


def _release_all(segments: list[Segment]) -> None:
    for seg in segments:
        seg.release(unlink=True)


def _is_data_error(exc: BaseException) -> bool:
    """An error caused by the record itself (retrying will not help), not by the database being away."""
    from sqlalchemy.exc import DataError, IntegrityError, StatementError
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    # a value the driver cannot encode (raised before anything reaches the server)
    return isinstance(exc, StatementError) and isinstance(getattr(exc, "orig", None), (TypeError, ValueError,
                                                                                       OverflowError))
