"""Wiring: the batch store on the records database, the HTTP routes, the runner's start and stop."""
from __future__ import annotations

from ..gateway_types import GatewayLike
from . import anthropic_api, openai_api
from .runner import Runner
from .store import BatchStore


def install(gw: GatewayLike) -> None:
    if not gw.cfg.batches.enabled:
        return
    rec = gw.services["records"]
    store = BatchStore(rec.engine, rec.keyring)
    gw.services["batches_store"] = store
    runner = Runner(gw, store, {"openai": openai_api.build_files, "anthropic": None})
    gw.services["batches_runner"] = runner
    openai_api.install(gw)
    anthropic_api.install(gw)

    async def start() -> None:
        runner.start()

    async def stop() -> None:
        await runner.stop(gw.cfg.server.drain_timeout)

    gw.on_startup(start)
    gw.on_shutdown(stop)
