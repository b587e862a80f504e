#!/usr/bin/env python3
"""Completion-record benchmark.

(1) Request-path CPU per request added by recording: ``RecordWriter.record(ctx)`` on a realistic finished
    chat request (~300 B request body, ~500 B response), i.e. building the record, encrypting the bodies
    (when enabled) and appending one frame to the journal (write(2)) plus the in-memory enqueue.  Measured
    with process CPU time over many calls, side by side: bodies off / bodies in the clear / bodies
    encrypted, against the cost of an empty post-hook.  Target: <= 20 us.
(2) Writer throughput: N records already journaled and queued, then the time for the writer task to
    commit them all (multi-row INSERT ... ON CONFLICT DO NOTHING, batch_size rows per transaction) into
    the real PostgreSQL ($HELIX_TEST_POSTGRES_URL, a throw-away schema) and into SQLite.  Target: >= 5,000
    rows/s into PostgreSQL.  Also the CPU the event loop's thread spends per row meanwhile (the writer task:
    rows built, the driver's share; aiosqlite's own thread and the server are not counted): that part is
    taken from the requests' thread in the gateway.

(3) ``--sqlite-ab``: only SQLite's own CPU per row (the work of aiosqlite's worker thread), PRAGMA and
    schema variants side by side in one process, interleaved chunk by chunk (see bench_sqlite_ab).

Usage: /work/venv/bin/python bench/store_bench.py [--calls 50000] [--rows 50000]
       /work/venv/bin/python bench/store_bench.py --sqlite-ab [--rows 40000] [--batch 500]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import orjson  # noqa: E402

from helixagent.canonical import ChatRequest, ChatResponse, Usage  # noqa: E402
from helixagent.pipeline import Identity, RequestContext, new_request_id  # noqa: E402
from helixagent.store import migrate  # noqa: E402
from helixagent.store.crypto import Keyring, parse_keys  # noqa: E402
from helixagent.store.db import make_engine  # noqa: E402
from helixagent.store.writer import RecordWriter  # noqa: E402

KEY = "k20250101:" + base64.b64encode(os.urandom(32)).decode()
IDENT = Identity(key_id="k-123", user_id="user-42", application="app", role="user")


def make_ctx() -> RequestContext:
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the plot of Hamlet in three sentences, please. " * 3}]
    raw = orjson.dumps({"model": "gpt-4o-mini", "messages": msgs, "temperature": 0.2})
    ctx = RequestContext("chat")
    ctx.identity = IDENT
    ctx.raw_body = raw
    ctx.request = ChatRequest("gpt-4o-mini", msgs, {"temperature": 0.2})
    body = {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hamlet, prince of Denmark, "
                                                 "seeks revenge on his uncle. " * 6}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 61, "completion_tokens": 80, "total_tokens": 141}}
    ctx.response = ChatResponse(body, Usage(61, 80, 141), "openai", "gpt-4o-mini")
    ctx.usage = ctx.response.usage
    ctx.provider = "openai"
    ctx.upstream_model = "gpt-4o-mini"
    ctx.cost = 0.0000572
    ctx.finished_at = ctx.started + 0.2
    return ctx


def bench_request_path(calls: int) -> dict[str, float]:
    ctx = make_ctx()
    out: dict[str, float] = {}

    def measure(fn, n: int) -> float:
        for _ in range(1000):
            fn()
        t0 = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - t0) / n * 1e6

    # baseline: the benchmark loop itself (new id per call), subtracted from the figures below
    base_ids = iter([uuid.uuid4().hex for _ in range(calls + 1000)])

    def base() -> None:
        ctx.request_id = next(base_ids)
    baseline = measure(base, calls)
    variants = [("record: bodies off", False, None), ("record: bodies in the clear", True, None),
                ("record: bodies encrypted (AES-256-GCM)", True, Keyring(parse_keys(KEY, "bench")))]
    for name, bodies, kr in variants:
        d = tempfile.mkdtemp(prefix="helix-bench-spool-")
        try:
            w = RecordWriter(make_engine("sqlite://"), d, keyring=kr, record_bodies=bodies,
                             queue_size=calls + 10000, batch_size=calls + 10000)
            # new ids per call, as in real traffic
            ids = [uuid.uuid4().hex for _ in range(calls + 1000)]
            it = iter(ids)

            def one() -> None:
                ctx.request_id = next(it)  # noqa: B023 - measured within this iteration
                w.record(ctx)  # noqa: B023 - measured within this iteration
            out[name] = measure(one, calls) - baseline
            w.queue.clear()
            for s in w.segments:
                s.release(unlink=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


async def bench_writer(url: str, rows: int, batch: int, encrypted: bool) -> tuple[float, float, float]:
    migrate.upgrade(url)
    eng = make_engine(url, pool_size=2)
    d = tempfile.mkdtemp(prefix="helix-bench-spool-")
    try:
        kr = Keyring(parse_keys(KEY, "bench")) if encrypted else None
        w = RecordWriter(eng, d, keyring=kr, batch_size=batch, queue_size=rows + 1, flush_interval=3600)
        ctx = make_ctx()
        for _ in range(rows):
            ctx.request_id = new_request_id()     # the gateway's ids: a per-process prefix and a counter
            w.record(ctx)
        await w.start()
        t0 = time.perf_counter()
        c0 = time.thread_time()
        p0 = time.process_time()
        ok = await w.flush(600)
        pcpu = time.process_time() - p0
        cpu = time.thread_time() - c0
        dt = time.perf_counter() - t0
        assert ok and w.inserted == rows, w.stats()
        await w.close()
        return rows / dt, cpu / rows * 1e6, pcpu / rows * 1e6
    finally:
        await eng.dispose()
        shutil.rmtree(d, ignore_errors=True)


# --sqlite-ab: (name, PRAGMAs on the new file before the schema is created, SQL run after migrating).
# "current" opens the file with db.py's own connect hook; the others replay what older versions did.
_OLD_PRAGMAS = ["PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=10000", "PRAGMA synchronous=NORMAL"]
SQLITE_VARIANTS: dict[str, tuple[list[str] | None, list[str]]] = {
    "4k-pages: 4 KiB pages (before)": (_OLD_PRAGMAS, []),
    "no-ensemble-ix: without ix_completions_ensemble_id": (None, ["DROP INDEX ix_completions_ensemble_id"]),
    "no-provider-ix: without ix_completions_provider": (None, ["DROP INDEX ix_completions_provider"]),
    "current: db.py's PRAGMAs, the migrated schema": (None, []),
}


def bench_sqlite_ab(rows: int, batch: int, names: list[str]) -> dict[str, float]:
    """SQLite's own CPU per row (user + kernel of the inserting thread: what aiosqlite's worker spends),
    the variants side by side: one file each, open at once, every chunk of 2,000 rows inserted into each in
    turn (rotating the order) in ``batch``-row transactions with the writer's statement and parameters, so
    that the load of a shared machine falls on every variant alike."""
    import sqlite3

    from helixagent.store.db import _sqlite_pragmas
    d = tempfile.mkdtemp(prefix="helix-bench-ab-")
    spool = tempfile.mkdtemp(prefix="helix-bench-spool-")
    try:
        w = RecordWriter(make_engine("sqlite://"), spool, queue_size=rows + 1, batch_size=rows + 1)
        ctx = make_ctx()
        for _ in range(rows):
            ctx.request_id = new_request_id()
            w.record(ctx)
        data = [w._params((m, rb, pb)) for _, m, rb, pb in w.queue]
        w.queue.clear()
        cons = {}
        for i, name in enumerate(names):
            pre, post = SQLITE_VARIANTS[name]
            path = f"{d}/v{i}.db"
            con = sqlite3.connect(path)
            if pre is None:
                _sqlite_pragmas(con, None)
            else:
                for q in pre:
                    con.execute(q)
            migrate.upgrade(f"sqlite:///{path}")
            for q in post:
                con.execute(q)
            con.commit()
            cons[name] = con
        cpu = dict.fromkeys(names, 0.0)
        for j, i in enumerate(range(0, rows, 2000)):
            chunk = data[i:i + 2000]
            for name in names[j % len(names):] + names[:j % len(names)]:
                con = cons[name]
                t0 = time.thread_time()
                for k in range(0, len(chunk), batch):
                    con.executemany(w._insert_stmt, chunk[k:k + batch])
                    con.commit()
                cpu[name] += time.thread_time() - t0
        for con in cons.values():
            con.close()
        return {name: c / rows * 1e6 for name, c in cpu.items()}
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)


def pg_schema_url(base: str):
    import psycopg2
    schema = "helix_bench_" + uuid.uuid4().hex[:8]
    conn = psycopg2.connect(base)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"

    def drop() -> None:
        conn.cursor().execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.close()
    return f"{base}{sep}options=-csearch_path%3D{schema}", drop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=50000)
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--sqlite-ab", action="store_true", help="only SQLite's CPU per row, variants side by side")
    ap.add_argument("--variants", default="4k-pages,current",
                    help="--sqlite-ab: comma-separated variant keys (the part of a name before its colon)")
    args = ap.parse_args()
    if args.sqlite_ab:
        keys = {n.split(":")[0]: n for n in SQLITE_VARIANTS}
        names = [keys[v.strip()] for v in args.variants.split(",") if v.strip()]
        print(f"SQLite CPU per row (inserting thread, user + kernel), {args.rows} rows, batch_size {args.batch}, "
              "interleaved")
        res = bench_sqlite_ab(args.rows, args.batch, names)
        for name, us in res.items():
            print(f"    {name:<72} {us:6.2f} us/row  {us / res[names[0]]:5.3f}x")
        return
    print(f"(1) request-path CPU added per request, {args.calls} calls (process CPU time, loop overhead "
          "subtracted)")
    for name, us in bench_request_path(args.calls).items():
        print(f"    {name:<42} {us:7.2f} us")
    print(f"(2) writer throughput, {args.rows} records, batch_size {args.batch}")
    pg = os.environ.get("HELIX_TEST_POSTGRES_URL")
    targets = []
    if pg:
        targets.append(("PostgreSQL", pg))
    else:
        print("    (HELIX_TEST_POSTGRES_URL not set: PostgreSQL skipped)")
    tmp = tempfile.mkdtemp(prefix="helix-bench-db-")
    targets.append(("SQLite", f"sqlite:///{tmp}/bench.db"))
    for name, url in targets:
        for enc in (False, True):
            drop = None
            u = url
            if name == "PostgreSQL":
                u, drop = pg_schema_url(url)
            elif enc:
                u = f"sqlite:///{tmp}/bench-enc.db"
            try:
                rate, cpu, pcpu = asyncio.run(bench_writer(u, args.rows, args.batch, enc))
            finally:
                if drop:
                    drop()
            print(f"    {name:<11} bodies {'encrypted' if enc else 'clear    '}  {rate:10,.0f} rows/s, "
                  f"{cpu:5.1f} us event-loop-thread CPU per row, {pcpu:5.1f} us process CPU (all threads)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
