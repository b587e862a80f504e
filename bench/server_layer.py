#!/usr/bin/env python
"""The HTTP server layer's own CPU per request, side by side in one run (no upstream, no gateway logic):

  uvicorn      uvicorn's httptools protocol + a raw ASGI app answering a canned JSON body (the bare proxy's server)
  helixagent   HelixAgent's protocol (api/protocol.py) under uvicorn's Server, the same raw ASGI app
  floor        a bare httptools asyncio.Protocol writing the canned answer itself (no ASGI at all)

    python bench/server_layer.py [--rounds 5] [--requests 30000]

Each server is pinned to core 0, wrk (16 connections) to core 1; CPU = utime+stime of the server process
during the measured phase / requests; the median of alternating rounds is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import http_stack as hs  # noqa: E402
import perf_bench as pb  # noqa: E402

RESP = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",' \
       b'"content":"TCP is connection-oriented and reliable; UDP is connectionless and fast."},' \
       b'"finish_reason":"stop"}],"usage":{"prompt_tokens":40,"completion_tokens":20,"total_tokens":60}}'

APP = r'''
import sys
RESP = %r
H = [(b"content-type", b"application/json"), (b"content-length", str(len(RESP)).encode()),
     (b"x-request-id", b"0123456789abcdef"), (b"x-helixagent-provider", b"openai"), (b"x-a", b"1"), (b"x-b", b"2")]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": H})
    await send({"type": "http.response.body", "body": RESP})
''' % RESP

UVICORN = APP + r'''
import uvicorn
uvicorn.run(app, port=int(sys.argv[1]), log_level="error", access_log=False, loop="uvloop", http="httptools",
            server_header=False, date_header=False)
'''

HELIX = APP + r'''
import uvicorn
from helixagent.api.server import uvicorn_config
from helixagent.config import load_config_dict
cfg = uvicorn_config(app, load_config_dict({}).server, port=int(sys.argv[1]), log_level="error", access_log=False,
                     loop="uvloop", server_header=False, date_header=False, lifespan="off")
uvicorn.Server(cfg).run()
'''

FLOOR = r'''
import asyncio, sys
import httptools, uvloop
RESP = %r
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %%d\r\nx-request-id: 0123456789abcdef\r\n"
        b"x-helixagent-provider: openai\r\nx-a: 1\r\nx-b: 2\r\n\r\n" %% len(RESP))
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.p = httptools.HttpRequestParser(self)
    def data_received(self, d):
        self.p.feed_data(d)
    def on_message_begin(self):
        self.body, self.hdrs = [], []
    def on_url(self, u):
        self.url = u
    def on_header(self, n, v):
        self.hdrs.append((n.lower(), v))
    def on_body(self, b):
        self.body.append(b)
    def on_message_complete(self):
        asyncio.get_running_loop().create_task(self.answer(b"".join(self.body)))
    async def answer(self, body):
        self.t.write(HEAD + RESP)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
uvloop.run(main())
''' % RESP


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=30000)
    a = ap.parse_args()
    pb.split_cores()
    tmp = tempfile.mkdtemp(prefix="helixsrv-")
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(HERE), "src")}
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name, code in (("uvicorn", UVICORN), ("helixagent", HELIX), ("floor", FLOOR)):
            port = hs.free_port()
            path = os.path.join(tmp, f"srv_{name}.py")
            with open(path, "w") as f:
                f.write(code)
            p = subprocess.Popen(pb.pinned([pb.PY, path, str(port)]), env=env)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            t = pb.Target(name, p, port)
            t.wait()
            servers[name] = (p, url)
        res: dict[str, list[float]] = {k: [] for k in servers}
        names = list(servers)
        for rnd in range(a.rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                p, url = servers[name]
                hs.run_wrk(url, hs.REQUEST_BODY, 2000, 16, tmp)
                c0 = hs.tree_cpu_seconds(p.pid)
                r = hs.run_wrk(url, hs.REQUEST_BODY, a.requests, 16, tmp)
                c1 = hs.tree_cpu_seconds(p.pid)
                res[name].append((c1 - c0) / r["requests"] * 1e6)
                print(f"[{rnd + 1}] {name:10s} {res[name][-1]:6.1f} µs/req  {r['rps']:7.0f} req/s  err {r['errors']}",
                      file=sys.stderr, flush=True)
        print("| server | CPU µs/req (median) | min |")
        print("|---|---:|---:|")
        for name in names:
            print(f"| {name} | {statistics.median(res[name]):.1f} | {min(res[name]):.1f} |")
    finally:
        for p, _ in servers.values():
            p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
