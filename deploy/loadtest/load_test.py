#!/usr/bin/env python3
"""A load test for the gateway's chat completions, the Python equivalent of load-test.js (k6):

    python deploy/loadtest/load_test.py --vus 100 --duration 30s --url http://127.0.0.1:8080 --key "$KEY"

``--vus`` virtual users each send requests back to back over one shared connection pool for
``--duration``; at the end it prints requests, req/s, latency percentiles (p50/p95/p99), the error rate and
the status codes seen, and exits 1 when a threshold fails (error rate above ``--max-error-rate`` or p95
above ``--max-p95``), like k6's thresholds.  Bounded: at most ``--max-requests`` requests; a URL that is
not a loopback address needs ``--allow-remote`` (it is your own gateway you are loading, on purpose).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run(args: argparse.Namespace) -> dict[str, object]:
    headers = {"content-type": "application/json"}
    if args.key:
        headers["authorization"] = f"Bearer {args.key}"
    body = {"model": args.model, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": args.prompt}]}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors = 0
    sent = 0
    deadline = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=args.vus, max_keepalive_connections=args.vus)

    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        async def vu() -> None:
            nonlocal errors, sent
            while time.perf_counter() < deadline and sent < args.max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    ok = r.status_code == 200 and bool(r.json().get("choices"))
                    statuses[str(r.status_code)] += 1
                except (httpx.HTTPError, ValueError) as exc:
                    ok = False
                    statuses[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(vu() for _ in range(args.vus)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    n = len(lat)
    return {"requests": n, "errors": errors, "elapsed": elapsed, "statuses": statuses,
            "p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--url", default=os.environ.get("HELIXAGENT_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--key", default=os.environ.get("HELIXAGENT_API_KEY", ""),
                    help="gateway API key (default $HELIXAGENT_API_KEY; never printed)")
    ap.add_argument("--vus", type=int, default=10, help="concurrent virtual users (default 10)")
    ap.add_argument("--duration", type=parse_duration, default=10.0, help="e.g. 30s, 2m (default 10s)")
    ap.add_argument("--model", default=os.environ.get("HELIXAGENT_MODEL", "mock"))
    ap.add_argument("--prompt", default="Say hello in one short sentence.")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    ap.add_argument("--max-error-rate", type=float, default=0.01, help="threshold: fail above (default 0.01)")
    ap.add_argument("--max-p95", type=parse_duration, default=None, help="threshold: fail if p95 is above, e.g. 2s")
    ap.add_argument("--allow-remote", action="store_true", help="allow a URL that is not a loopback address")
    args = ap.parse_args(argv)
    if not 1 <= args.vus <= 10_000:
        ap.error("--vus must be between 1 and 10000")
    if not 0 < args.duration <= 3600:
        ap.error("--duration must be between 0 and 1h")
    if not args.allow_remote and not is_loopback(args.url):
        ap.error(f"{args.url} is not a loopback address: pass --allow-remote to load a remote gateway")

    res = asyncio.run(run(args))
    n = int(res["requests"])  # type: ignore[call-overload]
    errors = int(res["errors"])  # type: ignore[call-overload]
    rate = errors / n if n else 1.0
    elapsed = float(res["elapsed"])  # type: ignore[arg-type]
    print(f"vus: {args.vus}")
    print(f"duration: {elapsed:.2f} s")
    print(f"requests: {n}")
    print(f"req/s: {n / elapsed if elapsed else 0:.1f}")
    for q in ("p50", "p95", "p99"):
        print(f"{q}: {float(res[q]) * 1000:.1f} ms")  # type: ignore[arg-type]
    print(f"errors: {errors}")
    print(f"error rate: {rate * 100:.2f}%")
    for status, count in sorted(res["statuses"].items()):  # type: ignore[attr-defined]
        print(f"status {status}: {count}")
    failed = []
    if n == 0 or rate > args.max_error_rate:
        failed.append(f"error rate {rate * 100:.2f}% > {args.max_error_rate * 100:.2f}%")
    if args.max_p95 is not None and float(res["p95"]) > args.max_p95:  # type: ignore[arg-type]
        failed.append(f"p95 {float(res['p95']) * 1000:.1f} ms > {args.max_p95 * 1000:.0f} ms")  # type: ignore[arg-type]
    for f in failed:
        print(f"threshold failed: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
