"""A streamed answer through the pipeline: :meth:`helixagent.pipeline.Pipeline.iterate`.

An async generator, which mypyc does not compile: it lives here, interpreted, so that the rest of the
pipeline can be (``helixagent.compiled``).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from . import pipeline as _pipeline
from .canonical import StreamAccumulator
from .errors import GatewayError

if TYPE_CHECKING:
    from .pipeline import Pipeline, RequestContext
    from .stage import Stage

log = logging.getLogger("helixagent.pipeline")


async def iterate(pipeline: Pipeline, ctx: RequestContext, entered: list[Stage]) -> AsyncIterator[dict[str, Any]]:
    """Iterate ``ctx.stream``, accumulating the answer; runs ``pipeline``'s post-hooks when the stream ends.

    A failure mid-stream sets ``ctx.error`` and ends the iteration; the caller renders the error
    event in the client's format."""
    acc = StreamAccumulator()
    listeners = ctx.stream_listeners
    stream = ctx.stream
    assert stream is not None
    try:
        async for chunk in stream:
            if ctx.first_token_at is None:
                ctx.first_token_at = time.perf_counter()
            acc.add(chunk)
            for fn in listeners:
                fn(chunk)
            yield chunk
    except GatewayError as exc:
        ctx.error = exc
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if ctx.client_disconnected or task is None:
            raise
        # not the client: the server's shutdown drain ended.  The iteration ends normally so that the
        # caller sends the last error event in the client's format; the record says shutdown.
        task.uncancel()
        ctx.error = _pipeline.shutdown_error()
    except Exception as exc:
        log.exception("stream failure in request %s", ctx.request_id)
        ctx.error = GatewayError(502, f"stream failed: {type(exc).__name__}", provider=ctx.provider,
                                 kind="stream_error")
    finally:
        if acc.chunks:
            ctx.response = acc.response(ctx.provider or "")
            if ctx.usage is None:
                ctx.usage = acc.usage
        if ctx.usage is None and (ctx.error is not None or ctx.client_disconnected):
            ctx.usage = _pipeline.partial_usage(ctx)  # cut short: the tokens counted so far
        for fn in listeners:
            try:
                fn(None)
            except Exception:
                log.exception("stream listener failed")
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except Exception:  # noqa: BLE001 - closing an abandoned stream must not stop its record
                pass
        await pipeline.finish(ctx, entered)
