"""The HTTP server itself under abuse, over real sockets: header size/count limits (431), head and body
deadlines (slowloris), keep-alive idle timeout, the per-worker connection cap, bounded memory under
unterminated headers (a `helixagent serve` subprocess, RSS from /proc), and the serve process: a port in
use, SIGHUP (an in-process config reload), a worker that cannot start."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from helixagent.api.server import uvicorn_config
from helixagent.config import load_config_dict
from support.servers import GatewayServer, bound_socket, free_port, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")


# -- helpers -------------------------------------------------------------------------------------------------
def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket, limit: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        except socket.timeout:
            continue
        if not chunk:
            break
        out += chunk
    else:
        raise AssertionError(f"the connection was not closed within {limit}s; got {out[:200]!r}")
    return out


def send_all_then_read(port: int, data: bytes) -> bytes:
    """Send a whole request first (as a simple client does), then read the answer."""
    s = connect(port)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading once it has answered; the answer must still be there
        return read_until_closed(s)
    finally:
        s.close()


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw[9:12])


def json_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return orjson.loads(body)


def head(port: int, extra: bytes = b"") -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port + extra


@pytest.fixture(scope="module")
def gw():
    """Default server limits (64 KiB head, 100 headers), except short deadlines for the slow-client tests."""
    g = GatewayServer({"server": {"header_timeout": "1s", "body_timeout": "1s", "keep_alive_timeout": "1s"},
                       "logging": {"level": "warning"}})
    yield g
    g.close()


# -- header size and count -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
def test_oversized_header_is_431(gw, size):
    raw = send_all_then_read(gw.port, head(gw.port, b"X-Big: " + b"a" * size + b"\r\n\r\n"))
    assert status_of(raw) == 431
    err = json_body(raw)["error"]
    assert err["code"] == "request_header_fields_too_large" and "65536" in err["message"]
    assert b"connection: close" in raw.lower()


def test_too_many_headers_is_431(gw):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(20_000))
    raw = send_all_then_read(gw.port, head(gw.port, many + b"\r\n"))
    assert status_of(raw) == 431
    assert "100 header fields" in json_body(raw)["error"]["message"]


def test_long_url_counts_towards_the_head(gw):
    raw = send_all_then_read(gw.port, b"GET /health?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(raw) == 431


def test_heads_within_the_limits_are_served(gw):
    # 90 headers, 40 KB in all, sent in small pieces: still served, and the connection is kept alive
    extra = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 440) for i in range(90))
    s = connect(gw.port)
    try:
        for _ in range(2):
            data = head(gw.port, extra + b"\r\n")
            for i in range(0, len(data), 1000):
                s.sendall(data[i:i + 1000])
            buf = b""
            while b"\r\n\r\n" not in buf or not buf.rstrip().endswith(b"}"):
                buf += s.recv(65536)
            assert status_of(buf) == 200, buf[:300]
    finally:
        s.close()
    r = httpx.get(gw.url + "/health", headers={f"x-h{i}": "v" * 600 for i in range(90)}, timeout=10)
    assert r.status_code == 200


# -- deadlines -------------------------------------------------------------------------------------------------
def test_slowloris_is_closed_after_the_head_deadline(gw):
    """A byte every 0.2 s never completes a head: 408 and closed once header_timeout (1 s) has passed."""
    s = connect(gw.port)
    got = bytearray()
    closed = threading.Event()

    def reader() -> None:
        try:
            got.extend(read_until_closed(s, limit=20))
        finally:
            closed.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t0 = time.monotonic()
    data = head(gw.port) + b"X-Slow: " + b"a" * 1000
    try:
        for b in data:
            if closed.is_set():
                break
            try:
                s.send(bytes([b]))
            except OSError:
                break
            time.sleep(0.2)
            assert time.monotonic() - t0 < 15, "the slow client was never cut off"
        assert closed.wait(10)
        elapsed = time.monotonic() - t0
    finally:
        s.close()
    assert 0.8 <= elapsed < 8, elapsed
    assert status_of(bytes(got)) == 408
    assert json_body(bytes(got))["error"]["code"] == "request_timeout"


def test_silent_connection_is_closed_after_the_head_deadline(gw):
    s = connect(gw.port)
    t0 = time.monotonic()
    try:
        assert read_until_closed(s) == b""
    finally:
        s.close()
    assert 0.8 <= time.monotonic() - t0 < 8


def test_idle_keep_alive_connection_is_closed(gw):
    s = connect(gw.port)
    try:
        s.sendall(head(gw.port, b"\r\n"))
        buf = b""
        while not buf.rstrip().endswith(b"}"):
            buf += s.recv(65536)
        assert status_of(buf) == 200 and b"connection: close" not in buf.lower()
        t0 = time.monotonic()
        assert read_until_closed(s) == b""  # idle: closed after keep_alive_timeout (1 s)
        assert 0.8 <= time.monotonic() - t0 < 4
    finally:
        s.close()


def test_slow_body_gets_408_after_the_body_deadline(gw):
    s = connect(gw.port)
    t0 = time.monotonic()
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\":")
        raw = read_until_closed(s)
    finally:
        s.close()
    assert 0.8 <= time.monotonic() - t0 < 8
    assert status_of(raw) == 408
    assert "body" in json_body(raw)["error"]["message"]
    assert httpx.get(gw.url + "/health", timeout=10).status_code == 200


def test_body_in_pieces_within_the_deadline_is_served(gw):
    body = orjson.dumps({"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]})
    s = connect(gw.port)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        third = len(body) // 3 + 1
        for i in range(0, len(body), third):
            time.sleep(0.2)
            s.sendall(body[i:i + third])
        raw = read_until_closed(s)
    finally:
        s.close()
    assert status_of(raw) == 200, raw[:300]


def test_chunked_body_with_endless_trailers_is_cut_off(gw):
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(5000))
    raw = send_all_then_read(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"2\r\n{}\r\n0\r\n" + trailers + b"\r\n")
    assert raw == b""  # the request was under way: cut off (its handler sees the client gone), no answer
    assert httpx.get(gw.url + "/health", timeout=10).status_code == 200


# -- connection cap ----------------------------------------------------------------------------------------------
def test_connection_cap_refuses_clearly_and_recovers():
    g = GatewayServer({"server": {"max_connections": 5, "header_timeout": "30s"}, "logging": {"level": "warning"}})
    held: list[socket.socket] = []
    try:
        for _ in range(5):
            held.append(connect(g.port))
        time.sleep(0.3)  # let the server accept them all
        extra = connect(g.port)
        try:
            raw = read_until_closed(extra)
        finally:
            extra.close()
        assert status_of(raw) == 503
        assert json_body(raw)["error"]["code"] == "too_many_connections"
        assert b"connection: close" in raw.lower()
        # the held connections are still served
        held[0].sendall(head(g.port, b"Connection: close\r\n\r\n"))
        assert status_of(read_until_closed(held[0])) == 200
        for s in held:
            s.close()
        held.clear()

        def served() -> bool:
            try:
                return httpx.get(g.url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_until(served, timeout=10, interval=0.1)
    finally:
        for s in held:
            s.close()
        g.close()


def test_drain_timeout_is_configurable():
    cfg = load_config_dict({"server": {"drain_timeout": "3s", "keep_alive_timeout": "7s"}}, "<test>")
    config = uvicorn_config(lambda *a: None, cfg.server)
    assert config.timeout_graceful_shutdown == 3.0
    assert config.helix_limits.keep_alive_timeout == 7.0
    assert load_config_dict({}, "<test>").server.drain_timeout == 30.0


# -- the serve process (real subprocesses) -----------------------------------------------------------------------
def write_config(tmp_path: Path, port: int, **server) -> Path:
    cfg = {"server": {"port": port, **server},
           "database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")},
           "logging": {"level": "info"}}
    path = tmp_path / "helix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_serve(tmp_path: Path, cfgfile: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("HELIXAGENT_API_KEY", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logpath = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(logpath, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config", str(cfgfile), *extra],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, logpath


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_listening(proc: subprocess.Popen, logpath: Path, port: int) -> None:
    def up() -> bool:
        assert proc.poll() is None, logpath.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
    assert wait_until(up, timeout=40, interval=0.1), logpath.read_text()
    assert b"listening on" in logpath.read_bytes()


def vm(pid: int, field: str) -> int:
    """VmRSS / VmHWM of a process in KiB, from /proc (psutil is not installed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_unterminated_headers_keep_memory_bounded(tmp_path):
    """40 connections each sending up to 20 MB of a never-ending header: each is cut off with 431 after
    max_header_bytes, and the server's peak RSS grows by a few MB (it grew by ~900 MB before)."""
    port = free_port()
    proc, logpath = start_serve(tmp_path, write_config(tmp_path, port))
    try:
        wait_listening(proc, logpath, port)
        for _ in range(3):  # warm up the normal path first
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        before = vm(proc.pid, "VmRSS")
        sent: list[int] = []
        answers: list[bytes] = []
        lock = threading.Lock()

        def attack() -> None:
            s = connect(port, timeout=20)
            n = 0
            chunk = b"a" * 65536
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                while n < 20 * 1024 * 1024:
                    s.sendall(chunk)
                    n += len(chunk)
            except OSError:
                pass  # cut off by the server
            try:
                got = read_until_closed(s, limit=10)
            except (OSError, AssertionError):
                got = b"<not closed>"
            s.close()
            with lock:
                sent.append(n)
                answers.append(got)

        threads = [threading.Thread(target=attack) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        peak = vm(proc.pid, "VmHWM")
        growth_mb = (peak - before) / 1024
        print(f"RSS before {before / 1024:.0f} MB, peak during the attack {peak / 1024:.0f} MB")
        # the server cut every connection off long before 20 MB
        assert max(sent) < 20 * 1024 * 1024, sent
        assert sum(1 for a in answers if a.startswith(b"HTTP/1.1 431")) >= 30, [a[:40] for a in answers]
        assert growth_mb < 60, f"peak RSS grew by {growth_mb:.0f} MB under 40 unterminated heads"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        stop(proc)


def test_port_in_use_exits_non_zero_without_saying_listening(tmp_path):
    holder = bound_socket()
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        proc, logpath = start_serve(tmp_path, write_config(tmp_path, port))
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise AssertionError("serve kept running on a port in use: " + logpath.read_text()) from None
        text = logpath.read_text()
        assert rc != 0, text
        assert "listening on" not in text, text
        assert "cannot listen on" in text and "in use" in text, text
    finally:
        holder.close()


def test_sighup_reloads_a_single_worker_in_process(tmp_path):
    port = free_port()
    proc, logpath = start_serve(tmp_path, write_config(tmp_path, port))
    try:
        wait_listening(proc, logpath, port)
        proc.send_signal(signal.SIGHUP)  # the config is re-read in-process (tests/test_reload.py has more)
        assert wait_until(lambda: b"config reload (SIGHUP)" in logpath.read_bytes(), timeout=10), \
            logpath.read_text()
        assert proc.poll() is None, logpath.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        stop(proc)


@pytest.mark.parametrize("workers", ["2", "1"])
def test_a_worker_that_cannot_start_stops_the_server(tmp_path, workers):
    """A config that passes every static check (`config check` says valid), but whose start-up fails in
    each worker: the SQLite file exists and is writable but is not a database (a corrupt or foreign
    file), so the migration at start-up fails.  The whole server exits non-zero, promptly, instead of
    respawning workers forever."""
    port = free_port()
    cfgfile = write_config(tmp_path, port)
    (tmp_path / "h.db").write_bytes(b"this is not an SQLite database" * 100)
    from helixagent.config import load_config
    from helixagent.preflight import check_runtime
    assert check_runtime(load_config(str(cfgfile))) == []  # nothing a static check could see
    proc, logpath = start_serve(tmp_path, cfgfile, "--workers", workers)
    try:
        rc = proc.wait(45)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError("serve kept running with workers that cannot start: "
                             + logpath.read_text()[-3000:]) from None
    text = logpath.read_text()
    assert rc != 0, text
    assert "listening on" not in text
    assert "failed to start" in text, text
    assert text.count("Application startup failed") <= 2 * int(workers), text  # not respawned over and over


def failing_lifespan_app_factory():
    """An app whose lifespan start-up fails (used by the test below through `serve(app=...)`)."""
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "start-up hook raised"})
    return app


@pytest.mark.parametrize("workers", [1, 2])
def test_a_lifespan_start_up_failure_exits_non_zero(tmp_path, workers):
    port = free_port()
    code = ("import sys; from helixagent.api.server import serve; from helixagent.config import load_config_dict; "
            f"sys.exit(serve(load_config_dict({{}}, 'x').server, '127.0.0.1', {port}, {workers}, 'test', "
            "app='test_server_limits:failing_lifespan_app_factory'))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(Path(__file__).parent)]))
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=45,
                             cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"serve kept running after its start-up failed: {exc.stdout} {exc.stderr}") from None
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "listening on" not in out.stdout + out.stderr
