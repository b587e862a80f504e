#!/usr/bin/env python
"""HelixAgent end-to-end benchmark: the gateway and the upstream directly, side by side in one run.

    wrk (1 thread, C connections) -> HelixAgent (`helixagent serve`, 1 worker) -> fast fake upstream
    wrk                            -> fast fake upstream                          (the direct baseline)

Prints requests/s, p50/p99 latency, the latency the gateway adds, and the gateway's CPU time per
request from the process's own accounting (/proc/<pid>/stat utime+stime over the measured phase).
These machines are shared and noisy, so every figure is the median of several alternating rounds and
the comparison that matters is the ratio within one run.

Scenarios: non-streamed chat (the OpenAI pass-through path, the 250 µs target), streamed chat (20
chunks), and the same non-streamed chat with the full feature set a production config turns on
(when those stages are present: keys + limits, cache miss path, recording, metrics and logs).

Usage: python bench/gateway_bench.py [--requests 5000] [--rounds 3] [--conns 16] [--out bench/results/gateway.md]
Needs `wrk` (Debian package wrk); the script installs it with apt-get when missing and allowed.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

import http_stack as hs  # noqa: E402  (the shared fake upstream, wrk driver and CPU accounting)

PY = sys.executable


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
    if not shutil.which("wrk"):
        sys.exit("wrk is required: apt-get install -y wrk")


def write_config(path: str, upstream_port: int, extra: str = "") -> None:
    with open(path, "w") as f:
        f.write(f"""
logging: {{level: warning, format: json}}
providers:
  - name: openai
    type: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
    api_key: sk-upstream-test
    models: [gpt-4o-mini]
    timeout_ms: 10000
http: {{max_idle_conns: 256, max_conns_per_host: 256, idle_conn_timeout: 90s}}
database: {{url: "sqlite:///{os.path.dirname(path)}/bench.db", spool_dir: "{os.path.dirname(path)}/spool"}}
{extra}
""")


GATEWAY_CPU: int | None = None


def start_gateway(cfg: str, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    e = {"PYTHONPATH": os.path.join(ROOT, "src")}
    e.update(env or {})
    pin = ["taskset", "-c", str(GATEWAY_CPU)] if GATEWAY_CPU is not None else []
    return hs.start(pin + [PY, "-m", "helixagent", "serve", "--config", cfg, "--port", str(port)], e)


def fmt(rows: list[tuple[str, dict]], direct: dict) -> str:
    out = ["| scenario | gateway CPU µs/req | req/s | p50 ms | p99 ms | added p50 ms | errors |",
           "|---|---:|---:|---:|---:|---:|---:|",
           f"| direct wrk→upstream | – | {direct['rps']:.0f} | {direct['p50_ms']:.2f} | {direct['p99_ms']:.2f} | – | "
           f"{direct['errors']} |"]
    for name, r in rows:
        out.append(f"| {name} | **{r['gw_cpu_us']:.0f}** | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['p50_ms'] - direct['p50_ms']:.2f} | {r['errors']} |")
    return "\n".join(out)


def median_of(results: list[dict]) -> dict:
    keys = results[0].keys()
    return {k: statistics.median(r[k] for r in results) for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gateway.md"))
    ap.add_argument("--scenarios", default="chat,stream,full,hit")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the gateway to its own core")
    args = ap.parse_args()
    ensure_wrk()
    global GATEWAY_CPU
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2 and shutil.which("taskset"):
        # "on one core": the gateway gets a core to itself; wrk and the upstream share the other
        GATEWAY_CPU = cpus[0]
        os.sched_setaffinity(0, set(cpus[1:]))
    scenarios = args.scenarios.split(",")
    tmp = tempfile.mkdtemp(prefix="helixbench-")
    up_port = hs.free_port()
    up = hs.start([PY, "-c", f"import http_stack as h; h.run_upstream({up_port})"], {"HB_STREAM_DELAY": "0"})
    procs = [up]
    try:
        up_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        hs.wait_ready(up_url, up)
        gws: dict[str, tuple[subprocess.Popen, str]] = {}
        plain_cfg = os.path.join(tmp, "plain.yaml")
        write_config(plain_cfg, up_port)
        port = hs.free_port()
        p = start_gateway(plain_cfg, port)
        procs.append(p)
        gws["plain"] = (p, f"http://127.0.0.1:{port}/v1/chat/completions")
        vkey = None
        if "full" in scenarios or "hit" in scenarios:
            # Everything a production config turns on: a virtual key (auth), limits on the key, user and
            # application, the cache (a miss for temperature 0.2, a hit for temperature 0), records in SQLite.
            fdir = os.path.join(tmp, "full")
            os.makedirs(fdir)
            full_cfg = os.path.join(fdir, "full.yaml")
            write_config(full_cfg, up_port, """
auth: {master_key: hx-bench-master-key-000000000000}
rate_limits:
  ip: {requests_per_minute: 100000000, burst_size: 1000000}
  api_key: {requests_per_minute: 100000000, tokens_per_minute: 1000000000}
  user: {tokens_per_minute: 1000000000, tokens_per_day: 100000000000}
  application: {tokens_per_month: 100000000000}
cache: {enabled: true, type: memory, ttl: 600, max_size: 1000}
""")
            env = {"PYTHONPATH": os.path.join(ROOT, "src")}
            subprocess.run([PY, "-m", "helixagent", "migrate", "up", "--config", full_cfg], check=True,
                           capture_output=True, env={**os.environ, **env})
            out = subprocess.run([PY, "-m", "helixagent", "keys", "create", "--config", full_cfg, "--user", "bench",
                                  "--app", "bench", "--role", "user", "--json"], check=True, capture_output=True,
                                 text=True, env={**os.environ, **env}).stdout
            import json
            vkey = json.loads(out)["key"]
            port = hs.free_port()
            p = start_gateway(full_cfg, port)
            procs.append(p)
            gws["full"] = (p, f"http://127.0.0.1:{port}/v1/chat/completions")
        plain_lua = hs.WRK_LUA
        keyed_lua = plain_lua.replace("sk-client-test", vkey) if vkey else plain_lua
        import urllib.request
        for _name, (p, url) in gws.items():
            for _ in range(200):
                try:
                    req = urllib.request.Request(url, data=hs.REQUEST_BODY, method="POST", headers={
                        "content-type": "application/json", "authorization": f"Bearer {vkey or 'x'}"})
                    urllib.request.urlopen(req, timeout=5).read()
                    break
                except Exception:  # noqa: BLE001 - polling until the server answers: any failure means not up yet
                    if p.poll() is not None:
                        raise RuntimeError(hs.stop(p)[-2000:]) from None
                    time.sleep(0.1)
        body = hs.REQUEST_BODY
        sbody = hs.STREAM_REQUEST_BODY
        hit_body = hs.orjson.dumps({**hs.REQUEST_OBJ, "temperature": 0})
        results: dict[str, list[dict]] = {k: [] for k in ["direct", "chat", "stream", "full", "hit"]}
        for rnd in range(args.rounds):
            order = ["direct", "chat", "stream", "full", "hit"]
            if rnd % 2:
                order.reverse()
            for sc in order:
                if sc == "direct":
                    r = hs.measure(up_url, None, up.pid, body, args.requests, args.warmup, args.conns, tmp)
                elif sc == "chat" and "chat" in scenarios:
                    r = hs.measure(gws["plain"][1], gws["plain"][0].pid, up.pid, body, args.requests, args.warmup,
                                   args.conns, tmp)
                elif sc == "stream" and "stream" in scenarios:
                    n = max(500, args.requests // 5)
                    r = hs.measure(gws["plain"][1], gws["plain"][0].pid, up.pid, sbody, n, args.warmup // 5,
                                   args.conns, tmp)
                elif sc in ("full", "hit") and sc in scenarios:
                    hs.WRK_LUA = keyed_lua
                    try:
                        r = hs.measure(gws["full"][1], gws["full"][0].pid, up.pid, body if sc == "full" else hit_body,
                                       args.requests, args.warmup, args.conns, tmp)
                    finally:
                        hs.WRK_LUA = plain_lua
                else:
                    continue
                results[sc].append(r)
        direct = median_of(results["direct"])
        rows = []
        labels = {"chat": "chat, non-streamed (OpenAI pass-through)",
                  "stream": "chat, streamed (20 chunks + [DONE])",
                  "full": "chat, non-streamed, all stages: virtual key + 6 limits + cache miss + record + metrics/log",
                  "hit": "chat, non-streamed, all stages, answered from the memory cache"}
        for sc in ("chat", "stream", "full", "hit"):
            if results[sc]:
                rows.append((labels[sc], median_of(results[sc])))
        table = fmt(rows, direct)
        head = (f"## Gateway benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
                f"- machine: nproc={os.cpu_count()}, {platform.machine()}, Python {platform.python_version()}\n"
                f"- wrk -t1 -c{args.conns}; {args.requests} requests per round after {args.warmup} warm-up; "
                f"median of {args.rounds} alternating rounds; wrk, upstream and gateway share the machine\n"
                f"- gateway CPU = utime+stime of the gateway process tree during the measured phase / requests\n"
                f"- gateway pinned to CPU {GATEWAY_CPU} (wrk and the upstream on the other core)\n"
                if GATEWAY_CPU is not None else
                "- gateway CPU = utime+stime of the gateway process tree during the measured phase / requests\n")
        text = head + "\n" + table + "\n"
        print(text)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        return 0
    finally:
        for p in reversed(procs):
            err = hs.stop(p)
            if p is not up and "Traceback" in err:
                print(err[-3000:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
