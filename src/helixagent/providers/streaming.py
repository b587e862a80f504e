"""Shared upstream-stream plumbing for provider adapters: network failures mid-stream become
GatewayErrors, and the first chunk is read before the stream is handed to routing, so an upstream
that fails right after its 200 head (an ``error`` event first) can still be failed over."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp

from ..errors import GatewayError


def broken_stream(provider: str, exc: BaseException) -> GatewayError | None:
    """The GatewayError for a transport failure while reading a stream (None: not a transport error)."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return GatewayError(504, f"provider {provider!r} stalled mid-stream", type="timeout_error",
                            code="upstream_timeout", provider=provider, kind="timeout")
    if isinstance(exc, (OSError, ConnectionError, aiohttp.ClientError)):
        return GatewayError(502, f"provider {provider!r} stream broke: {type(exc).__name__}",
                            type="upstream_error", code="upstream_stream_error", provider=provider,
                            kind="stream_error")
    return None


async def primed(gen: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Pull the first chunk now (errors raise here, before routing commits to this provider)."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await gen.aclose()  # type: ignore[attr-defined]
        raise
    return _chain(first, gen)


async def _chain(first: dict[str, Any] | None, gen: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    try:
        if first is not None:
            yield first
            async for c in gen:
                yield c
    finally:
        await gen.aclose()  # type: ignore[attr-defined]
