#!/usr/bin/env python3
"""Per-request cost of the HTTP edge (api/http.py, api/openai_routes.py, api/openai_format.py), function by
function, for one or more source trees side by side (A/B of a change: export the old tree with
``git archive HEAD~1 src | tar -x -C /tmp/base``).

Two measures:

* time (default): µs per call, the minimum over alternating processes (``--rounds``) of the best of 3
  timeit runs in each;
* ``--callgrind``: instructions per call under valgrind's callgrind, ``(Ir(case, N) - Ir(no case)) / N``,
  which does not depend on what else the (shared, noisy) machine runs.  About 25 s per case and tree.

Usage: python bench/edge_bench.py --src /tmp/base/src --src src [--rounds 7] [--callgrind] [--n 3000]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

CASES = ("request", "headers", "body", "watch", "new_context", "parse_chat")

# one case, run N times after a warm-up of 200; prints {case: µs per call} (timeit mode) or nothing
CHILD = r"""
import json, sys, time, timeit, uvloop
from helixagent.api.http import Request, _hdrs, DisconnectWatch
from helixagent.api.openai_routes import new_context, base_headers
from helixagent.api import openai_format as fmt
name, n, timed = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
HEADERS = [(b"host", b"127.0.0.1:7061"), (b"user-agent", b"OpenAI/Python 1.54.0"),
           (b"accept", b"application/json"), (b"accept-encoding", b"gzip, deflate"),
           (b"content-type", b"application/json"), (b"content-length", b"250"),
           (b"authorization", b"Bearer sk-local"), (b"x-stainless-lang", b"python"),
           (b"connection", b"keep-alive")]
H = [[(bytes(bytearray(k)), bytes(bytearray(v))) for k, v in HEADERS] for _ in range(64)]  # fresh objects
scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
         "headers": HEADERS, "client": ("127.0.0.1", 5)}
body = json.dumps({"model": "gpt-4o-mini", "temperature": 0.2, "max_tokens": 64,
                   "messages": [{"role": "system", "content": "You are concise."},
                                {"role": "user", "content": "Summarise TCP vs UDP in two sentences."}]}).encode()
msg = {"type": "http.request", "body": body, "more_body": False}
async def receive():
    return msg
req = Request(scope, receive, None, None)
ctx = new_context(None, req, "chat")
ctx.provider, ctx.upstream_model, ctx.attempts = "openai", "gpt-4o-mini", 1
ctx.response_headers["x-helixagent-cost"] = "0.0000123"
i = [0]
def request():
    scope["headers"] = H[i[0] & 63]
    i[0] += 1
    Request(scope, None, None, None)
SYNC = {"request": request, "new_context": lambda: new_context(None, req, "chat"),
        "headers": lambda: _hdrs(base_headers(ctx)), "parse_chat": lambda: fmt.parse_chat(body, {"openai": None})}
async def body_(k):
    for _ in range(k):
        await req.body(1 << 20)
async def watch(k):
    for _ in range(k):
        DisconnectWatch(req, None, None).stop()
ASYNC = {"body": body_, "watch": watch}
def run(k):
    if name in SYNC:
        fn = SYNC[name]
        for _ in range(k):
            fn()
    elif name in ASYNC:
        uvloop.run(ASYNC[name](k))
if not timed:
    run(200 + n)
elif name in SYNC:
    print(json.dumps(min(timeit.repeat(SYNC[name], number=n, repeat=3)) / n * 1e6))
else:
    async def timed_async():
        best = 1e9
        for _ in range(3):
            t0 = time.perf_counter()  # not loop.time(): uvloop's is in milliseconds
            await ASYNC[name](n)
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        return best
    print(json.dumps(uvloop.run(timed_async())))
"""


def child(src: str, case: str, n: int, timed: bool, callgrind: bool = False) -> str:
    cmd = [sys.executable, "-c", CHILD, case, str(n), "1" if timed else "0"]
    if callgrind:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), PYTHONHASHSEED="0")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return r.stdout + r.stderr


def instructions(src: str, case: str, n: int) -> int:
    m = re.search(r"Collected : (\d+)", child(src, case, n, False, callgrind=True))
    assert m is not None, "no callgrind summary"
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--case", action="append", choices=CASES)
    a = ap.parse_args()
    cases = a.case or list(CASES)
    print(f"{'case':<14}" + "".join(f"{s[-30:]:>32}" for s in a.src))
    if a.callgrind:
        n = min(a.n, 3000)
        base = {s: instructions(s, "none", 0) for s in a.src}
        for c in cases:
            row = [(instructions(s, c, n) - base[s]) // (n + 200) for s in a.src]
            print(f"{c:<14}" + "".join(f"{x:>26} instr" for x in row), flush=True)
        return
    res: dict[str, dict[str, list[float]]] = {s: {c: [] for c in cases} for s in a.src}
    for _ in range(a.rounds):
        for c in cases:
            for s in a.src:
                res[s][c].append(json.loads(child(s, c, a.n, True).strip().splitlines()[-1]))
    for c in cases:
        print(f"{c:<14}" + "".join(f"{min(res[s][c]):>14.3f} µs (median {statistics.median(res[s][c]):6.3f})"
                                   for s in a.src))


if __name__ == "__main__":
    main()
