"""One upstream call (the provider's timeout and the request's remaining budget, the breaker's verdict)
and the relay of a stream's chunks to the client after its first one."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from ..canonical import Usage
from ..errors import GatewayError
from ..pipeline import RequestContext
from . import costs
from .health import NORMAL
from .plan import Candidate

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("helixagent.routing")

_perf = time.perf_counter
_END = object()


async def attempt(self: Router, c: Candidate, sub: Any, op: str, remaining: float, probe: int, wire: Any,
                   sprobe: int = NORMAL) -> Any:
    """One upstream call with a prepared request, bounded by the provider's timeout and the request's
    remaining budget.  Reports the outcome to the provider's breaker.  For streams: returns (first
    chunk, stream, stream-breaker probe); the stream breaker's verdict comes when the stream ends."""
    h = c.health
    assert h is not None
    budget_limited = remaining < c.timeout
    p = c.provider
    # Non-streamed calls are bounded by the HTTP client's total timeout (providers/http.py); the
    # router arms its own timer for the wait for a stream's first chunk (the HTTP client bounds
    # only each read there) and whenever the request's remaining budget is the tighter bound.
    timer: _Timer | None = None
    if op == "stream" or budget_limited:
        timer = _Timer(remaining if budget_limited else c.timeout)
    t0 = _perf()
    res: Any  # ChatResponse | (first chunk, stream) | EmbeddingResponse
    first: object
    try:
        if op == "stream":
            s = await p.send(sub, op, wire)
            try:
                first = await s.__anext__()
            except StopAsyncIteration:
                first = _END
            except BaseException:
                await _aclose(s)
                raise
            res = (first, s, sprobe)
        else:
            res = await p.send(sub, op, wire)
    except GatewayError as exc:
        if op == "stream":
            h.stream.cancelled(sprobe)  # type: ignore[union-attr]  # no stream verdict before the first chunk
        if not exc.retryable and (exc.status >= 500 or exc.status == 429):
            exc.retryable = True  # an upstream failure (e.g. a stream that broke before its first chunk)
        if exc.status == 429:
            h.throttled(probe, exc.kind)
            c.throttle.hit(self.clock(), 429, exc.retry_after, *self._rl)  # type: ignore[union-attr]
        elif exc.retryable:
            h.failure(probe, exc.kind)
            if exc.retry_after is not None and exc.kind == "overloaded":
                c.throttle.hit(self.clock(), 503, exc.retry_after, *self._rl)  # type: ignore[union-attr]
        else:  # the provider answered (the request was at fault): it is up
            h.success(None, False, probe)
        raise
    except asyncio.CancelledError:
        if op == "stream":
            h.stream.cancelled(sprobe)  # type: ignore[union-attr]
        if timer is None or not timer.expired:
            h.cancelled(probe)
            raise
        timer.task.uncancel()
        if budget_limited:  # our budget ran out, not the provider's timeout: no verdict
            h.cancelled(probe)
            raise self._budget_error() from None
        h.failure(probe, "timeout")
        raise GatewayError(504, f"provider {c.name!r} timed out after {c.provider.cfg.timeout_ms} ms",
                           type="timeout_error", code="upstream_timeout", provider=c.name, retryable=True,
                           kind="timeout") from None
    except Exception:
        # Not the provider's: the adapters turn every upstream failure and every answer they cannot
        # read into a GatewayError (providers/base.py read_answer), so this is a gateway bug.
        # Loud, not retried, no verdict on the provider.
        if op == "stream":
            h.stream.cancelled(sprobe)  # type: ignore[union-attr]
        h.cancelled(probe)
        log.exception("provider %s: the gateway failed handling the call (a gateway bug)", c.name)
        raise GatewayError(500, f"internal error while calling provider {c.name!r}", type="server_error",
                           code="internal_error", provider=c.name, kind="internal") from None
    finally:
        if timer is not None:
            timer.handle.cancel()
    h.success(_perf() - t0 if op != "embed" else None, op == "stream", probe)
    t = c.throttle
    if t.streak:  # type: ignore[union-attr]
        t.streak = 0  # type: ignore[union-attr]
    return res


async def relay(self: Router, ctx: RequestContext, c: Candidate, first: Any, stream: AsyncIterator[dict[str, Any]],
                 sprobe: int = NORMAL) -> AsyncIterator[dict[str, Any]]:
    """The client's stream: the first chunk (already received), then the rest.  How the stream ends
    is judged by the provider's *stream* breaker only (health.py): a failure after the first chunk is
    a cut, a stream that ends as it should a success; a client that leaves (or a gateway bug) gives
    no verdict.  The pipeline turns a failure into an error event."""
    assert c.health is not None and c.health.stream is not None
    sh = c.health.stream
    usage = None
    verdict = False
    try:
        if first is not _END:
            usage = first.get("usage")
            yield first
            async for chunk in stream:
                u = chunk.get("usage")
                if u:
                    usage = u
                yield chunk
        verdict = True
        sh.success(None, True, sprobe)
    except GatewayError as exc:
        verdict = True
        sh.failure(sprobe, exc.kind)
        raise
    finally:
        if not verdict:
            sh.cancelled(sprobe)
        await _aclose(stream)
    if usage and c.price is not None:
        cost = costs.usage_cost(c.provider.cfg, c.model, c.price, Usage.from_openai(usage))
        if cost is not None:
            ctx.cost = cost


class _Timer:
    """A deadline for the current task: cancels it when it expires (cheaper than asyncio.timeout)."""

    __slots__ = ("task", "expired", "handle")

    def __init__(self, seconds: float):
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)  # the loop given: current_task() would look it up again
        assert task is not None, "a _Timer is armed inside a task"
        self.task = task
        self.expired = False
        self.handle = loop.call_at(loop.time() + seconds, self._fire)

    def _fire(self) -> None:
        self.expired = True
        self.task.cancel()


async def _aclose(stream: Any) -> None:
    closer = getattr(stream, "aclose", None)
    if closer is not None:
        try:
            await closer()
        except Exception:  # noqa: BLE001 - closing an abandoned upstream stream (its socket may be gone)
            pass
