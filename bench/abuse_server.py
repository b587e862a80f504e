#!/usr/bin/env python
"""HelixAgent under abuse: a `helixagent serve` subprocess (1 worker, loopback only), attacked the way an
outsider would, printing what it costs the gateway.  Independent sections, selected with --section:

  headers    40 connections each sending up to 20 MB of a never-ending header: RSS before, peak (VmHWM)
             and after, how much each connection got to send before it was cut off, how many got a 431.
  slowloris  200 connections that send one byte of a head per second, while a second client sends
             normal requests: that client's p50/p99 with and without the slowloris, and how many slow
             connections the gateway still holds after server.header_timeout.
  protocol   what the defences cost per request: uvicorn with its plain httptools protocol versus
             api/server.py's HelixHttpProtocol, a trivial ASGI app, wrk keep-alive POSTs, server CPU
             per request from /proc (alternating rounds, median; needs wrk).

Every section is bounded in count and time and stops by itself.  RSS is read from /proc/<pid>/status.

Usage: python bench/abuse_bench.py [--section headers,slowloris,protocol] [--duration 15] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
PY = sys.executable


# -- shared helpers (used by every section) ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS / VmHWM (peak) of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class Gateway:
    """`helixagent serve` in a subprocess with a config dict (merged over a small default), on loopback."""

    def __init__(self, cfg: dict[str, Any] | None = None, workers: int = 1):
        self.dir = tempfile.mkdtemp(prefix="helix-abuse-")
        self.port = free_port()
        data: dict[str, Any] = {"logging": {"level": "warning"},
                                "database": {"url": f"sqlite:///{self.dir}/h.db", "spool_dir": f"{self.dir}/spool"}}
        for k, v in (cfg or {}).items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        data.setdefault("server", {})["port"] = self.port
        path = os.path.join(self.dir, "helix.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f)
        env = dict(os.environ, PYTHONPATH=SRC)
        env.pop("HELIXAGENT_API_KEY", None)
        self.log = open(os.path.join(self.dir, "serve.log"), "wb")
        self.proc = subprocess.Popen([PY, "-m", "helixagent", "serve", "--config", path, "--workers", str(workers)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gateway exited: " + open(self.log.name).read()[-2000:])
            if self.get("/health")[0] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("gateway did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, float]:
        """(status, seconds) of one GET on a fresh connection; status 0 if it failed."""
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path.encode())
                buf = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            status = int(buf[9:12]) if buf.startswith(b"HTTP/1.1 ") else 0
        except OSError:
            status = 0
        return status, time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {}


def section(name: str) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    def register(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        SECTIONS[name] = fn
        return fn
    return register


# -- headers: unterminated heads ----------------------------------------------------------------------------------
@section("headers")
def bench_headers(args: argparse.Namespace) -> None:
    conns, per_conn = 40, 20 * 1024 * 1024
    gw = Gateway()
    try:
        for _ in range(20):
            gw.get("/health")
        before = vm_kib(gw.pid)
        sent: list[int] = []
        answers: list[bytes] = []
        lock = threading.Lock()

        def attack() -> None:
            n, got = 0, b""
            chunk = b"a" * 65536
            try:
                with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
                    try:
                        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                        while n < per_conn:
                            s.sendall(chunk)
                            n += len(chunk)
                    except OSError:
                        pass
                    try:
                        got = s.recv(200)
                    except OSError:
                        pass
            except OSError:
                pass
            with lock:
                sent.append(n)
                answers.append(got)

        t0 = time.monotonic()
        threads = [threading.Thread(target=attack, daemon=True) for _ in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, 120 - (time.monotonic() - t0)))
        took = time.monotonic() - t0
        peak = vm_kib(gw.pid, "VmHWM")
        time.sleep(1)
        after = vm_kib(gw.pid)
        ok = gw.get("/health")[0]
        n431 = sum(1 for a in answers if a.startswith(b"HTTP/1.1 431"))
        print(f"## headers: {conns} connections x up to {per_conn >> 20} MB of unterminated header")
        print(f"RSS before {before / 1024:.1f} MB | peak during {peak / 1024:.1f} MB (+{(peak - before) / 1024:.1f}) | "
              f"after {after / 1024:.1f} MB")
        print(f"bytes sent per connection before the cut-off: median {statistics.median(sent) / 1024:.0f} KiB, "
              f"max {max(sent) / 1024:.0f} KiB | 431 answers: {n431}/{conns} | {took:.1f} s | "
              f"/health afterwards: {ok}")
    finally:
        gw.stop()


# -- slowloris: a second client's latency --------------------------------------------------------------------------
@section("slowloris")
def bench_slowloris(args: argparse.Namespace) -> None:
    n_slow, duration = 200, args.duration
    gw = Gateway()
    try:
        def client(seconds: float) -> list[float]:
            lat: list[float] = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                status, took = gw.get("/health")
                if status == 200:
                    lat.append(took)
                else:
                    lat.append(float("inf"))
                time.sleep(0.01)
            return lat

        base = client(min(5.0, duration))
        state = {"open": 0, "closed_by_server": 0}

        async def slow_one(stop_at: float) -> None:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            except OSError:
                return
            state["open"] += 1
            data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
            i = 0
            try:
                while time.monotonic() < stop_at and i < len(data):
                    w.write(data[i:i + 1])
                    await w.drain()
                    i += 1
                    try:
                        got = await asyncio.wait_for(r.read(1000), 1.0)
                        if got == b"" or got.startswith(b"HTTP/1.1 408"):
                            state["closed_by_server"] += 1
                            break
                    except asyncio.TimeoutError:
                        pass
            except OSError:
                state["closed_by_server"] += 1
            finally:
                state["open"] -= 1
                w.close()

        async def attack(stop_at: float) -> None:
            await asyncio.gather(*(slow_one(stop_at) for _ in range(n_slow)))

        stop_at = time.monotonic() + duration
        th = threading.Thread(target=lambda: asyncio.run(attack(stop_at)), daemon=True)
        th.start()
        time.sleep(0.5)
        under = client(duration - 1.0)
        th.join(duration + 30)
        print(f"## slowloris: {n_slow} connections sending a byte per second for {duration:.0f} s "
              f"(server.header_timeout default 10 s)")
        for name, lat in (("without slowloris", base), ("during slowloris", under)):
            fin = [x for x in lat if x != float("inf")]
            print(f"second client {name}: {len(lat)} requests, failed {len(lat) - len(fin)}, "
                  f"p50 {pct(fin, 50) * 1000:.2f} ms, p99 {pct(fin, 99) * 1000:.2f} ms")
        print(f"slow connections cut off by the server: {state['closed_by_server']}/{n_slow}")
    finally:
        gw.stop()


# -- protocol: the CPU cost of the limits --------------------------------------------------------------------------
_PROTO_SERVER = r"""
import sys, uvicorn
from helixagent.api.server import uvicorn_config
from helixagent.config import load_config_dict

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})

port, which = int(sys.argv[1]), sys.argv[2]
kw = dict(host="127.0.0.1", port=port, loop="uvloop", lifespan="off", access_log=False, log_config=None)
if which == "helix":
    config = uvicorn_config(app, load_config_dict({}, "<bench>").server, **kw)
else:
    config = uvicorn.Config(app, http="httptools", **kw)
uvicorn.Server(config).run()
"""


@section("protocol")
def bench_protocol(args: argparse.Namespace) -> None:
    import shutil
    sys.path.insert(0, HERE)
    import http_stack as hs  # the shared wrk driver and /proc CPU accounting
    if not shutil.which("wrk"):
        print("## protocol: skipped (wrk is not installed: apt-get install -y wrk)")
        return
    tmp = tempfile.mkdtemp(prefix="helix-proto-")
    script = os.path.join(tmp, "server.py")
    with open(script, "w") as f:
        f.write(_PROTO_SERVER)
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["taskset", "-c", str(cpus[0])] if len(cpus) >= 2 and shutil.which("taskset") else []
    body = b'{"model":"m","messages":[{"role":"user","content":"hello"}]}'
    n, rounds = 20000, args.rounds
    results: dict[str, list[float]] = {"httptools": [], "helix": []}
    p99: dict[str, list[float]] = {"httptools": [], "helix": []}
    for _ in range(rounds):
        for which in ("httptools", "helix"):
            port = free_port()
            env = dict(os.environ, PYTHONPATH=SRC)
            proc = subprocess.Popen(pin + [PY, script, str(port), which], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}/"
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=1):
                            break
                    except OSError:
                        time.sleep(0.05)
                hs.run_wrk(url, body, 2000, 16, tmp)  # warm-up
                c0 = hs.tree_cpu_seconds(proc.pid)
                r = hs.run_wrk(url, body, n, 16, tmp)
                c1 = hs.tree_cpu_seconds(proc.pid)
                results[which].append((c1 - c0) / r["requests"] * 1e6)
                p99[which].append(r["p99_ms"])
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"## protocol: server CPU per request, trivial ASGI app, {n} keep-alive POSTs x {rounds} rounds, "
          f"16 connections")
    for which in ("httptools", "helix"):
        print(f"{which:>10}: median {statistics.median(results[which]):.1f} µs/request "
              f"(rounds {', '.join(f'{x:.1f}' for x in results[which])}), p99 {statistics.median(p99[which]):.2f} ms")
    print(f"difference: {statistics.median(results['helix']) - statistics.median(results['httptools']):+.1f} µs/request")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", default=None, help="comma-separated; default: all of " + ",".join(SECTIONS))
    ap.add_argument("--duration", type=float, default=15.0, help="slowloris: seconds of attack (bounded)")
    ap.add_argument("--rounds", type=int, default=5, help="protocol: alternating rounds")
    args = ap.parse_args()
    names = args.section.split(",") if args.section else list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    args.duration = max(3.0, min(args.duration, 60.0))
    args.rounds = max(1, min(args.rounds, 20))
    for name in names:
        SECTIONS[name](args)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
