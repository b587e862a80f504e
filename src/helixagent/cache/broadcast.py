"""In-process de-duplication: a :class:`Flight` per key in progress, the leader's :class:`Pending` state,
and the :class:`Broadcast` that lets any number of readers share one upstream stream."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator

from ..canonical import StreamAccumulator
from ..errors import GatewayError
from .values import complete, encode

if TYPE_CHECKING:
    from .flights import Lease
    from .service import CacheService

log = logging.getLogger("helixagent.cache")


# -- in-flight de-duplication ----------------------------------------------------------------------

class Flight:
    """An upstream call in progress for one key.  ``future`` resolves to ``(kind, value)``:
    ``("resp", payload bytes)``, ``("stream", Broadcast)``, ``("error", GatewayError)`` or
    ``("retry", None)`` (the leader went away before an answer: followers start over)."""

    __slots__ = ("key", "future")

    def __init__(self, key: str, loop: asyncio.AbstractEventLoop):
        self.key = key
        self.future: asyncio.Future[tuple[str, Any]] = loop.create_future()

    def resolve(self, kind: str, value: Any) -> None:
        if not self.future.done():
            self.future.set_result((kind, value))


class Pending:
    """A leader's cache state between ``pre`` and the end of its upstream call."""

    __slots__ = ("key", "store", "flight", "provider", "model", "lease")

    def __init__(self, key: str, store: bool, flight: Flight | None, provider: str, model: str,
                 lease: Lease | None = None):
        self.key = key
        self.store = store
        self.flight = flight
        self.provider = provider
        self.model = model
        self.lease = lease  # this process leads the flight on every instance (cache/flights.py)


class Broadcast:
    """Pumps one upstream stream into a buffer read by any number of readers (the leader and the
    followers).  The upstream is consumed independently of any one client: a follower keeps receiving
    when the leader's client disconnects; the upstream is closed only when no reader is left."""

    __slots__ = ("svc", "pending", "source", "provider", "model", "chunks", "done", "error", "abandoned",
                 "readers", "event", "task", "payload")

    def __init__(self, svc: "CacheService", pending: Pending, source: AsyncIterator[dict[str, Any]],
                 provider: str | None, model: str | None):
        self.svc = svc
        self.pending = pending
        self.source = source
        self.provider = provider
        self.model = model
        self.chunks: list[dict[str, Any]] = []
        self.done = False
        self.error: GatewayError | None = None
        self.abandoned = False
        self.readers = 0
        self.event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.payload: bytes | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._pump())
        self.task.add_done_callback(self._task_done)
        self.svc.pumps.add(self)

    def reader(self) -> "BroadcastReader":
        return BroadcastReader(self)

    def hold(self) -> None:
        self.readers += 1

    def release(self) -> None:
        self.readers -= 1
        if self.readers <= 0 and not self.done and self.task is not None:
            self.abandoned = True
            self.task.cancel()

    async def wait_done(self) -> None:
        while not self.done:
            self.event.clear()
            await self.event.wait()

    async def _pump(self) -> None:
        acc = StreamAccumulator()
        src = self.source
        try:
            try:
                async for chunk in src:
                    acc.add(chunk)
                    self.chunks.append(chunk)
                    self.event.set()
            finally:
                closer = getattr(src, "aclose", None)
                if closer is not None:
                    try:
                        await closer()
                    except Exception:  # noqa: BLE001 - closing the upstream after its end: said, the answer stands
                        log.warning("cache: closing an upstream stream failed", exc_info=True)
        except GatewayError as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.abandoned = True
        except Exception as exc:  # noqa: BLE001
            log.exception("cache: stream pump failed")
            self.error = GatewayError(502, f"stream failed: {type(exc).__name__}", provider=self.provider,
                                      kind="stream_error")
        resp = acc.response(self.provider or "") if acc.chunks and self.error is None and not self.abandoned \
            else None
        if resp is not None:
            self.payload = encode(resp, self.provider, self.model)
        self._conclude()
        p = self.pending
        if (resp is not None and p.store and self.provider == p.provider and self.model == p.model
                and complete(resp)):
            await self.svc.store(p.key, self.payload)  # type: ignore[arg-type]
        self.svc.land(p)

    def _conclude(self) -> None:
        if self.done:
            return
        if self.abandoned and self.error is None:
            self.error = GatewayError(502, "the upstream stream was abandoned", provider=self.provider,
                                      kind="stream_error")
        self.done = True
        self.event.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # normally a no-op; covers a pump cancelled before it ever ran (its body never executed)
        self.svc.pumps.discard(self)
        if not self.done:
            self.abandoned = True
            self._conclude()
            self.svc.land(self.pending)
            closer = getattr(self.source, "aclose", None)
            if closer is not None:
                try:
                    asyncio.get_running_loop().create_task(closer())
                except RuntimeError:
                    pass


class BroadcastReader:
    """One reader of a :class:`Broadcast`: the buffered chunks first, then live ones."""

    __slots__ = ("bc", "i", "open")

    def __init__(self, bc: Broadcast):
        self.bc = bc
        self.i = 0
        self.open = True
        bc.readers += 1

    def __aiter__(self) -> "BroadcastReader":
        return self

    async def __anext__(self) -> dict[str, Any]:
        bc = self.bc
        while True:
            chunks = bc.chunks
            if self.i < len(chunks):
                c = chunks[self.i]
                self.i += 1
                return c
            if bc.done:
                self._close()
                if bc.error is not None:
                    raise bc.error.clone()
                raise StopAsyncIteration
            bc.event.clear()
            await bc.event.wait()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.open:
            self.open = False
            self.bc.release()
