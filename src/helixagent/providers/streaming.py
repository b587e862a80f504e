"""Shared upstream-stream plumbing for provider adapters: network failures mid-stream become
GatewayErrors.  (The router reads the first chunk before committing to a provider, so an upstream that
fails right after its 200 head -- an ``error`` event first -- is still failed over.)"""
from __future__ import annotations

import asyncio


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
