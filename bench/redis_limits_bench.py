#!/usr/bin/env python3
"""CPU cost of the Redis limit backend per request: one reserve + one settle, at concurrency 16.

Old (one redis-py ``Script`` call per reserve and per settle, as before redis_batch) against new
(:class:`helixagent.limits.backends.RedisBackend`: the calls of one loop iteration share one round trip),
alternating rounds in one process against a private redis-server (or --url with a unique key prefix).
Each of 16 workers loops: reserve 7 limits (IP GCRA, key rpm/tpm, user tpm/tpd, app tpmo, key usd-d),
then --work-us of busy CPU (standing in for the gateway's other stages and the upstream call; 0: none),
then a wait for "the upstream" (one loop iteration, or a random 0..--upstream-ms), then settle the 5
token/cost limits.

Reports per request: gateway CPU (time.process_time of this process), Redis server CPU (INFO cpu
used_cpu_user + used_cpu_sys) and, for new, the mean number of calls per round trip.

Usage: .venv/bin/python bench/redis_limits_bench.py [--n 4000] [--rounds 5] [--work-us 0] [--upstream-ms 0] [--url redis://...]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import redis  # noqa: E402

from helixagent import redis_client  # noqa: E402
from helixagent.limits import REQ, TOK, USD, Limit  # noqa: E402
from helixagent.limits.backends import DAY, GCRA, MONTH, SLIDING, RedisBackend, Reservation  # noqa: E402

BIG = 10 ** 12


class OldBackend(RedisBackend):
    """reserve/settle as they were: one redis-py Script call each."""

    async def reserve(self, limits: list[Any], costs: list[int]) -> Reservation:
        args: list[Any] = []
        for lim, c in zip(limits, costs, strict=True):
            args += (lim.algo, lim.limit, c, lim.burst)
        try:
            res = await self._reserve(keys=[lim.key for lim in limits], args=args)
        except redis_client.OUTAGE as exc:
            raise self._failed(exc) from None
        self._ok()
        n = len(limits)
        remaining = [int(res[3 + 3 * i]) for i in range(n)]
        reset = [int(res[4 + 3 * i]) / 1000.0 for i in range(n)]
        handles = [res[5 + 3 * i] or None for i in range(n)]
        ok = int(res[0]) == 1
        return Reservation(ok, -1 if ok else int(res[1]) - 1, int(res[2]) / 1000.0, remaining, reset, handles)

    async def settle(self, handles: list[Any], deltas: list[int], ttls: list[int] | None = None) -> None:
        keys: list[Any] = []
        args: list[Any] = []
        for i, (h, d) in enumerate(zip(handles, deltas, strict=True)):
            if h is None or not d:
                continue
            keys.append(h)
            args += (int(d), ttls[i] if ttls else 120_000)
        if not keys:
            return
        try:
            await self._settle(keys=keys, args=args)
        except redis_client.OUTAGE as exc:
            raise self._failed(exc) from None
        self._ok()


def limits_for(prefix: str, worker: int) -> list[Limit]:
    k, u, a = f"{prefix}:key:k{worker}", f"{prefix}:user:u{worker % 4}", f"{prefix}:app:a"
    return [Limit(REQ, GCRA, f"{prefix}:ip:10.0.0.{worker}", BIG, "IP", BIG),
            Limit(REQ, SLIDING, f"{k}:rpm", BIG, "k"), Limit(TOK, SLIDING, f"{k}:tpm", BIG, "k"),
            Limit(TOK, SLIDING, f"{u}:tpm", BIG, "u"), Limit(TOK, DAY, f"{u}:tpd", BIG, "u"),
            Limit(TOK, MONTH, f"{a}:tpmo", BIG, "a"), Limit(USD, DAY, f"{k}:usd-d", BIG, "k")]


def burn(us: float) -> None:
    if us <= 0:
        return
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def run(be: RedisBackend, prefix: str, n: int, conc: int, work_us: float, upstream_ms: float) -> float:
    per = n // conc
    rnd = random.Random(1)

    async def worker(w: int) -> None:
        lims = limits_for(prefix, w)
        costs = [1, 1, 300, 300, 300, 300, 2000]
        ttls = [lim.ttl for lim in lims]
        deltas = [0, 0, -100, -100, -100, -100, -500]
        for _ in range(per):
            res = await be.reserve(lims, costs)
            assert res.ok
            burn(work_us)
            # the upstream call: at least one loop iteration; --upstream-ms: a random wait up to that, which
            # spreads the workers over many iterations (as requests arriving on their own sockets are)
            await asyncio.sleep(rnd.uniform(0, upstream_ms / 1000.0) if upstream_ms else 0)
            await be.settle(res.handles, deltas, ttls)

    t0 = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(conc)))
    return (time.process_time() - t0) / (per * conc) * 1e6


def redis_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--work-us", type=float, default=0.0)
    ap.add_argument("--upstream-ms", type=float, default=0.0)
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    private = None
    url = args.url
    if not url:
        from support.redis_server import PrivateRedis
        private = PrivateRedis()
        url = private.url
    prefix = f"bench-{uuid.uuid4().hex[:8]}:rl"
    sync = redis.Redis.from_url(url)
    old, new = OldBackend(url), RedisBackend(url)
    cases: list[tuple[str, RedisBackend]] = [("old: a Script call each", old), ("new: coalesced", new)]
    try:
        for _, be in cases:  # warm-up: connections, script cache
            await run(be, prefix, 800, args.conc, args.work_us, args.upstream_ms)
        cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
        srv: dict[str, list[float]] = {c[0]: [] for c in cases}
        b0 = new.coalescer.batches if new.coalescer else 0
        c0 = new.coalescer.calls if new.coalescer else 0
        per_round = args.n // args.conc * args.conc
        for _ in range(args.rounds):
            for name, be in cases:
                s0 = redis_cpu(sync)
                cpu[name].append(await run(be, prefix, args.n, args.conc, args.work_us, args.upstream_ms))
                srv[name].append((redis_cpu(sync) - s0) / per_round * 1e6)
        print(f"reserve (7 limits) + settle (5), concurrency {args.conc}, {per_round} requests x {args.rounds} "
              f"rounds, work {args.work_us:g} us + upstream wait 0-{args.upstream_ms:g} ms between; median per request (python {sys.version.split()[0]})")
        print(f"{'case':28} {'gateway CPU us':>15} {'Redis CPU us':>13}")
        for name, _ in cases:
            print(f"{name:28} {statistics.median(cpu[name]) - args.work_us:15.1f} {statistics.median(srv[name]):13.1f}")
        if new.coalescer is not None:
            b = new.coalescer.batches - b0
            print(f"new: {(new.coalescer.calls - c0) / max(1, b):.2f} calls per round trip")
    finally:
        await old.close()
        await new.close()
        keys = list(sync.scan_iter(f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            sync.delete(*keys[i:i + 500])
        sync.close()
        if private is not None:
            private.close()


if __name__ == "__main__":
    asyncio.run(main())
