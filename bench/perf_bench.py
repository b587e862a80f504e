#!/usr/bin/env python
"""`make bench`: issue 16's scenarios and a bare pass-through proxy, side by side in ONE run, with ratios.

    wrk / a c=1 client (core 1) -> bare proxy | HelixAgent (core 0, one worker each) -> fake upstream (core 1)

The bare proxy is bench/http_stack.py's uvicorn + raw ASGI + pyreqwest pass-through (parse, forward, parse,
add a field, respond; streams relayed chunk by chunk).  Every gateway process is pinned to core 0 with
taskset; this script, wrk, the upstream, Redis and PostgreSQL run on core 1.  Gateway CPU per request is
utime+stime of its process (all threads) over the measured phase / requests (/proc/<pid>/stat), as
bench/gateway_bench.py does; Redis and PostgreSQL (private servers started here) are accounted the same way.

Scenarios: default stages (records to SQLite, metrics, access log); every stage on (virtual key, 6 limits,
cache miss, record, metrics, log); a memory-cache hit; streams of 20 and 200 chunks beside the bare relay
(per-chunk cost = slope between the two); latency at concurrency 1 (p50/p99) and streamed time to first
byte; RSS after warm-up; a bounded soak mixing streamed, cached, rejected and failed requests with the RSS
sampled along the way; and the production shape (limits in Redis, records in PostgreSQL).

Usage: python bench/perf_bench.py [--rounds 3] [--requests 4000] [--soak-seconds 120] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import http_stack as hs  # noqa: E402

PY = sys.executable
ENV = {"PYTHONPATH": os.path.join(ROOT, "src")}
MASTER = "hx-bench-master-key-000000000000"
PATH = "/v1/chat/completions"
GW_CPU: int | None = None

BODY = hs.REQUEST_BODY
HIT_BODY = hs.orjson.dumps({**hs.REQUEST_OBJ, "temperature": 0})
S20 = hs.STREAM_REQUEST_BODY
S200 = hs.orjson.dumps({**hs.REQUEST_OBJ, "stream": True, "max_tokens": hs.LONG_STREAM_MAX_TOKENS})
FAIL_BODY = hs.orjson.dumps({**hs.REQUEST_OBJ, "model": "broken-model"})

FULL_STAGES = """
auth: {master_key: %(master)s}
rate_limits:
  %(backend)s
  ip: {requests_per_minute: 100000000, burst_size: 1000000}
  api_key: {requests_per_minute: 100000000, tokens_per_minute: 1000000000}
  user: {tokens_per_minute: 1000000000, tokens_per_day: 100000000000}
  application: {tokens_per_month: 100000000000}
cache: {enabled: true, type: memory, ttl: 600, max_size: 1000}
"""


def config(d: str, up_port: int, db_url: str | None = None, full: bool = False, redis_url: str | None = None,
           broken: bool = False) -> str:
    os.makedirs(d, exist_ok=True)
    db = db_url or f"sqlite:///{d}/bench.db"
    # the default logging (level info: the access log's JSON line per request), into a file beside the
    # database -- "default stages" include the access log (issue 16); level warning would leave it out
    text = f"""
logging: {{level: info, format: json, file: "{d}/access.log"}}
providers:
  - name: openai
    type: openai
    base_url: http://127.0.0.1:{up_port}/v1
    api_key: sk-upstream-test
    models: [gpt-4o-mini]
    timeout_ms: 10000
"""
    if broken:  # the soak's failed requests: an upstream answering 500
        text += f"""  - name: broken
    type: openai
    base_url: http://127.0.0.1:{up_port}/fail/v1
    api_key: sk-upstream-test
    models: [broken-model]
    timeout_ms: 10000
"""
    text += f"""http: {{max_idle_conns: 256, max_conns_per_host: 256, idle_conn_timeout: 90s}}
database: {{url: "{db}", spool_dir: "{d}/spool"}}
"""
    if full:
        backend = f"backend: redis\n  redis_url: {redis_url}" if redis_url else "backend: memory"
        text += FULL_STAGES % {"master": MASTER, "backend": backend}
    path = os.path.join(d, "helix.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def cli(*args: str) -> str:
    return subprocess.run([PY, "-m", "helixagent", *args], check=True, capture_output=True, text=True,
                          env={**os.environ, **ENV}).stdout


def pinned(cmd: list[str]) -> list[str]:
    return (["taskset", "-c", str(GW_CPU)] if GW_CPU is not None else []) + cmd


def split_cores() -> None:
    """Servers under test on the first core (GW_CPU, through taskset); this process and what it starts next
    (wrk, the upstream, Redis, PostgreSQL) on the others.  Exits when wrk is missing."""
    global GW_CPU
    if not shutil.which("wrk"):
        sys.exit("wrk is required: apt-get install -y wrk")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 and shutil.which("taskset"):
        GW_CPU = cpus[0]
        os.sched_setaffinity(0, set(cpus[1:]))


class Target:
    """One server under test: its process, URL and the bearer the load uses."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, bearer: str = "sk-client-test"):
        self.name, self.proc, self.port, self.bearer = name, proc, port, bearer
        self.url = f"http://127.0.0.1:{port}{PATH}"

    def wait(self) -> None:
        for _ in range(300):
            try:
                req = urllib.request.Request(self.url, data=BODY, method="POST", headers={
                    "content-type": "application/json", "authorization": f"Bearer {self.bearer}"})
                urllib.request.urlopen(req, timeout=5).read()
                return
            except Exception:  # noqa: BLE001 - polling until the server answers: any failure means not up yet
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: " + hs.stop(self.proc)[-2000:]) from None
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not come up")


def gateway(name: str, cfg: str, bearer: str = "sk-client-test") -> Target:
    port = hs.free_port()
    p = hs.start(pinned([PY, "-m", "helixagent", "serve", "--config", cfg, "--port", str(port)]), ENV)
    return Target(name, p, port, bearer)


def bare(up_url: str, client: str = "pyreqwest") -> Target:
    port = hs.free_port()
    p = hs.start(pinned(hs.gateway_cmd("uvicorn", port)), {"HB_CLIENT": client, "HB_UPSTREAM": up_url})
    return Target("bare" if client == "pyreqwest" else f"bare_{client}", p, port)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# A cache miss every time: each request's body differs (a counter in the user message), temperature 0 so the
# cache looks it up and stores the answer (temperature 0.2 would bypass the cache: no key, no lookup).
MISS_TEMPLATE = hs.orjson.dumps({**hs.REQUEST_OBJ, "temperature": 0}).decode().replace(
    "use case for each protocol.", "use case for each protocol. (%%d)")
MISS_LUA = """
local tmpl = [[%s]]
local seq = SEQ_START
function request()
  seq = seq + 1
  return wrk.format(nil, nil, nil, string.format(tmpl, seq))
end
""" % MISS_TEMPLATE
MISS = b"<unique cache miss>"  # marker body: measure() switches the wrk script to MISS_LUA
_SEQ = [0]


def _miss_lua() -> str:  # every wrk run numbers its bodies from a fresh start: never a body seen before
    _SEQ[0] += 1
    return MISS_LUA.replace("SEQ_START", str(_SEQ[0] * 100_000_000))


def with_bearer(t: Target | None, fn, unique: bool = False):  # noqa: ANN001, ANN201 - helper around hs.WRK_LUA
    plain = hs.WRK_LUA
    if t is not None:
        hs.WRK_LUA = plain.replace("sk-client-test", t.bearer)
    keyed = hs.WRK_LUA
    real_run = hs.run_wrk
    if unique:
        def run_unique(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            hs.WRK_LUA = keyed + _miss_lua()
            return real_run(*args, **kw)
        hs.run_wrk = run_unique
    try:
        return fn()
    finally:
        hs.WRK_LUA = plain
        hs.run_wrk = real_run


def measure(t: Target, body: bytes, n: int, warm: int, conns: int, tmp: str, servers: list[int]) -> dict:
    unique = body is MISS
    if unique:
        body = BODY  # wrk's default body, replaced per request by MISS_LUA's request()

    def run() -> dict:
        hs.run_wrk(t.url, body, warm, conns, tmp)
        time.sleep(0.2)
        s0 = [hs.tree_cpu_seconds(p) for p in servers]
        g0, k0 = hs.tree_cpu_seconds(t.proc.pid), hs.tree_cpu_seconds(t.proc.pid, kernel_only=True)
        r = hs.run_wrk(t.url, body, n, conns, tmp)
        g1, k1 = hs.tree_cpu_seconds(t.proc.pid), hs.tree_cpu_seconds(t.proc.pid, kernel_only=True)
        s1 = [hs.tree_cpu_seconds(p) for p in servers]
        r["cpu"] = (g1 - g0) / r["requests"] * 1e6
        r["sys"] = (k1 - k0) / r["requests"] * 1e6
        r["srv_cpu"] = sum(b - a for a, b in zip(s0, s1, strict=True)) / r["requests"] * 1e6
        return r
    return with_bearer(t, run, unique)


def ttfb(t: Target, body: bytes, n: int) -> list[float]:
    """Time to the first SSE event of a streamed answer at concurrency 1 (keep-alive, raw socket), ms."""
    head = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {t.bearer}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    out = []
    with socket.create_connection(("127.0.0.1", t.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n):
            t0 = time.perf_counter()
            s.sendall(head)
            buf, first = b"", None
            while not buf.endswith(b"0\r\n\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError(f"{t.name}: connection closed mid-stream")
                buf += chunk
                if first is None and b"data:" in buf:
                    first = time.perf_counter() - t0
            if i >= n // 10:  # the first tenth is warm-up
                out.append(first * 1000)
    return out


SOAK_LUA = r"""
local reqs = {}
function init(args)
  local key = "Bearer %(key)s"
  local h = {["Content-Type"] = "application/json", ["Authorization"] = key}
  local bad = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer hx-not-a-key"}
  local miss = [[%(miss)s]]
  local hit = [[%(hit)s]]
  local s20 = [[%(s20)s]]
  local fail = [[%(fail)s]]
  local order = {miss, s20, hit, miss, hit, s20, miss, "BAD", fail, miss}
  for i, b in ipairs(order) do
    if b == "BAD" then reqs[i] = wrk.format("POST", "%(path)s", bad, miss)
    else reqs[i] = wrk.format("POST", "%(path)s", h, b) end
  end
end
local i = 0
function request()
  i = i + 1
  return reqs[(i %% #reqs) + 1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("SOAK %%d %%d %%d\n", summary.requests, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def soak(t: Target, seconds: int, segments: int, tmp: str) -> dict:
    script = os.path.join(tmp, "soak.lua")
    with open(script, "w") as f:
        f.write(SOAK_LUA % {"key": t.bearer, "miss": BODY.decode(), "hit": HIT_BODY.decode(), "s20": S20.decode(),
                            "fail": FAIL_BODY.decode(), "path": PATH})
    curve = [(0, rss_mb(t.proc.pid))]
    total = non2xx = sockerr = 0
    seg = max(1, seconds // segments)
    for _ in range(segments):
        out = subprocess.run(["wrk", "-t1", "-c16", f"-d{seg}s", "--timeout", "10s", "-s", script, t.url],
                             capture_output=True, text=True, timeout=seg + 60).stdout
        line = [x for x in out.splitlines() if x.startswith("SOAK ")]
        if not line:
            raise RuntimeError("soak: wrk output not parsed:\n" + out)
        r, st, se = map(int, line[0].split()[1:])
        total, non2xx, sockerr = total + r, non2xx + st, sockerr + se
        curve.append((total, rss_mb(t.proc.pid)))
    return {"requests": total, "non2xx": non2xx, "sockerr": sockerr, "curve": curve, "seconds": seg * segments}


def med(rs: list[dict], k: str) -> float:
    return statistics.median(r[k] for r in rs)


def compiled_note() -> str:
    """Whether the gateways ran the sources or the mypyc-compiled hot modules (``make compile``)."""
    out = subprocess.run([PY, "-c", "from helixagent import compiled as c; print(len(c.check()), len(c.MODULES))"],
                         capture_output=True, text=True, check=True).stdout.split()
    n, total = int(out[0]), int(out[1])
    return f"{n} of {total} hot modules compiled (`make compile`)" if n else "the sources (no compiled modules)"


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def main() -> int:  # noqa: C901 - one linear orchestration
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--c1-requests", type=int, default=3000)
    ap.add_argument("--soak-seconds", type=int, default=120)
    ap.add_argument("--soak-segments", type=int, default=8)
    ap.add_argument("--no-prod", action="store_true", help="skip the Redis + PostgreSQL rows")
    ap.add_argument("--stream-delay", default="0.0005", help="upstream pause between SSE chunks (s)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "perf.md"))
    a = ap.parse_args()
    split_cores()
    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="helixperf-")
    up_port = hs.free_port()
    up = hs.start([PY, "-c", f"import http_stack as h; h.run_upstream({up_port})"], {"HB_STREAM_DELAY": a.stream_delay})
    procs: list[subprocess.Popen] = [up]
    pg = redis = None
    try:
        up_url = f"http://127.0.0.1:{up_port}{PATH}"
        hs.wait_ready(up_url, up)
        direct = Target("direct", up, up_port)
        # "bare" is the baseline (pyreqwest); "bare_h1" the same proxy with HelixAgent's own upstream client,
        # a stricter baseline printed beside it (the gateway's ratios partly reflect the client it replaced)
        t: dict[str, Target] = {"bare": bare(up_url), "bare_h1": bare(up_url, "h1")}
        t["default"] = gateway("default", config(os.path.join(tmp, "default"), up_port))
        fcfg = config(os.path.join(tmp, "full"), up_port, full=True)
        cli("migrate", "up", "--config", fcfg)

        def keyed(cfg: str) -> str:
            return json.loads(cli("keys", "create", "--config", cfg, "--user", "bench", "--app", "bench",
                                  "--role", "user", "--json"))["key"]
        t["full"] = gateway("full", fcfg, keyed(fcfg))
        scfg = config(os.path.join(tmp, "soak"), up_port, full=True, broken=True)
        cli("migrate", "up", "--config", scfg)
        t["soak"] = gateway("soak", scfg, keyed(scfg))
        servers: list[int] = []
        if not a.no_prod:
            from support.pg import PrivatePostgres
            from support.redis_server import PrivateRedis
            pg, redis = PrivatePostgres(), PrivateRedis()
            with open(os.path.join(pg.data, "postmaster.pid")) as f:
                servers = [int(f.readline()), redis.proc.pid]
            pcfg = config(os.path.join(tmp, "pdef"), up_port, db_url=pg.url + "?options=-csearch_path%3Dhxdef")
            qcfg = config(os.path.join(tmp, "pfull"), up_port, db_url=pg.url + "?options=-csearch_path%3Dhxfull",
                          full=True, redis_url=redis.url)
            import psycopg2
            conn = psycopg2.connect(pg.url)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE SCHEMA hxdef; CREATE SCHEMA hxfull")
            conn.close()
            cli("migrate", "up", "--config", pcfg)
            cli("migrate", "up", "--config", qcfg)
            t["pg_default"] = gateway("pg_default", pcfg)
            t["pg_full"] = gateway("pg_full", qcfg, keyed(qcfg))
        procs += [x.proc for x in t.values()]
        for x in t.values():
            x.wait()
        log("all up:", ", ".join(t))

        # --- CPU per request at 16 connections, alternating rounds ---
        plan = [("bare", "bare", BODY), ("bare_h1", "bare_h1", BODY), ("default", "default", BODY), ("full", "full", MISS), ("hit", "full", HIT_BODY),
                ("bare_s20", "bare", S20), ("s20", "default", S20), ("bare_s200", "bare", S200), ("s200", "default", S200)]
        if not a.no_prod:
            plan += [("pg_default", "pg_default", BODY), ("pg_full", "pg_full", MISS), ("pg_hit", "pg_full", HIT_BODY)]
        res: dict[str, list[dict]] = {k: [] for k, _, _ in plan}
        res["direct"] = []
        for rnd in range(a.rounds):
            order = plan if rnd % 2 == 0 else list(reversed(plan))
            res["direct"].append(measure(direct, BODY, a.requests, a.warmup, a.conns, tmp, []))
            for key, tgt, body in order:
                n, w = a.requests, a.warmup
                if body is S20:
                    n, w = a.requests // 4, a.warmup // 4
                elif body is S200:
                    n, w = a.requests // 16, a.warmup // 16
                r = measure(t[tgt], body, n, w, a.conns, tmp, servers if tgt.startswith("pg_") else [])
                res[key].append(r)
                log(f"[{rnd + 1}] {key:11s} {r['cpu']:7.0f} µs/req  {r['rps']:6.0f} req/s  srv {r['srv_cpu']:.0f}  "
                    f"err {r['errors']}")

        # --- latency at concurrency 1 and streamed TTFB ---
        c1: dict[str, list[dict]] = {k: [] for k in ("direct", "bare", "default", "full", "pg_full")}
        tt: dict[str, list[float]] = {"direct": [], "bare": [], "default": []}
        for _rnd in range(a.rounds):
            for k in c1:
                if k == "pg_full" and a.no_prod:
                    continue
                tgt = direct if k == "direct" else t[k]
                # every stage: a cache miss each time, as in the CPU rows (the same body would be a hit
                # after the first request, and the row would time the cache, not the stages and the upstream)
                c1[k].append(with_bearer(tgt, lambda tgt=tgt: (hs.run_wrk(tgt.url, BODY, 300, 1, tmp),
                                                               hs.run_wrk(tgt.url, BODY, a.c1_requests, 1, tmp))[1],
                                         unique=k in ("full", "pg_full")))
            for k in tt:
                tt[k] += ttfb(direct if k == "direct" else t[k], S20, 330)
        log("c1:", {k: (med(v, "p50_ms"), med(v, "p99_ms")) for k, v in c1.items() if v})

        # --- memory ---
        rss_full = rss_mb(t["full"].proc.pid)
        rss_default = rss_mb(t["default"].proc.pid)
        sk = soak(t["soak"], a.soak_seconds, a.soak_segments, tmp)
        log("soak:", sk)

        # --- report ---
        cpu = {k: med(v, "cpu") for k, v in res.items() if v}
        srv = {k: med(v, "srv_cpu") for k, v in res.items() if v}
        rps = {k: med(v, "rps") for k, v in res.items() if v}
        ksys = {k: med(v, "sys") for k, v in res.items() if v}
        errs = {k: sum(r["errors"] for r in v) for k, v in res.items() if v}
        b = cpu["bare"]
        rows = []

        def row(label: str, k: str, target: float | None, note: str = "") -> None:
            ratio = cpu[k] / b
            tv = "–" if target is None else f"≤ {target:.1f}× {verdict(ratio <= target)}"
            rows.append(f"| {label} | {cpu[k]:.0f} | {ksys[k]:.0f} | {rps[k]:.0f} | {ratio:.2f}× | {tv} | {errs[k]} | "
                        f"{note} |")
        row("bare pass-through (uvicorn + raw ASGI + pyreqwest)", "bare", None)
        bh = cpu["bare_h1"]
        row("bare pass-through with HelixAgent's upstream client (h1) instead", "bare_h1", None,
            f"the stricter baseline: default {cpu['default'] / bh:.2f}×, every stage {cpu['full'] / bh:.2f}×, "
            f"hit {cpu['hit'] / bh:.2f}× against it")
        row("HelixAgent, default stages (SQLite records, metrics, access log)", "default", 1.4)
        row("HelixAgent, every stage (virtual key, 6 limits, cache miss, record, metrics, log)", "full", 1.6)
        row("HelixAgent, every stage, memory-cache hit", "hit", 1.0)
        if not a.no_prod:
            for k, lab, tg in (("pg_default", "production shape, default stages (records in PostgreSQL)", 1.4),
                               ("pg_full", "production shape, every stage (limits in Redis, records in PostgreSQL)", 1.6),
                               ("pg_hit", "production shape, every stage, memory-cache hit", 1.0)):
                row(lab, k, tg, f"+ Redis/PostgreSQL {srv[k]:.0f} µs/req ({(cpu[k] + srv[k]) / b:.2f}× with them)")
        slope_gw = (cpu["s200"] - cpu["s20"]) / (hs.LONG_STREAM_CHUNKS - hs.N_SSE_CHUNKS)
        slope_bare = (cpu["bare_s200"] - cpu["bare_s20"]) / (hs.LONG_STREAM_CHUNKS - hs.N_SSE_CHUNKS)
        per_chunk = slope_gw - slope_bare
        srows = [f"| bare relay, 20 chunks + [DONE] | {cpu['bare_s20']:.0f} | {rps['bare_s20']:.0f} | {errs['bare_s20']} |",
                 f"| HelixAgent, 20 chunks + [DONE] | {cpu['s20']:.0f} | {rps['s20']:.0f} | {errs['s20']} |",
                 f"| bare relay, 200 chunks + [DONE] | {cpu['bare_s200']:.0f} | {rps['bare_s200']:.0f} | "
                 f"{errs['bare_s200']} |",
                 f"| HelixAgent, 200 chunks + [DONE] | {cpu['s200']:.0f} | {rps['s200']:.0f} | {errs['s200']} |"]
        p50 = {k: med(v, "p50_ms") for k, v in c1.items() if v}
        p99 = {k: med(v, "p99_ms") for k, v in c1.items() if v}
        lrows = []
        for k, lab in (("direct", "upstream alone"), ("bare", "bare pass-through"), ("default", "HelixAgent, default"),
                       ("full", "HelixAgent, every stage, cache miss"), ("pg_full", "production shape, every stage, cache miss")):
            if k not in p50:
                continue
            add = p50[k] - p50["direct"]
            d99 = p99[k] - p99["bare"]
            gw = k not in ("direct", "bare")
            lrows.append(f"| {lab} | {p50[k]:.3f} | {p99[k]:.3f} | {add:.3f}"
                         f"{(' ≤ 0.3 ' + verdict(add <= 0.3)) if gw else ''} | "
                         f"{(f'{d99:+.3f} ≤ 0.5 ' + verdict(d99 <= 0.5)) if gw else '–'} |")
        tmed = {k: statistics.median(v) for k, v in tt.items()}
        t_add = tmed["default"] - tmed["direct"]
        curve = sk["curve"]
        after = [m for _, m in curve[1:]]
        drift = max(after) - min(after)
        lines = [
            f"## Performance (issue 16) — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
            f"- machine: nproc={os.cpu_count()}, {platform.machine()}, Python {platform.python_version()}; "
            f"gateways and the bare proxy pinned to CPU {GW_CPU}, wrk + upstream + Redis + PostgreSQL on the other",
            f"- wrk -t1 -c{a.conns}, {a.requests} requests per round after {a.warmup} warm-up (streams: ¼ and "
            f"1/16 of that), median of {a.rounds} alternating rounds; CPU = utime+stime of the server process "
            f"(/proc/<pid>/stat) during the measured phase / requests",
            f"- upstream pauses {a.stream_delay} s between SSE chunks, so chunks arrive one by one as from a model",
            f"- gateway: {compiled_note()}",
            "", "### CPU per request (16 connections)", "",
            "| path | CPU µs/req | of which kernel | req/s | vs bare | target | errors | notes |",
            "|---|---:|---:|---:|---:|---|---:|---|",
            f"| direct wrk → upstream | – | – | {rps['direct']:.0f} | – | – | {errs['direct']} | |", *rows, "",
            "- of which kernel: the system part (stime) of the CPU column. On loopback a write runs the receiver's "
            "TCP path and wakes it in the writer's time; how much a server pays for that depends on the state of "
            "the peers' core as well as on its code (README, \"Measured\", round 9).", "",
            "### Streaming", "", "| path | CPU µs/req | req/s | errors |", "|---|---:|---:|---:|", *srows, "",
            f"- per relayed chunk (slope 20 → 200 chunks): HelixAgent {slope_gw:.1f} µs, bare relay {slope_bare:.1f} µs; "
            f"added per chunk **{per_chunk:.1f} µs** (target ≤ 5) {verdict(per_chunk <= 5)}",
            f"- per chunk above the bare relay including the fixed per-request part: 20 chunks "
            f"{(cpu['s20'] - cpu['bare_s20']) / 21:.1f} µs, 200 chunks {(cpu['s200'] - cpu['bare_s200']) / 201:.1f} µs",
            f"- time to first event at concurrency 1 (median of {len(tt['default'])}): upstream {tmed['direct']:.3f} ms, "
            f"bare relay {tmed['bare']:.3f} ms, HelixAgent {tmed['default']:.3f} ms; added over the upstream "
            f"**{t_add:.3f} ms** (target ≤ 0.3) {verdict(t_add <= 0.3)}", "",
            f"### Latency at concurrency 1 (wrk -c1, {a.c1_requests} requests, median of {a.rounds} rounds)", "",
            "| path | p50 ms | p99 ms | p50 added over the upstream | p99 vs the bare proxy's |",
            "|---|---:|---:|---:|---:|", *lrows, "",
            "### Memory", "",
            f"- RSS after warm-up: every stage on **{rss_full:.1f} MB** (target ≤ 80) {verdict(rss_full <= 80)}; "
            f"default stages {rss_default:.1f} MB",
            f"- soak (scaled to this shared 2-core host: {sk['seconds']} s, {sk['requests']} requests instead of "
            f"1,000,000; every stage on; a repeating mix of 4 cache misses, 2 streams of 20 chunks, 2 cache hits, "
            f"1 rejected (unknown key, 401), 1 failed (upstream 500)): {sk['non2xx']} non-2xx answers "
            f"(expected ≈ 20%), {sk['sockerr']} socket errors",
            "- RSS curve (requests → MB): " + ", ".join(f"{n} → {m:.1f}" for n, m in curve),
            f"- drift after the first segment **{drift:.1f} MB** (target ≤ 5) {verdict(drift <= 5)}", ""]
        text = "\n".join(lines)
        print(text)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        return 0
    finally:
        for p in reversed(procs):
            err = hs.stop(p)
            if p is not up and "Traceback" in err:
                print(err[-3000:], file=sys.stderr)
        if redis is not None:
            redis.close()
        if pg is not None:
            pg.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
