#!/usr/bin/env python
"""Does cancelling an in-flight pyreqwest request hang up on the upstream?  (docs/routing.md,
"Cancelled requests and the upstream connection")

A local aiohttp upstream holds each request (head after HEAD_AFTER s, then a slow SSE body) and records
when the client's connection closes.  Each case cancels the request 0.3 s in, before the head, and
prints when the upstream saw the hang-up.  Rerun after upgrading pyreqwest: once a case prints ~0.3 s,
the client aborts on cancel and the xfail(strict) tests named in the doc start failing, on purpose.

Usage: python bench/pyreqwest_cancel.py
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from pyreqwest.client import ClientBuilder

HEAD_AFTER = 1.5
BODY_FOR = 1.5


async def main() -> None:
    seen: dict[str, float] = {}

    async def upstream(request: web.Request) -> web.StreamResponse:
        await request.read()
        t0 = time.monotonic()

        def gone() -> bool:
            t = request.transport
            if t is None or t.is_closing():
                seen["gone"] = time.monotonic() - t0
                return True
            return False

        while time.monotonic() - t0 < HEAD_AFTER:
            if gone():
                return web.Response()
            await asyncio.sleep(0.02)
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while time.monotonic() - t0 < HEAD_AFTER + BODY_FOR:
                await resp.write(b"data: {}\n\n")
                await asyncio.sleep(0.05)
                if gone():
                    return resp
        except (ConnectionError, RuntimeError):
            gone()
            return resp
        seen["gone"] = -1.0
        return resp

    app = web.Application()
    app.router.add_post("/", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/"  # type: ignore[union-attr]

    async def send(c: Any) -> None:
        r = await c.post(url).body_bytes(b"{}").build().send()
        await r.bytes()

    async def streamed(c: Any) -> None:
        async with c.post(url).body_bytes(b"{}").streamed_read_buffer_limit(0).build_streamed() as r:
            await r.bytes()

    async def send_then_close_client(c: Any) -> None:
        await send(c)

    cases = [("send()  [non-streamed: the provider's post()]", send, False),
             ("build_streamed() __aenter__  [the provider's open_stream()]", streamed, False),
             ("send(), then Client.close()", send_then_close_client, True)]
    print(f"upstream: head after {HEAD_AFTER} s, body for {BODY_FOR} s more; each request cancelled at 0.3 s")
    for name, fn, close_client in cases:
        seen.clear()
        c = ClientBuilder().build()
        t = asyncio.ensure_future(fn(c))
        await asyncio.sleep(0.3)
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            pass
        if close_client:
            await c.close()
        while "gone" not in seen:
            await asyncio.sleep(0.05)
        g = seen["gone"]
        verdict = "never (the upstream finished its answer)" if g < 0 else f"{g:.2f} s after it started"
        print(f"- {name}: upstream saw the hang-up {verdict}")
        if not close_client:
            await c.close()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
