#!/usr/bin/env python3
"""HelixAgent hot-path stack benchmark (self-contained).

Measures, side by side in ONE run, the CPU cost per request of an OpenAI-compatible
pass-through gateway built from different (server x upstream-client) combinations:

  servers : uvicorn (uvloop+httptools, raw ASGI) | granian ASGI | granian RSGI | aiohttp.web
  clients : aiohttp.ClientSession | pyreqwest async Client | httpx.AsyncClient (once)
  JSON    : orjson everywhere

Topology (all on 127.0.0.1, each piece in its own process):

  wrk (load generator, C, 1 thread, N conns) -> gateway (1 process, 1 loop) -> fake upstream
  (raw uvloop + httptools protocol, canned ~600 B chat.completion, keep-alive)

For each variant the gateway process tree's CPU (utime+stime from /proc/<pid>/stat, summed over
the process tree -- granian forks a worker -- and all threads, which /proc/<pid>/stat already
aggregates) is sampled before/after the measured phase and divided by completed requests.

Usage:
  /work/venv/bin/python bench/http_stack.py                 # full run, writes results/http_stack.md
  /work/venv/bin/python bench/http_stack.py --rounds 2 --requests 5000 --append
Internal sub-commands (used by the orchestrator): _upstream PORT, _aiohttp_server PORT.
Gateway processes read HB_CLIENT (aiohttp|pyreqwest|httpx) and HB_UPSTREAM from the environment.
Requires: wrk (apt-get install -y wrk), uvloop, httptools, orjson, uvicorn, granian, aiohttp,
pyreqwest, httpx.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------
REQUEST_OBJ = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are HelixAgent, a concise and helpful assistant."},
        {"role": "user", "content": "Summarise the difference between TCP and UDP in two sentences, "
                                    "and give one typical use case for each protocol."},
    ],
    "temperature": 0.2,
    "max_tokens": 256,
    "user": "bench-user-42",
}
REQUEST_BODY = orjson.dumps(REQUEST_OBJ)
STREAM_REQUEST_BODY = orjson.dumps({**REQUEST_OBJ, "stream": True})

RESPONSE_OBJ = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "TCP is connection-oriented and reliable; UDP is connectionless and best-effort. "
                       "Use TCP for web traffic, UDP for real-time voice.",
            "refusal": None,
            "annotations": [],
        },
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {
        "prompt_tokens": 41, "completion_tokens": 62, "total_tokens": 103,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}
RESPONSE_BODY = orjson.dumps(RESPONSE_OBJ)

N_SSE_CHUNKS = 20  # content chunks; a final "data: [DONE]" event follows
# A streamed request whose max_tokens is exactly LONG_STREAM_MAX_TOKENS gets LONG_STREAM_CHUNKS chunks instead
# (bench/perf_bench.py measures the per-chunk cost from the difference of 20 and 200 chunks).
LONG_STREAM_MAX_TOKENS = 200
LONG_STREAM_CHUNKS = 200


def sse_events(n: int = N_SSE_CHUNKS) -> list[bytes]:
    out = []
    for i in range(n):
        ev = {"id": "chatcmpl-stream-1", "object": "chat.completion.chunk", "created": 1741570283,
              "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_06737a9306",
              "choices": [{"index": 0, "delta": {"content": f" token{i}"}, "logprobs": None,
                           "finish_reason": "stop" if i == n - 1 else None}]}
        out.append(b"data: " + orjson.dumps(ev) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


# --------------------------------------------------------------------------------------------
# Fake upstream: raw uvloop + httptools protocol (cheap, so it never is the bottleneck)
#   POST /v1/chat/completions          -> canned JSON (or SSE if body has "stream":true)
#   /reset  -> RST the connection     /hang -> never answer    /truncate -> short body + close
# --------------------------------------------------------------------------------------------
def run_upstream(port: int) -> None:
    import httptools
    import uvloop

    stream_delay = float(os.environ.get("HB_STREAM_DELAY", "0.002"))
    json_resp = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\nconnection: keep-alive\r\n\r\n" % len(RESPONSE_BODY)) + RESPONSE_BODY
    sse_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
    sse_chunks = [b"%x\r\n" % len(e) + e + b"\r\n" for e in sse_events()]
    long_chunks = [b"%x\r\n" % len(e) + e + b"\r\n" for e in sse_events(LONG_STREAM_CHUNKS)]
    long_marker = b'"max_tokens":%d' % LONG_STREAM_MAX_TOKENS
    fail_body = b'{"error":{"message":"upstream failure","type":"server_error"}}'
    fail_resp = (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\nconnection: keep-alive\r\n\r\n" % len(fail_body)) + fail_body

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""
            self.body = []

        def data_received(self, data):
            try:
                self.parser.feed_data(data)
            except Exception:  # noqa: BLE001 - bench server: a request it cannot parse closes the connection
                self.t.close()

        def on_message_begin(self):
            self.url = b""
            self.body = []

        def on_url(self, url):
            self.url += url

        def on_body(self, b):
            self.body.append(b)

        def on_message_complete(self):
            body = b"".join(self.body)
            url = self.url
            if url == b"/reset":
                sock = self.t.get_extra_info("socket")
                import struct
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.t.abort()
                return
            if url == b"/hang":
                return
            if url == b"/truncate":
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n{\"partial\":")
                self.t.close()
                return
            if url.startswith(b"/fail/"):
                self.t.write(fail_resp)
                return
            if b'"stream":true' in body:
                chunks = long_chunks if long_marker in body else sse_chunks
                asyncio.get_running_loop().create_task(self.stream(chunks))
            else:
                self.t.write(json_resp)

        async def stream(self, chunks):
            self.t.write(sse_head)
            for c in chunks:
                if stream_delay:
                    await asyncio.sleep(stream_delay)
                if self.t.is_closing():
                    return
                self.t.write(c)
            self.t.write(b"0\r\n\r\n")

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Proto, "127.0.0.1", port, backlog=1024, reuse_address=True)
        await srv.serve_forever()

    uvloop.run(main())


# --------------------------------------------------------------------------------------------
# Upstream clients (one pooled instance per gateway process, created lazily inside the loop)
# --------------------------------------------------------------------------------------------
UP_URL = os.environ.get("HB_UPSTREAM", "http://127.0.0.1:1/v1/chat/completions")
FWD_HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-upstream-test"}


class AiohttpUpstream:
    def __init__(self):
        import aiohttp
        self.s = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=60.0,
                                           ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=60, connect=5, sock_read=30),
            auto_decompress=False,
        )

    async def post(self, body: bytes):
        async with self.s.post(UP_URL, data=body, headers=FWD_HEADERS) as r:
            return r.status, await r.read()

    async def stream(self, body: bytes):
        async with self.s.post(UP_URL, data=body, headers=FWD_HEADERS) as r:
            async for chunk in r.content.iter_any():
                yield chunk


class PyreqwestUpstream:
    def __init__(self):
        from datetime import timedelta
        from pyreqwest.client import ClientBuilder
        self.c = (ClientBuilder()
                  .max_connections(256)                       # max in-flight requests (None = unlimited)
                  .pool_max_idle_per_host(256)
                  .pool_idle_timeout(timedelta(seconds=60))
                  .connect_timeout(timedelta(seconds=5))
                  .timeout(timedelta(seconds=60))            # total deadline incl. body
                  .read_timeout(timedelta(seconds=30))       # per-read (stall) timeout
                  .gzip(False).brotli(False).zstd(False).deflate(False)
                  .build())

    async def post(self, body: bytes):
        r = await self.c.post(UP_URL).headers(FWD_HEADERS).body_bytes(body).build().send()
        # r.bytes() returns pyreqwest.bytes.Bytes (buffer protocol); orjson needs memoryview()
        return r.status, memoryview(await r.bytes())

    async def stream(self, body: bytes):
        # PITFALL: default streamed_read_buffer_limit is 64 KiB and `async with` only returns once that much
        # is buffered or the body ended -> SSE would be delivered all at once. 0 = hand chunks over as they come.
        async with (self.c.post(UP_URL).headers(FWD_HEADERS).body_bytes(body)
                    .streamed_read_buffer_limit(0).build_streamed()) as r:
            reader = r.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                yield bytes(chunk)


class HttpxUpstream:
    def __init__(self):
        import httpx
        self.c = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256, keepalive_expiry=60),
            timeout=httpx.Timeout(60.0, connect=5.0))

    async def post(self, body: bytes):
        r = await self.c.post(UP_URL, content=body, headers=FWD_HEADERS)
        return r.status_code, r.content

    async def stream(self, body: bytes):
        async with self.c.stream("POST", UP_URL, content=body, headers=FWD_HEADERS) as r:
            async for chunk in r.aiter_raw():
                yield chunk


class H1Upstream:
    """HelixAgent's own client (src/helixagent/providers/h1.py: asyncio protocols + httptools)."""

    def __init__(self):
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
        from helixagent.providers import h1
        self.h1 = h1
        self.pool = h1.Pool(5.0, 256, 60.0)

    async def post(self, body: bytes):
        ex = await self.pool.open("POST", UP_URL, FWD_HEADERS, body, 30.0, 60.0)
        return ex.status, await self.h1.read_all(ex)

    async def stream(self, body: bytes):
        ex = await self.pool.open("POST", UP_URL, FWD_HEADERS, body, 30.0, None)
        async for chunk in self.h1.iter_chunks(ex):
            yield chunk


CLIENTS = {"aiohttp": AiohttpUpstream, "pyreqwest": PyreqwestUpstream, "httpx": HttpxUpstream, "h1": H1Upstream}
# HB_SPIN_US: burn this much Python CPU per request in the bare proxy, standing in for a gateway's stages (the
# upstream client's cost depends on how busy the event loop's thread is: README, "Hot-path dependencies")
SPIN = float(os.environ.get("HB_SPIN_US", "0")) / 1e6
_UP = None


def upstream():
    global _UP
    if _UP is None:
        _UP = CLIENTS[os.environ.get("HB_CLIENT", "aiohttp")]()
    return _UP


BAD_REQUEST = b'{"error":{"message":"model is required","type":"invalid_request_error"}}'


async def gateway_logic(body):
    """Returns (status, bytes) or (200, async-iterator) for streaming."""
    req = orjson.loads(body)
    if SPIN:
        until = time.perf_counter() + SPIN
        while time.perf_counter() < until:
            pass
    model = req.get("model")
    if not model:
        return 400, BAD_REQUEST, False
    out = orjson.dumps(req)
    if req.get("stream"):
        return 200, upstream().stream(out), True
    status, data = await upstream().post(out)
    resp = orjson.loads(data)
    resp["provider"] = "openai"
    return status, orjson.dumps(resp), False


# ---------------- raw ASGI app (uvicorn / granian asgi) ----------------
async def asgi_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    msg = await receive()
    body = msg.get("body", b"")
    if msg.get("more_body"):
        parts = [body]
        while msg.get("more_body"):
            msg = await receive()
            parts.append(msg.get("body", b""))
        body = b"".join(parts)
    status, out, streaming = await gateway_logic(body)
    if not streaming:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    async for chunk in out:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---------------- RSGI app (granian rsgi) ----------------
class RSGIApp:
    async def __rsgi__(self, scope, proto):
        body = await proto()
        status, out, streaming = await gateway_logic(body)
        if not streaming:
            proto.response_bytes(status, [("content-type", "application/json")], out)
            return
        tr = proto.response_stream(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")])
        async for chunk in out:
            await tr.send_bytes(chunk)


rsgi_app = RSGIApp()


# ---------------- aiohttp.web server ----------------
def run_aiohttp_server(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def handler(request: web.Request):
        body = await request.read()
        status, out, streaming = await gateway_logic(body)
        if not streaming:
            return web.Response(status=status, body=out, content_type="application/json")
        resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream",
                                                       "cache-control": "no-cache"})
        await resp.prepare(request)
        async for chunk in out:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def main():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await asyncio.Event().wait()

    uvloop.run(main())


# --------------------------------------------------------------------------------------------
# Orchestrator helpers
# --------------------------------------------------------------------------------------------
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_stat(pid, kernel_only=False):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # ppid, utime+stime (all threads) -- or stime alone, the kernel's part
    return int(rest[1]), int(rest[12]) + (0 if kernel_only else int(rest[11]))


def tree_cpu_seconds(root: int, kernel_only: bool = False) -> float:
    """CPU seconds of ``root`` and its descendants, all threads (``kernel_only``: the system part)."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _read_stat(int(d), kernel_only)
            if st:
                stats[int(d)] = st
    total, todo, seen = 0, [root], set()
    while todo:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        total += stats[p][1]
        todo.extend(c for c, (pp, _) in stats.items() if pp == p)
    return total / CLK


def tree_size(root: int) -> tuple[int, int]:
    """(#processes, #threads) in tree."""
    procs = [root]
    allp = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _read_stat(int(d))
            if st:
                allp[int(d)] = st[0]
    i = 0
    while i < len(procs):
        procs.extend(c for c, pp in allp.items() if pp == procs[i])
        i += 1
    threads = sum(len(os.listdir(f"/proc/{p}/task")) for p in procs if os.path.exists(f"/proc/{p}/task"))
    return len(procs), threads


def start(cmd, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    errf = tempfile.TemporaryFile()  # file, not a pipe: a chatty child can never block on a full pipe
    p = subprocess.Popen(cmd, env=env, cwd=HERE, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=errf)
    p.errf = errf
    return p


def stop(p: subprocess.Popen) -> str:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(8)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    p.errf.seek(0)
    return p.errf.read().decode(errors="replace")


def post(url, body, timeout=5.0):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.headers.get("content-type"), r.read()


def wait_ready(url: str, p: subprocess.Popen, stream=False, deadline=20.0):
    t0 = time.time()
    last = None
    while time.time() - t0 < deadline:
        if p.poll() is not None:
            p.errf.seek(0)
            raise RuntimeError(f"process exited rc={p.returncode}: {p.errf.read().decode()[-2000:]}")
        try:
            st, ct, body = post(url, STREAM_REQUEST_BODY if stream else REQUEST_BODY)
            return st, ct, body
        except Exception as e:  # noqa: BLE001
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"not ready: {last}")


WRK_LUA = r"""
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-client-test"
local limit = %(limit)d
local count = 0
local bad = 0
function response(status, headers, body)
  count = count + 1
  if status ~= 200 then bad = bad + 1 end
  if count == limit then
    wrk.thread:stop()
    -- wake wrk's main thread (it sleeps for the whole -d otherwise). Backgrounded + delayed because
    -- system() ignores SIGINT in the caller while the shell runs.
    os.execute("(sleep 0.02; kill -INT $PPID) &")
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%.0f %%.0f %%.0f %%d %%d %%d\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write, e.status, e.timeout))
end
"""


def run_wrk(url: str, body: bytes, n: int, conns: int, tmpdir: str) -> dict:
    script = os.path.join(tmpdir, f"wrk_{n}_{len(body)}.lua")
    with open(script, "w") as f:
        f.write(WRK_LUA % {"body": body.decode(), "limit": n})
    cmd = ["wrk", "-t1", f"-c{conns}", "-d120s", "--timeout", "10s", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise RuntimeError("wrk output not parsed:\n" + out)
    reqs, dur_us, p50, p99, mx, sockerr, status_err, tmo = map(int, m.groups())
    dur = max(dur_us / 1e6 - 0.02, 1e-3)  # minus the 20 ms stop delay of the lua script
    return {"requests": reqs, "duration_s": dur, "rps": reqs / dur,
            "p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "max_ms": mx / 1000,
            "errors": sockerr + status_err + tmo}


def measure(url, gw_pid, up_pid, body, n, warm, conns, tmpdir) -> dict:
    run_wrk(url, body, warm, conns, tmpdir)
    time.sleep(0.3)
    g0 = tree_cpu_seconds(gw_pid) if gw_pid else 0.0
    u0 = tree_cpu_seconds(up_pid)
    r = run_wrk(url, body, n, conns, tmpdir)
    g1 = tree_cpu_seconds(gw_pid) if gw_pid else 0.0
    u1 = tree_cpu_seconds(up_pid)
    r["gw_cpu_us"] = (g1 - g0) / r["requests"] * 1e6 if gw_pid else 0.0
    r["up_cpu_us"] = (u1 - u0) / r["requests"] * 1e6
    r["gw_cpu_util"] = (g1 - g0) / r["duration_s"] if gw_pid else 0.0
    return r


SERVERS = ["uvicorn", "granian-asgi", "granian-rsgi", "aiohttp.web"]


def gateway_cmd(server: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [PY, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
                "--http", "httptools", "--no-access-log", "--log-level", "warning", "--workers", "1",
                "--backlog", "1024", "http_stack:asgi_app"]
    if server.startswith("granian"):
        iface = server.split("-")[1]
        return [PY, "-m", "granian", "--interface", iface, "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1", "--runtime-threads", "1", "--loop", "uvloop", "--no-access-log",
                "--log-level", "warning", "--backlog", "1024", "--working-dir", HERE,
                f"http_stack:{iface}_app"]
    if server == "aiohttp.web":
        return [PY, os.path.abspath(__file__), "_aiohttp_server", str(port)]
    raise ValueError(server)


# --------------------------------------------------------------------------------------------
# Streaming verification (chunk-by-chunk) with timestamps
# --------------------------------------------------------------------------------------------
async def verify_stream(url: str) -> dict:
    import aiohttp
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        times, data = [], b""
        async with s.post(url, data=STREAM_REQUEST_BODY, headers={"content-type": "application/json"}) as r:
            ct = r.headers.get("content-type")
            async for chunk in r.content.iter_any():
                times.append(time.perf_counter() - t0)
                data += chunk
        events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
        ok = (len(events) == N_SSE_CHUNKS + 1 and events[-1] == b"data: [DONE]"
              and all(orjson.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1]))
        return {"ok": ok, "events": len(events), "reads": len(times), "content_type": ct,
                "ttfb_ms": times[0] * 1000 if times else None, "total_ms": times[-1] * 1000 if times else None}


# --------------------------------------------------------------------------------------------
# Error-mapping probe: what each client raises for reset / truncated body / refused / timeout
# --------------------------------------------------------------------------------------------
async def probe_errors(base: str) -> dict:
    from datetime import timedelta

    import aiohttp
    import httpx
    from pyreqwest.client import ClientBuilder

    refused = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    cases = {"reset": base + "/reset", "truncated": base + "/truncate", "refused": refused,
             "read-timeout(0.5s)": base + "/hang"}
    out: dict = {}

    def name(e):
        mro = [c.__name__ for c in type(e).__mro__ if c.__name__ not in ("object", "BaseException")]
        return f"{type(e).__module__}.{type(e).__name__} (mro: {' > '.join(mro[1:5])}) : {str(e)[:90]!r}"

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10, connect=2, sock_read=0.5)) as s:
        for k, u in cases.items():
            try:
                async with s.post(u, data=REQUEST_BODY, headers=FWD_HEADERS) as r:
                    await r.read()
                out[("aiohttp", k)] = "no error"
            except Exception as e:  # noqa: BLE001
                out[("aiohttp", k)] = name(e)
    c = (ClientBuilder().connect_timeout(timedelta(seconds=2)).read_timeout(timedelta(milliseconds=500))
         .timeout(timedelta(seconds=10)).build())
    async with c:
        for k, u in cases.items():
            try:
                r = await c.post(u).headers(FWD_HEADERS).body_bytes(REQUEST_BODY).build().send()
                await r.bytes()
                out[("pyreqwest", k)] = "no error"
            except Exception as e:  # noqa: BLE001
                out[("pyreqwest", k)] = name(e)
        # per-request total timeout variant
        try:
            await (c.post(base + "/hang").body_bytes(REQUEST_BODY).timeout(timedelta(milliseconds=300))
                   .build().send())
        except Exception as e:  # noqa: BLE001
            out[("pyreqwest", "request .timeout(0.3s)")] = name(e)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0, read=0.5)) as hc:
        for k, u in cases.items():
            try:
                r = await hc.post(u, content=REQUEST_BODY, headers=FWD_HEADERS)
                out[("httpx", k)] = "no error"
            except Exception as e:  # noqa: BLE001
                out[("httpx", k)] = name(e)
    return out


# --------------------------------------------------------------------------------------------
# Main orchestration
# --------------------------------------------------------------------------------------------
def fmt_table(rows: list[dict], direct: dict) -> str:
    best = min(r["gw_cpu_us"] for r in rows)
    hdr = ("| variant | gw CPU µs/req (median) | per-round | × best | req/s | % of direct req/s "
           "| p50 ms | p99 ms | upstream CPU µs/req | errors |\n"
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| **direct** wrk→upstream | – | – | – | {direct['rps']:.0f} | 100% | {direct['p50_ms']:.2f} "
             f"| {direct['p99_ms']:.2f} | {direct['up_cpu_us']:.0f} | {direct['errors']} |"]
    for r in sorted(rows, key=lambda r: r["gw_cpu_us"]):
        lines.append(
            f"| {r['name']} | **{r['gw_cpu_us']:.0f}** | {' / '.join(f'{x:.0f}' for x in r['rounds_cpu'])} "
            f"| {r['gw_cpu_us'] / best:.2f} | {r['rps']:.0f} | {100 * r['rps'] / direct['rps']:.0f}% "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['up_cpu_us']:.0f} | {r['errors']} |")
    return hdr + "\n".join(lines) + "\n"


def agg(results: list[dict]) -> dict:
    med = lambda k: statistics.median(x[k] for x in results)  # noqa: E731
    return {"gw_cpu_us": med("gw_cpu_us"), "up_cpu_us": med("up_cpu_us"), "rps": med("rps"),
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "errors": sum(x["errors"] for x in results),
            "rounds_cpu": [x["gw_cpu_us"] for x in results]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="full passes over all variants (order alternates)")
    ap.add_argument("--stream-requests", type=int, default=800)
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--clients", default="aiohttp,pyreqwest")
    ap.add_argument("--httpx-server", default="uvicorn", help="server used for the single httpx variant ('' = skip)")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--no-errors", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "http_stack.md"))
    ap.add_argument("--append", action="store_true", help="append this run to --out instead of overwriting")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found (apt-get install -y wrk)")

    variants = [(s, c) for s in a.servers.split(",") for c in a.clients.split(",")]
    if a.httpx_server:
        variants.append((a.httpx_server, "httpx"))

    tmpdir = tempfile.mkdtemp(prefix="hb_")
    up_port = free_port()
    up = start([PY, os.path.abspath(__file__), "_upstream", str(up_port)])
    up_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
    up_base = f"http://127.0.0.1:{up_port}"
    log = lambda *x: print(*x, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {v: [] for v in variants}
    directs = []
    stream_rows = []
    notes = []
    try:
        st, ct, body = wait_ready(up_url, up)
        assert st == 200 and orjson.loads(body)["object"] == "chat.completion", body
        log(f"upstream ready on {up_port}; response {len(RESPONSE_BODY)} B, request {len(REQUEST_BODY)} B")
        for rnd in range(a.rounds):
            order = variants if rnd % 2 == 0 else list(reversed(variants))
            d = measure(up_url, None, up.pid, REQUEST_BODY, a.requests, a.warmup, a.concurrency, tmpdir)
            directs.append(d)
            log(f"[round {rnd + 1}] direct: {d['rps']:.0f} req/s, upstream {d['up_cpu_us']:.0f} µs/req")
            for server, client in order:
                name = f"{server} + {client}"
                port = free_port()
                gw = start(gateway_cmd(server, port), {"HB_CLIENT": client, "HB_UPSTREAM": up_url})
                gw_url = f"http://127.0.0.1:{port}/v1/chat/completions"
                try:
                    st, ct, body = wait_ready(gw_url, gw)
                    j = orjson.loads(body)
                    assert st == 200 and j.get("provider") == "openai" and ct.startswith("application/json"), \
                        (st, ct, body[:200])
                    r = measure(gw_url, gw.pid, up.pid, REQUEST_BODY, a.requests, a.warmup, a.concurrency, tmpdir)
                    if rnd == 0:
                        r["tree"] = tree_size(gw.pid)
                    results[(server, client)].append(r)
                    log(f"[round {rnd + 1}] {name:28s} cpu {r['gw_cpu_us']:6.0f} µs/req  {r['rps']:6.0f} req/s  "
                        f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms  util {r['gw_cpu_util']:.2f} "
                        f"err {r['errors']} {r.get('tree', '')}")
                    if rnd == 0 and client != "httpx" and not a.no_stream:
                        v = asyncio.run(verify_stream(gw_url))
                        s = measure(gw_url, gw.pid, up.pid, STREAM_REQUEST_BODY, a.stream_requests,
                                    max(50, a.stream_requests // 10), a.concurrency, tmpdir)
                        stream_rows.append({"name": name, **v, **s})
                        log(f"   stream: ok={v['ok']} events={v['events']} reads={v['reads']} "
                            f"ttfb={v['ttfb_ms']:.1f}ms total={v['total_ms']:.1f}ms  cpu {s['gw_cpu_us']:.0f} "
                            f"µs/req {s['rps']:.0f} req/s err {s['errors']}")
                except Exception as e:  # noqa: BLE001
                    notes.append(f"{name}: FAILED {e!r}")
                    log(f"{name}: FAILED {e!r}")
                finally:
                    err = stop(gw).strip()
                    if err and rnd == 0:
                        tail = err[-600:].replace("\n", " | ")
                        if "Cannot write to closing transport" in err:
                            notes.append(f"{name}: aiohttp.web logs ClientConnectionResetError tracebacks when wrk "
                                         f"stops with SSE streams in flight (client disconnect) -- expected, harmless")
                        elif "Traceback" in err or "Error" in err:
                            notes.append(f"{name} stderr tail: {tail}")
        errors = {} if a.no_errors else asyncio.run(probe_errors(up_base))
    finally:
        stop(up)
        shutil.rmtree(tmpdir, ignore_errors=True)

    rows = []
    for (server, client), rs in results.items():
        if rs:
            row = {"name": f"{server} + {client}", **agg(rs)}
            row["tree"] = rs[0].get("tree")
            rows.append(row)
    direct = agg(directs)

    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    vers = {}
    for m in ("granian", "uvicorn", "uvloop", "httptools", "aiohttp", "pyreqwest", "httpx", "orjson"):
        try:
            from importlib.metadata import version
            vers[m] = version(m)
        except Exception:  # noqa: BLE001
            vers[m] = "?"
    wrk_ver = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    md = [f"## HTTP stack benchmark — {now}", "",
          f"- machine: nproc={os.cpu_count()}, {platform.processor() or platform.machine()}, "
          f"kernel {platform.release()}, Python {platform.python_version()} ({sys.executable})",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + f", {wrk_ver}",
          f"- load: wrk -t1 -c{a.concurrency}, {a.requests} measured requests after {a.warmup} warm-up, "
          f"{a.rounds} rounds (variant order alternates), figures = median over rounds",
          f"- request {len(REQUEST_BODY)} B JSON, upstream response {len(RESPONSE_BODY)} B JSON; gateway: orjson "
          f"loads → read model → dumps → POST upstream (pooled keep-alive) → loads → add provider → dumps",
          "- gw CPU = utime+stime of the gateway process tree (all threads, incl. granian's Rust threads / "
          "forked worker and pyreqwest's tokio runtime) during the measured phase ÷ completed requests",
          "- everything (wrk, upstream, gateway) shares the same 2 cores → req/s is contention-bound; "
          "CPU µs/req is the figure to compare", "",
          fmt_table(rows, direct), ""]
    trees = [f"{r['name']}: {r['tree'][0]} proc / {r['tree'][1]} threads" for r in rows if r.get("tree")]
    md += ["Process tree sizes: " + "; ".join(trees), ""]
    if stream_rows:
        md += [f"### SSE pass-through ({N_SSE_CHUNKS} chunks + [DONE], upstream sleeps "
               f"{os.environ.get('HB_STREAM_DELAY', '0.002')} s between chunks; {a.stream_requests} requests)", "",
               "| variant | works | events | client reads | TTFB ms | total ms | gw CPU µs/req | req/s | p99 ms | errors |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in sorted(stream_rows, key=lambda s: s["gw_cpu_us"]):
            md.append(f"| {s['name']} | {'yes' if s['ok'] else 'NO'} | {s['events']} | {s['reads']} | "
                      f"{s['ttfb_ms']:.1f} | {s['total_ms']:.1f} | {s['gw_cpu_us']:.0f} | {s['rps']:.0f} | "
                      f"{s['p99_ms']:.1f} | {s['errors']} |")
        md.append("")
    if errors:
        md += ["### Upstream failure → exception raised by each client", "",
               "| client | case | exception |", "|---|---|---|"]
        for (c, k), v in errors.items():
            md.append(f"| {c} | {k} | `{v}` |")
        md.append("")
    if notes:
        md += ["### Notes / failures", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(md)
    print(text)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a" if a.append else "w") as f:
        if not a.append:
            f.write("# HelixAgent hot-path HTTP stack benchmark\n\nGenerated by `bench/http_stack.py`.\n\n")
        f.write(text + "\n")
    log(f"written {a.out}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "_upstream":
        run_upstream(int(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "_aiohttp_server":
        run_aiohttp_server(int(sys.argv[2]))
    else:
        main()
