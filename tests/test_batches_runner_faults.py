"""The batch runner when a line's task fails with a bug (runner.py's promise: a line this runner gave up on
is claimed and run again once its lease has run out) -- while other lines of the same runner are still in
flight, whose lease renewals must not keep the failed line's lease alive."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import sqlalchemy as sa

from support.keys import MASTER
from support.servers import wait_until
from test_batches import K1, MOCK, cfg, chat_line, jsonl, oai, wait_status

from helixagent.batches import runner as runner_mod


def test_a_line_whose_task_failed_runs_again_while_other_lines_are_in_flight(
        tmp_path: Any, make_gateway: Any, monkeypatch: Any, caplog: Any) -> None:
    monkeypatch.setenv("HELIXAGENT_ENCRYPTION_KEYS", K1)
    real = runner_mod.run_line
    calls: dict[str, int] = {}
    hold: dict[str, asyncio.Event] = {}

    async def run_line(gw: Any, url: str, ident: Any, body: bytes, rid: str, ip: str = "") -> Any:
        cid = "req-0" if b"number 0" in body else "req-1"
        calls[cid] = calls.get(cid, 0) + 1
        if cid == "req-0" and calls[cid] == 1:
            raise RuntimeError("a bug in the line's run")  # not an outage, not a GatewayError
        if cid == "req-1":  # stays in flight (its lease renewed) until the failed line has run again
            hold.setdefault("go", asyncio.Event())
            await hold["go"].wait()
        return await real(gw, url, ident, body, rid, ip)

    monkeypatch.setattr(runner_mod, "run_line", run_line)
    db = f"sqlite:///{tmp_path}/runner.db"
    gw = make_gateway(cfg(db, tmp_path, [MOCK], lease="1s"))
    c = oai(gw, MASTER)
    f = c.files.create(file=("in.jsonl", jsonl([chat_line(0, "mock-1"), chat_line(1, "mock-1")])), purpose="batch")
    with caplog.at_level(logging.ERROR, logger="helixagent.batches"):
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        eng = sa.create_engine(db)

        def line0() -> tuple[str, int]:
            with eng.connect() as conn:
                st, att = conn.execute(sa.text("select state, attempts from batch_lines where batch_id = :b and "
                                               "idx = 0"), {"b": b.id}).one()
            return str(st), int(att)
        # line 1 is held in flight the whole time: line 0 is claimed again once its own lease ran out
        assert wait_until(lambda: line0() == ("succeeded", 2), timeout=30), (line0(), calls)
        assert calls.get("req-1") == 1
        gw.run(_set(hold["go"]))
        done = wait_status(c, b.id, ("completed",))
        eng.dispose()
    assert done.request_counts.completed == 2 and done.request_counts.failed == 0
    failed = [r for r in caplog.records if "a gateway bug" in r.getMessage()]
    assert len(failed) == 1 and f"batch {b.id} line 0" in failed[0].getMessage() and failed[0].exc_info


async def _set(ev: asyncio.Event) -> None:
    ev.set()
