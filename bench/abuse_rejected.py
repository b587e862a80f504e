#!/usr/bin/env python
"""HelixAgent abuse benchmark (issue 12): what attacks cost the gateway, measured on a real subprocess.

Each section is a self-contained function ``section_<name>()`` that starts its own gateway (``helixagent
serve``, one worker, loopback only), attacks it with a bounded count of requests under a time limit, and
prints its figures.  Run one section with ``--section NAME`` or all of them with ``--section all``.

Sections:
  rejected   RSS of the gateway before and after 100k requests rejected by authentication (wrong keys and
             unknown ``hx-`` keys, small bodies), then after 1 MB bodies sent with such keys, and after a
             pause.  A rejected request must leave nothing behind: the figures stay flat within a few MB.

Usage: python bench/abuse_bench.py --section rejected [--requests 100000] [--big 2000 --big-rounds 4] [--max-seconds 300]
       [--src PATH]   (PATH: another checkout's src/ directory, to measure an older version the same way)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


# -- section: rejected --------------------------------------------------------------------------------------

def _rejected_rss_mb(pid: int) -> float:
    """Resident memory of the process and its children, in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return total / 1024


def _rejected_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _rejected_flood(port: int, keys: list[str], body: bytes, n: int, conns: int,
                          deadline: float) -> tuple[int, dict[int, int], float]:
    """``n`` POSTs over ``conns`` keep-alive connections, key i % len(keys) for request i; stops at
    ``deadline``.  Returns (requests answered, {status: count}, seconds)."""
    heads = [(f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {k}\r\n"
              f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() for k in keys]
    statuses: dict[int, int] = {}
    counter = iter(range(n))
    done = 0

    async def worker() -> None:
        nonlocal done
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                if time.monotonic() >= deadline:
                    return
                w.write(heads[i % len(heads)])
                w.write(body)
                await w.drain()
                head = await r.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await r.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                done += 1
                if b"connection: close" in head.lower():
                    w.close()
                    r, w = await asyncio.open_connection("127.0.0.1", port)
        finally:
            w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done, statuses, time.monotonic() - t0


def section_rejected(requests: int = 100_000, big: int = 2_000, conns: int = 16, max_seconds: float = 300.0,
                     src: str | None = None, big_rounds: int = 4) -> dict[str, float]:
    """RSS before/after ``requests`` small rejected requests (half wrong keys, half unknown hx- keys) and
    ``big`` rejected 1 MB requests, each phase bounded by ``max_seconds``."""
    tmp = tempfile.mkdtemp(prefix="helix-abuse-")
    cfg = os.path.join(tmp, "gw.yaml")
    with open(cfg, "w") as f:
        f.write(f"""
logging: {{level: warning, format: json}}
auth: {{master_key: bench-master-key-0123456789}}
providers: [{{name: mock, type: mock}}]
database: {{url: "sqlite:///{tmp}/bench.db", spool_dir: "{tmp}/spool"}}
server: {{max_body_bytes: 4194304}}
""")
    port = _rejected_free_port()
    env = dict(os.environ, PYTHONPATH=src or os.path.join(ROOT, "src"))
    errf = tempfile.TemporaryFile()
    gw = subprocess.Popen([PY, "-m", "helixagent", "serve", "--config", cfg, "--port", str(port)], env=env,
                          cwd=tmp, start_new_session=True, stdout=subprocess.DEVNULL, stderr=errf)
    small = b'{"model":"mock-1","messages":[{"role":"user","content":"hello"}]}'
    large = (b'{"model":"mock-1","messages":[{"role":"user","content":"' + b"x" * (1024 * 1024) + b'"}]}')
    wrong = ["sk-wrong-key-%d" % i for i in range(8)]
    unknown = ["hx-" + ("%02d" % i) * 21 + "u" for i in range(8)]
    figures: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if gw.poll() is not None or time.monotonic() - t0 > 30:
                    errf.seek(0)
                    raise RuntimeError("gateway did not start: " + errf.read().decode()[-2000:]) from None
                time.sleep(0.1)

        def phase(name: str, keys: list[str], body: bytes, n: int) -> None:
            done, st, secs = asyncio.run(_rejected_flood(port, keys, body, n, conns, time.monotonic() + max_seconds))
            rss = _rejected_rss_mb(gw.pid)
            figures[name] = rss
            print(f"  {name:<34} {done:>7} requests in {secs:6.1f} s ({done / secs:5.0f}/s) statuses {st}"
                  f" -> RSS {rss:7.1f} MB", flush=True)

        phase("warm-up (1,000 wrong + unknown)", wrong + unknown, small, 1000)
        figures["before"] = base = figures.pop("warm-up (1,000 wrong + unknown)")
        print(f"rejected: gateway RSS before: {base:.1f} MB", flush=True)
        phase("wrong keys, small bodies", wrong, small, requests // 2)
        phase("unknown hx- keys, small bodies", unknown, small, requests - requests // 2)
        after_small = figures["unknown hx- keys, small bodies"]
        # in rounds: the first sets the allocator's high-water mark (``conns`` bodies in flight at once,
        # which glibc keeps mapped); a leak would grow every later round by as much again
        per = max(1, big // big_rounds)
        names = []
        for i in range(big_rounds):
            names.append(f"1 MB bodies, round {i + 1}/{big_rounds}")
            phase(names[-1], wrong + unknown, large, per)
        time.sleep(5)
        figures["after 5 s idle"] = _rejected_rss_mb(gw.pid)
        print(f"  {'after 5 s idle':<34} {'':>7}{'':>46} -> RSS {figures['after 5 s idle']:7.1f} MB")
        first, last = figures[names[0]], figures[names[-1]]
        print(f"rejected: RSS {base:.1f} MB before, {after_small:.1f} MB after {requests:,} small rejected requests "
              f"({after_small - base:+.1f} MB); 1 MB bodies: {first:.1f} MB after {per:,}, {last:.1f} MB after "
              f"{per * big_rounds:,} ({last - first:+.1f} MB after the first round), "
              f"{figures['after 5 s idle']:.1f} MB after 5 s idle")
    finally:
        if gw.poll() is None:
            os.killpg(gw.pid, signal.SIGTERM)
            try:
                gw.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(gw.pid, signal.SIGKILL)
    return figures


# -- dispatcher ---------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default="all", help="rejected | all")
    ap.add_argument("--requests", type=int, default=100_000, help="rejected: small rejected requests")
    ap.add_argument("--big", type=int, default=2_000, help="rejected: rejected requests with 1 MB bodies")
    ap.add_argument("--big-rounds", type=int, default=4, help="rejected: the 1 MB requests in this many rounds")
    ap.add_argument("--conns", type=int, default=16, help="client connections")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time limit of each phase")
    ap.add_argument("--src", default=None, help="the src/ directory to run the gateway from")
    args = ap.parse_args()
    sections = {
        "rejected": lambda: section_rejected(args.requests, args.big, args.conns, args.max_seconds, args.src,
                                             args.big_rounds),
    }
    chosen = list(sections) if args.section == "all" else args.section.split(",")
    for name in chosen:
        if name not in sections:
            ap.error(f"unknown section {name!r}; one of: {', '.join(sections)}, all")
        print(f"== {name}", flush=True)
        sections[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
