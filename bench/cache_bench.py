#!/usr/bin/env python3
"""HelixAgent response-cache benchmark: gateway CPU per cache-hit request vs per pass-through request.

One run, side by side, the real gateway (``python -m helixagent serve``: uvicorn + uvloop + httptools,
the full pipeline) in front of the fake upstream of ``bench/http_stack.py`` (raw uvloop protocol,
canned ~660 B chat.completion / 20-chunk SSE):

  gateway A: ``cache.enabled: true`` (memory backend)
     * hit          -- temperature 0, the entry is warm: answered from memory, no upstream call
     * pass-through -- temperature 0.2: not cacheable (BYPASS), goes upstream
     * stream hit   -- the same cached entry replayed as SSE
     * stream pass-through -- temperature 0.2, streamed (20 chunks, upstream sleeps 2 ms between them)
  gateway B: no cache section (the stage is not installed) -- pass-through, for the stage's own overhead

For each variant: wrk (1 thread, C connections) sends N requests after a warm-up; the gateway process
tree's CPU (utime+stime from /proc) during the measured phase is divided by the completed requests.
Rounds alternate the variant order; figures are medians over rounds.  Everything shares the machine's
cores, so CPU µs/request is the figure to compare, not req/s.

Usage:  /work/venv/bin/python bench/cache_bench.py [--requests 5000] [--rounds 2] [--conns 16]
Writes bench/results/cache_bench.md (and prints it).  Needs wrk (apt-get install wrk).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time

import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import http_stack as hs  # noqa: E402  (the upstream, wrk driver and /proc CPU accounting)

PY = sys.executable

HIT_OBJ = {**hs.REQUEST_OBJ, "temperature": 0}
PASS_OBJ = {**hs.REQUEST_OBJ, "temperature": 0.2}
VARIANTS = {
    # name: (gateway, body, streamed)
    "cache hit (memory)": ("cache", orjson.dumps(HIT_OBJ), False),
    "pass-through, cache enabled (BYPASS)": ("cache", orjson.dumps(PASS_OBJ), False),
    "pass-through, cache not installed": ("plain", orjson.dumps(PASS_OBJ), False),
    "stream: cache hit (memory, SSE replay)": ("cache", orjson.dumps({**HIT_OBJ, "stream": True}), True),
    "stream: pass-through (BYPASS)": ("cache", orjson.dumps({**PASS_OBJ, "stream": True}), True),
}


def write_config(path: str, up_port: int, cache: bool) -> None:
    tmp = os.path.dirname(path)
    name = os.path.splitext(os.path.basename(path))[0]
    cfg = {
        "logging": {"level": "warning"},
        # every request is recorded (the production default), into a throw-away SQLite file
        "database": {"url": f"sqlite:///{tmp}/{name}.db", "spool_dir": f"{tmp}/{name}-spool",
                     "auto_migrate": True},
        "providers": [{"name": "openai", "type": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1",
                       "api_key": "sk-upstream-test", "models": ["gpt-4o-mini"]}],
    }
    if cache:
        cfg["cache"] = {"enabled": True, "type": "memory", "ttl": "1h", "max_size": 10000}
    with open(path, "w") as f:
        f.write(orjson.dumps(cfg).decode())  # JSON is YAML


def start_gateway(cfg_path: str, port: int) -> object:
    env = {"PYTHONPATH": os.path.join(ROOT, "src"), "HELIXAGENT_API_KEY": ""}
    return hs.start([PY, "-m", "helixagent", "serve", "--config", cfg_path, "--port", str(port)], env)


def stage_microbench(n: int = 20000) -> list[str]:
    """In-process: CPU of the cache stage alone (no HTTP, no rendering), per request."""
    import asyncio
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from helixagent.api.openai_format import parse_chat
    from helixagent.app import create_app
    from helixagent.cache import cache_key
    from helixagent.config import load_config_dict
    from helixagent.pipeline import RequestContext

    gw = create_app(load_config_dict({"database": {"url": "sqlite:///:memory:"},
                                      "providers": [{"name": "openai", "type": "openai", "api_key": "sk-x",
                                                     "base_url": "http://127.0.0.1:1/v1",
                                                     "models": ["gpt-4o-mini"]}],
                                      "cache": {"enabled": True}}))
    stage = next(s for s in gw.chat_pipeline.stages if s.name == "cache")
    svc = gw.services["cache"]
    hit_raw, pass_raw = orjson.dumps(HIT_OBJ), orjson.dumps(PASS_OBJ)

    async def run() -> dict[str, float]:
        from helixagent.canonical import ChatResponse, Usage
        req, helix = parse_chat(hit_raw, gw.providers)
        key = cache_key(req, "", "openai", "gpt-4o-mini")
        from helixagent.cache.service import encode
        svc.backend.set_now(key, encode(ChatResponse(dict(hs.RESPONSE_OBJ), Usage(41, 62, 103), "openai"),
                                        "openai", "gpt-4o-mini"), 3600)
        out = {}
        for name, raw in (("parse only (baseline)", None), ("stage pre: HIT", hit_raw),
                          ("stage pre: BYPASS", pass_raw)):
            t0 = time.process_time()
            for _ in range(n):
                ctx = RequestContext("chat")
                ctx.request, ctx.state["helix"] = parse_chat(raw or hit_raw, gw.providers)
                if raw is not None:
                    await stage.pre(ctx)
            out[name] = (time.process_time() - t0) / n * 1e6
        t0 = time.process_time()
        for _ in range(n):
            cache_key(req, "", "openai", "gpt-4o-mini")
        out["cache_key() alone"] = (time.process_time() - t0) / n * 1e6
        return out

    r = asyncio.run(run())
    base = r.pop("parse only (baseline)")
    rows = ["", f"In-process cache stage cost ({n} iterations, request parse subtracted; µs CPU per request):", "",
            "| operation | µs/req |", "|---|---:|"]
    for k, v in r.items():
        rows.append(f"| {k} | {v - (base if k.startswith('stage') else 0):.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--stream-requests", type=int, default=800)
    ap.add_argument("--warm", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cache_bench.md"))
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="helix-cache-bench-")
    up_port = hs.free_port()
    up = hs.start([PY, os.path.join(HERE, "http_stack.py"), "_upstream", str(up_port)])
    gws: dict[str, tuple[object, int]] = {}
    try:
        for name, cache in (("cache", True), ("plain", False)):
            cfg_path = os.path.join(tmp, f"{name}.yaml")
            write_config(cfg_path, up_port, cache)
            port = hs.free_port()
            gws[name] = (start_gateway(cfg_path, port), port)
        for _name, (p, port) in gws.items():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            hs.wait_ready(url, p)  # type: ignore[arg-type]
        # correctness first: the hit really is a hit, the pass-through really is not
        for vname, (gname, body, streamed) in VARIANTS.items():
            url = f"http://127.0.0.1:{gws[gname][1]}/v1/chat/completions"
            import urllib.request
            for _ in range(2):
                req = urllib.request.Request(url, data=body, method="POST",
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    status = r.headers.get("x-helixagent-cache")
                    payload = r.read()
            want = {"cache hit (memory)": "HIT", "stream: cache hit (memory, SSE replay)": "HIT",
                    "pass-through, cache not installed": None}.get(vname, "BYPASS")
            assert status == want, (vname, status)
            assert (b"data: [DONE]" in payload) if streamed else orjson.loads(payload)["choices"]
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        order = list(VARIANTS)
        for rnd in range(args.rounds):
            for vname in (order if rnd % 2 == 0 else order[::-1]):
                gname, body, streamed = VARIANTS[vname]
                p, port = gws[gname]
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                n = args.stream_requests if streamed else args.requests
                r = hs.measure(url, p.pid, up.pid, body, n, min(args.warm, n // 2), args.conns, tmp)  # type: ignore[attr-defined]
                results[vname].append(r)
                print(f"round {rnd + 1} {vname:45s} gw CPU {r['gw_cpu_us']:7.1f} µs/req  "
                      f"upstream CPU {r['up_cpu_us']:6.1f} µs/req  {r['rps']:7.0f} req/s  errors {r['errors']}",
                      flush=True)
    finally:
        for p, _ in gws.values():
            hs.stop(p)  # type: ignore[arg-type]
        hs.stop(up)

    def med(v: str, k: str) -> float:
        return statistics.median(x[k] for x in results[v])

    hit = med("cache hit (memory)", "gw_cpu_us")
    lines = [
        f"## Cache benchmark — {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
        "",
        f"- machine: nproc={os.cpu_count()}, {platform.machine()}, Python {platform.python_version()}",
        f"- gateway: `python -m helixagent serve` (uvicorn+uvloop+httptools, full pipeline), 1 process; "
        f"upstream: bench/http_stack.py fake; load: wrk -t1 -c{args.conns}, {args.requests} requests "
        f"({args.stream_requests} streamed) after warm-up, {args.rounds} rounds, medians",
        "- gw CPU = utime+stime of the gateway process during the measured phase ÷ completed requests",
        "",
        "| variant | gw CPU µs/req | per-round | vs cache hit | upstream CPU µs/req | req/s | p50 ms | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        g = med(v, "gw_cpu_us")
        lines.append(f"| {v} | **{g:.0f}** | {' / '.join('%.0f' % x['gw_cpu_us'] for x in results[v])} | "
                     f"{g / hit:.2f}× | {med(v, 'up_cpu_us'):.0f} | {med(v, 'rps'):.0f} | {med(v, 'p50_ms'):.2f} | "
                     f"{sum(x['errors'] for x in results[v])} |")
    lines += stage_microbench()
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# HelixAgent response-cache benchmark\n\nGenerated by `bench/cache_bench.py`.\n\n" + text)


if __name__ == "__main__":
    main()
