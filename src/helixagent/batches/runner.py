"""The batch runner: a background task on every instance.  A native batch (batches/native.py) gets its next
step (submit, poll, map back) from one instance at a time.  A local batch: the runner claims lines in the database, runs
each through the gateway's pipeline with the owner's identity (batches/execute.py), and writes exactly
one result per line; then closes the batch once (completed, cancelled or expired) with its output files.

Pacing: at most ``batches.local_concurrency`` lines in flight per instance, each marked the lowest
priority.  Durability: a claimed line carries a lease (``batches.lease``) that the runner renews while the
line runs; a line whose instance died (SIGKILL, crash) is claimed again by any instance once its lease
has run out.  Cancel: no more claims; pending lines become cancelled; lines in flight finish.  Expiry
(the ``completion_window`` passed): the same, with expired.

Outage policy: a database error (``DB_UNAVAILABLE``) pauses the runner (logged once, retried every
``poll_interval``); a line whose result cannot be written is retried until its lease would run out, then
left to be run again by whoever claims it next.  Anything else is a bug and propagates (logged loudly)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Callable

from ..auth import MASTER
from ..errors import GatewayError
from ..gateway_types import GatewayLike
from ..pipeline import Identity
from ..store.db import DB_UNAVAILABLE
from . import native
from .execute import run_line, request_id_of
from .store import BatchRow, BatchStore, Claimed, Done, utcnow

log = logging.getLogger("helixagent.batches")

Builder = Callable[[BatchRow, list[Done]], tuple[bytes, bytes]]


class Runner:
    def __init__(self, gw: GatewayLike, store: BatchStore, builders: dict[str, Builder | None]):
        cfg = gw.cfg.batches
        self.gw = gw
        self.store = store
        self.builders = builders
        self.cap = cfg.local_concurrency
        self.lease = cfg.lease
        self.poll = cfg.poll_interval
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.inflight: dict[asyncio.Task[None], tuple[str, int]] = {}
        self.wake = asyncio.Event()
        self.freed = asyncio.Event()
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._outage = False
        self.lines_run = 0
        self.rate_limited = 0
        self.outages = 0
        self.write_retries = 0
        self.paced: dict[str, float] = {}   # batch id -> loop time before which it claims nothing

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(), name="helixagent-batch-runner"),
                       loop.create_task(self._renew_loop(), name="helixagent-batch-leases")]
        for t in self._tasks:
            t.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        """A runner loop that ended with an exception is a bug: said loudly (batches stop on this instance)."""
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s stopped: batches no longer run on this instance", task.get_name(),
                         exc_info=task.exception())

    def _line_died(self, task: asyncio.Task[None]) -> None:
        """A line's task that ended with an exception is a bug: said at once (not when the task is garbage);
        the line's lease is no longer renewed, so it is claimed and run again once the lease has run out."""
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed (a gateway bug); it runs again once its lease (%.0fs) has run out", task.get_name(),
                      self.lease, exc_info=task.exception())

    def kick(self) -> None:
        """A batch was created or cancelled here: look now rather than at the next poll."""
        self.wake.set()

    async def stop(self, drain: float) -> None:
        """Stop claiming; let lines in flight finish for up to ``drain`` seconds; give the rest back."""
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=drain)
        left = list(self.inflight)
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left, timeout=5)

    # -- the loops --------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if len(self.inflight) >= self.cap:
                self.freed.clear()
                await self.freed.wait()
                continue
            try:
                busy = await self.tick()
                if self._outage:
                    log.warning("batch runner: the database is reachable again")
                    self._outage = False
            except DB_UNAVAILABLE as exc:
                if not self._outage:
                    self.outages += 1
                    log.error("batch runner paused: the database is unavailable (%s); retrying every %.1fs",
                              type(exc).__name__, self.poll)
                    self._outage = True
                busy = False
            if not busy:
                try:
                    await asyncio.wait_for(self.wake.wait(), self.poll)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            if not self.inflight:
                continue
            try:
                await self.store.renew(self.owner, self.lease, list(self.inflight.values()))
            except DB_UNAVAILABLE as exc:
                log.error("batch runner: could not renew the leases of %d line(s) (%s)", len(self.inflight),
                          type(exc).__name__)

    async def tick(self) -> bool:
        """One pass over the open batches; True when it claimed work (look again at once)."""
        worked = False
        for b in await self.store.active():
            if b.mode == "native":  # at the vendor: one instance at a time takes its next step
                if await self.store.lease_batch(b.id, self.owner, self.lease):
                    await native.step(self, b)
                continue
            if b.status == "cancelling":
                await self._close_if_done(b, "cancelled")
                continue
            expires = b.times["expires_at"]
            if expires is not None and utcnow() >= expires:
                await self._close_if_done(b, "expired")
                continue
            free = self.cap - len(self.inflight)
            if free <= 0:
                return True
            if self.paced.get(b.id, 0.0) > asyncio.get_running_loop().time():
                continue
            claimed = await self.store.claim(b.id, self.owner, free, self.lease)
            if claimed:
                worked = True
                ident = await self.identity(b)
                for line in claimed:
                    task = asyncio.get_running_loop().create_task(self._run(b, ident, line),
                                                                  name=f"batch {b.id} line {line.idx}")
                    self.inflight[task] = (b.id, line.idx)
                    task.add_done_callback(self._line_died)
            elif not await self.store.unfinished(b.id):
                await self.close(b, "completed")
        return worked

    async def _close_if_done(self, b: BatchRow, to: str) -> None:
        await self.store.close_unrun(b.id, to)
        if not await self.store.unfinished(b.id):
            await self.close(b, to)

    async def close(self, b: BatchRow, to: str) -> None:
        if await self.store.close_batch(b, to, self.builders.get(b.api)):
            log.info("batch %s %s", b.id, to)

    async def identity(self, b: BatchRow) -> Identity | GatewayError:
        """The owner's identity, as the key store has it now: a key revoked or expired since the batch was
        created runs no more lines (each fails with the 401 the key would get)."""
        if b.key_id is None:
            return Identity(key_id=None, user_id=b.user_id, application=b.application, role=b.role)
        if b.key_id == MASTER.key_id:
            return MASTER
        rec = await self.gw.services["keys"].get(b.key_id)
        st = rec.status() if rec is not None else "revoked"
        if st not in ("active", "rotating"):
            return GatewayError(401, f"the API key that created this batch is {st}", type="authentication_error",
                                code=f"{st}_api_key")
        return Identity(key_id=rec.id, user_id=rec.user_id, application=rec.application, role=rec.role,
                        limits=rec.limits)

    async def _run(self, b: BatchRow, ident: Identity | GatewayError, line: Claimed) -> None:
        rid = request_id_of(b.id, line.idx, line.gen)
        try:
            out = await run_line(self.gw, b.endpoint, ident, line.body, rid, b.ip)
            if out.shutdown:  # cut by our shutdown: not its result; run again (with a new request id)
                await self._release(b.id, line.idx)
                return
            if out.pace_for is not None:  # rate-limited: not a result either; the batch waits, then reruns it
                self.paced[b.id] = asyncio.get_running_loop().time() + out.pace_for
                self.rate_limited += 1
                await self._release(b.id, line.idx)
                return
            self.lines_run += 1
            state = "succeeded" if out.status_code < 400 else "errored"
            for attempt in range(max(1, int(self.lease / self.poll))):
                try:
                    if not await self.store.finish_line(
                            b.id, line.idx, self.owner, state=state, status_code=out.status_code,
                            request_id=rid, result=out.body, input_tokens=out.input_tokens,
                            output_tokens=out.output_tokens):
                        log.warning("batch %s line %d: the lease was lost (this instance stalled past %.0fs); "
                                    "the instance that holds it writes the result", b.id, line.idx, self.lease)
                    break
                except DB_UNAVAILABLE as exc:
                    self.write_retries += 1
                    if attempt == 0:
                        log.error("batch %s line %d: cannot write its result (%s); retrying", b.id, line.idx,
                                  type(exc).__name__)
                    await asyncio.sleep(self.poll)
        except asyncio.CancelledError:
            await self._release(b.id, line.idx)
        finally:
            self.inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self.freed.set()
            self.wake.set()

    async def _release(self, bid: str, idx: int) -> None:
        try:
            await asyncio.shield(self.store.release(bid, idx, self.owner))
        except DB_UNAVAILABLE as exc:  # its lease runs out instead; then any instance runs it again
            log.error("batch %s line %d: could not give the line back (%s)", bid, idx, type(exc).__name__)

    def stats(self) -> dict[str, Any]:
        return {"owner": self.owner, "in_flight": len(self.inflight), "lines_run": self.lines_run,
                "rate_limited": self.rate_limited, "outages": self.outages,
                "write_retries": self.write_retries}
