"""Limiter reserve throughput on each Redis kind: a single redis-server (the names of earlier releases) and a
3-node Redis Cluster where every limit key of a prefix shares one hash tag (``{<prefix>:rl}``: one slot,
so one node serves that prefix's limiter).  Each reserve is a request's all-or-nothing script over three
limits (key rpm, key tpm, user tokens per day) of one of 1,000 keys; 200 concurrent callers in one process.

    .venv/bin/python bench/redis_kinds_bench.py [seconds]
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helixagent.limits import REQ, TOK, Limit  # noqa: E402
from helixagent.limits.backends import DAY, SLIDING, RedisBackend  # noqa: E402
from support.redis_kinds import ClusterRedis  # noqa: E402
from support.redis_server import PrivateRedis  # noqa: E402


async def server_usec(b: RedisBackend) -> float:
    """Redis' own CPU time per reserve script (INFO commandstats, the node that holds the slot)."""
    best = 0.0
    if hasattr(b.redis, "get_primaries"):
        for node in b.redis.get_primaries():
            info = await b.redis.info("commandstats", target_nodes=node)
            for k, v in info.items():
                if k.endswith("evalsha") and int(v["calls"]) > 1000:
                    best = max(best, float(v["usec_per_call"]))
    else:
        info = await b.redis.info("commandstats")
        best = float(info["cmdstat_evalsha"]["usec_per_call"])
    return best


async def run(url: str, seconds: float, concurrency: int = 200) -> tuple[float, float]:
    b = RedisBackend(url, timeout=3.0, pool_size=100)
    p = b.key_prefix("bench")
    done = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.monotonic() < stop:
            k = i % 1000
            lims = [Limit(REQ, SLIDING, f"{p}:key:{k}:rpm", 10 ** 9, "k"),
                    Limit(TOK, SLIDING, f"{p}:key:{k}:tpm", 10 ** 9, "k"),
                    Limit(TOK, DAY, f"{p}:user:{k % 100}:tpd", 10 ** 12, "u")]
            r = await b.reserve(lims, [1, 100, 100])
            assert r.ok
            done += 1
            i += concurrency
    await b.redis.ping()
    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    rate = done / (time.monotonic() - t0)
    usec = await server_usec(b)
    await b.close()
    return rate, usec


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    single = PrivateRedis()
    try:
        rate, usec = asyncio.run(run(single.url, seconds))
        print(f"single redis-server    : {rate:8.0f} reserves/s from one process; Redis CPU {usec:.1f} us "
              f"per reserve (one core's ceiling ~{1e6 / usec:,.0f}/s)")
    finally:
        single.close()
    cluster = ClusterRedis()
    try:
        rate, usec = asyncio.run(run(cluster.url, seconds))
        print(f"3-node cluster, one tag: {rate:8.0f} reserves/s from one process; the slot's node: {usec:.1f} us "
              f"per reserve (ceiling ~{1e6 / usec:,.0f}/s for one prefix)")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
