"""Serving: HTTPS with a test CA (the official openai SDK over TLS to a `helixagent serve` subprocess), the
preflight refusing a missing or broken certificate, /livez and /readyz (no key, no secrets, a dead Redis
answered within its timeout), and SIGTERM: readiness fails first, requests are served during
server.drain_readiness_delay, then the process drains and exits 0."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helixagent.config import ConfigError, load_config_dict
from helixagent.preflight import check_runtime
from support.servers import GatewayServer, free_port, wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")
MASTER = "master-probe-key-0123456789"


# -- a test CA and a server certificate for 127.0.0.1 -----------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert.pem, server key.pem) in ``d``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("helix test CA")).issuer_name(_name("helix test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = d / "ca.pem", d / "server.pem", d / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


# -- `helixagent serve` subprocesses -------------------------------------------------------------------------------
def write_config(tmp_path: Path, port: int, **server: object) -> Path:
    cfg = {"server": {"port": port, **server},
           "database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")},
           "logging": {"level": "info"}}
    path = tmp_path / "helix.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_serve(tmp_path: Path, cfgfile: Path, **env_extra: str) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=SRC, **env_extra)
    for k in ("HELIXAGENT_API_KEY", "PROMETHEUS_MULTIPROC_DIR", "HTTPS_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH"):
        if k not in env_extra:
            env.pop(k, None)
    logpath = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(logpath, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config", str(cfgfile)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, logpath


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def wait_up(proc: subprocess.Popen, logpath: Path, url: str, **kw: object) -> None:
    def up() -> bool:
        assert proc.poll() is None, logpath.read_text()
        try:
            return httpx.get(url + "/livez", timeout=5, **kw).status_code == 200  # type: ignore[arg-type]
        except httpx.HTTPError:
            return False
    assert wait_until(up, timeout=40, interval=0.1), logpath.read_text()


# -- TLS -------------------------------------------------------------------------------------------------------------
def test_openai_sdk_over_https_with_a_test_ca(tmp_path):
    """TLS from the environment variables (HTTPS_ENABLED, TLS_CERT_PATH, TLS_KEY_PATH): the openai SDK,
    trusting only the test CA, makes a chat call; plain HTTP to the same port gets no HTTP answer."""
    ca, cert, key = make_pki(tmp_path)
    port = free_port()
    proc, logpath = start_serve(tmp_path, write_config(tmp_path, port), HTTPS_ENABLED="true",
                                TLS_CERT_PATH=str(cert), TLS_KEY_PATH=str(key))
    try:
        base = f"https://127.0.0.1:{port}"
        wait_up(proc, logpath, base, verify=ssl.create_default_context(cafile=str(ca)))
        assert f"listening on https://127.0.0.1:{port}" in logpath.read_text()
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30) as hc:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", http_client=hc, max_retries=0)
            out = client.chat.completions.create(model="gpt-4o-mini",
                                                 messages=[{"role": "user", "content": "hello over tls"}])
            assert out.choices[0].message.content
            assert out.usage is not None and out.usage.total_tokens > 0
            # streaming over TLS too
            chunks = list(client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # a client that does not trust the test CA refuses the server
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/livez", timeout=5)
        # plain HTTP to the TLS port: no HTTP response
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5)
        # and a raw HTTP request gets no "HTTP/1.1" status line back
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                got = s.recv(4096)
            except (ConnectionResetError, socket.timeout):
                got = b""
            assert not got.startswith(b"HTTP/"), got
        # TLS 1.2+ only (uvicorn's default context); the handshake names our certificate
        ctx = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert proc.poll() is None
    finally:
        stop(proc)


def test_tls_config_from_file_and_environment(tmp_path, monkeypatch):
    for k in ("HTTPS_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert load_config_dict({}).server.tls.enabled is False
    monkeypatch.setenv("HTTPS_ENABLED", "true")
    monkeypatch.setenv("TLS_CERT_PATH", "/env/cert.pem")
    monkeypatch.setenv("TLS_KEY_PATH", "/env/key.pem")
    tls = load_config_dict({}).server.tls
    assert (tls.enabled, tls.cert_path, tls.key_path) == (True, "/env/cert.pem", "/env/key.pem")
    # the file wins over the environment
    tls = load_config_dict({"server": {"tls": {"enabled": False, "cert_path": "/f/c.pem"}}}).server.tls
    assert (tls.enabled, tls.cert_path, tls.key_path) == (False, "/f/c.pem", "/env/key.pem")
    monkeypatch.setenv("HTTPS_ENABLED", "maybe")
    with pytest.raises(ConfigError, match="HTTPS_ENABLED must be true or false"):
        load_config_dict({})
    monkeypatch.setenv("HTTPS_ENABLED", "1")
    monkeypatch.delenv("TLS_KEY_PATH")
    with pytest.raises(ConfigError, match="key_path"):
        load_config_dict({})


def test_preflight_refuses_a_missing_unreadable_or_mismatched_cert(tmp_path, monkeypatch):
    for k in ("HTTPS_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH"):
        monkeypatch.delenv(k, raising=False)
    ca, cert, key = make_pki(tmp_path)
    base = {"database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")}}

    def problems(**tls: object) -> list[str]:
        return check_runtime(load_config_dict({**base, "server": {"tls": {"enabled": True, **tls}}}))

    assert problems(cert_path=str(cert), key_path=str(key)) == []
    missing = problems(cert_path=str(tmp_path / "nope.pem"), key_path=str(key))
    assert len(missing) == 1 and "server.tls.cert_path" in missing[0] and "nope.pem" in missing[0]
    # the CA's certificate with the server's key: not a pair
    mismatched = problems(cert_path=str(ca), key_path=str(key))
    assert len(mismatched) == 1 and "server.tls" in mismatched[0]
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    assert any("server.tls" in p for p in problems(cert_path=str(cert), key_path=str(garbage)))
    if os.geteuid() != 0:
        unreadable = tmp_path / "unreadable.key"
        unreadable.write_bytes(key.read_bytes())
        unreadable.chmod(0)
        assert any("server.tls.key_path" in p and "cannot be read" in p
                   for p in problems(cert_path=str(cert), key_path=str(unreadable)))
    # `helixagent config check` and `serve` refuse it (exit 2) and name the key
    cfgfile = tmp_path / "tls.yaml"
    cfgfile.write_text(yaml.safe_dump({**base, "server": {"port": free_port(), "tls": {
        "enabled": True, "cert_path": str(tmp_path / "nope.pem"), "key_path": str(key)}}}))
    env = {k: v for k, v in os.environ.items() if k not in ("HTTPS_ENABLED", "TLS_CERT_PATH", "TLS_KEY_PATH")}
    env["PYTHONPATH"] = SRC
    for cmd in (["config", "check", str(cfgfile)], ["serve", "--config", str(cfgfile)]):
        r = subprocess.run([sys.executable, "-m", "helixagent", *cmd], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "server.tls.cert_path" in r.stderr and "nope.pem" in r.stderr, r.stderr


# -- /livez and /readyz -------------------------------------------------------------------------------------------
def dead_port() -> int:
    """A port on which a connection is accepted by nobody (bound, not listening: refused)."""
    return free_port()


def black_hole() -> tuple[socket.socket, int]:
    """A listening socket that never answers (connections complete, PING gets no reply)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


def test_probes_need_no_key_and_report_ready(tmp_path, monkeypatch):
    monkeypatch.setenv("HELIXAGENT_API_KEY", MASTER)
    gw = GatewayServer({"database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")}})
    try:
        r = httpx.get(gw.url + "/livez", timeout=5)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = httpx.get(gw.url + "/readyz", timeout=5)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "ready" and body["failing"] == []
        assert body["checks"]["providers"] == "ok" and body["checks"]["database"] == "ok"
        assert body["checks"]["draining"] is False
        # a model call still needs the key (the probes opened nothing else)
        assert httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                          timeout=5).status_code == 401
    finally:
        gw.close()


def test_readyz_fails_on_a_dead_redis_within_its_timeout_and_shows_no_secret(tmp_path):
    hole, hole_port = black_hole()
    try:
        secret = "s3cr3t-redis-password"
        gw = GatewayServer({
            "redis": {"url": f"redis://:{secret}@127.0.0.1:{hole_port}/0"},
            "cache": {"enabled": True, "type": "redis", "redis_timeout": "300ms"},
            "rate_limits": {"backend": "memory"},
            "database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")}})
        try:
            # many concurrent probes: each answered within the Redis timeout (+ slack), all 503 naming redis
            results: list[tuple[int, dict, float]] = []

            def probe() -> None:
                t0 = time.monotonic()
                r = httpx.get(gw.url + "/readyz", timeout=10)
                results.append((r.status_code, r.json(), time.monotonic() - t0))
                assert secret not in r.text and str(hole_port) not in r.text

            threads = [threading.Thread(target=probe) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            assert len(results) == 20
            for status, body, took in results:
                assert status == 503 and body["failing"] == ["redis"], body
                assert "no answer within 0.3s" in body["checks"]["redis"]
                assert took < 3.0, took
            # /livez is unaffected
            assert httpx.get(gw.url + "/livez", timeout=5).status_code == 200
        finally:
            gw.close()
    finally:
        hole.close()


def test_readyz_with_a_refused_redis_and_a_live_one(tmp_path):
    from conftest import need_redis
    port = dead_port()
    gw = GatewayServer({"redis": {"url": f"redis://127.0.0.1:{port}/0"}, "rate_limits": {"backend": "memory"},
                        "database": {"url": f"sqlite:///{tmp_path}/h.db", "spool_dir": str(tmp_path / "spool")}})
    try:
        r = httpx.get(gw.url + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["failing"] == ["redis"]
        assert "unreachable" in r.json()["checks"]["redis"]
    finally:
        gw.close()
    url = need_redis()
    gw = GatewayServer({"redis": {"url": url}, "rate_limits": {"backend": "memory"},
                        "database": {"url": f"sqlite:///{tmp_path}/h2.db", "spool_dir": str(tmp_path / "sp2")}})
    try:
        r = httpx.get(gw.url + "/readyz", timeout=10)
        assert r.status_code == 200 and r.json()["checks"]["redis"] == "ok", r.text
    finally:
        gw.close()


def test_readyz_is_ready_while_records_spool_for_an_unreachable_database(tmp_path):
    """PostgreSQL away: requests are served and their records spooled, which is ready (``spooling``)."""
    gw = GatewayServer({"database": {"url": f"postgresql://postgres@127.0.0.1:{dead_port()}/test",
                                     "spool_dir": str(tmp_path / "spool"), "retry_interval": "30s"}})
    try:
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10, json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "spool me"}]})
        assert r.status_code == 200, r.text

        def spooling() -> bool:
            r = httpx.get(gw.url + "/readyz", timeout=5)
            return r.status_code == 200 and r.json()["checks"]["database"] == "spooling"
        assert wait_until(spooling, timeout=15, interval=0.2), httpx.get(gw.url + "/readyz").text
        assert "postgres@" not in httpx.get(gw.url + "/readyz", timeout=5).text
    finally:
        gw.close()


# -- SIGTERM: readiness first, then the drain ---------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_fails_readiness_first_then_drains_and_exits_0(tmp_path, workers):
    port = free_port()
    delay = 2.0
    proc, logpath = start_serve(tmp_path, write_config(tmp_path, port, drain_readiness_delay=f"{delay}s",
                                                      drain_timeout="5s", workers=workers))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(proc, logpath, url)
        with httpx.Client(timeout=10) as c, socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            assert c.get(url + "/readyz").status_code == 200
            kept.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            first = kept.recv(65536)
            assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower(), first
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # readiness fails at once
            assert wait_until(lambda: c.get(url + "/readyz").status_code == 503, timeout=1.0, interval=0.02)
            r = c.get(url + "/readyz")
            assert r.json()["failing"] == ["draining"]
            # a keep-alive connection from before the signal: its next answer says "close", then it is
            # closed (a proxy sees it, instead of racing the drain's close of an idle connection)
            assert r.headers["connection"] == "close"
            kept.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := kept.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close\r\n" in answer.lower(), answer
            # requests are still served during the delay (new connections too)
            assert time.monotonic() - t0 < delay
            r = httpx.post(url + "/v1/chat/completions", timeout=10, json={
                "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "still serving"}]})
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < delay
            assert c.get(url + "/livez").status_code == 200
            assert proc.poll() is None
        # then the drain, and a clean exit
        code = proc.wait(delay + 5 + 10)
        took = time.monotonic() - t0
        assert code == 0, logpath.read_text()
        assert took >= delay - 0.2, took
        assert "SIGTERM: not ready" in logpath.read_text()
    finally:
        stop(proc)


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_work(tmp_path, fake_openai):
    """No readiness delay: SIGTERM mid-stream -> the stream still ends with [DONE] (within drain_timeout),
    no new request is served, and the process exits 0."""
    from fakes.openai_upstream import Fault
    port = free_port()
    cfgfile = write_config(tmp_path, port, drain_timeout="20s")
    cfg = yaml.safe_load(cfgfile.read_text())
    cfg["providers"] = [{"name": "openai", "type": "openai", "base_url": fake_openai.base_url,
                         "api_key": fake_openai.api_key}]
    cfgfile.write_text(yaml.safe_dump(cfg))
    proc, logpath = start_serve(tmp_path, cfgfile)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(proc, logpath, url)
        fake_openai.push(Fault(chunk_delay=0.3))
        lines: list[str] = []
        with httpx.Client(timeout=30) as c, c.stream("POST", url + "/v1/chat/completions", json={
                "model": "gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "stream through the drain"}]}) as r:
            assert r.status_code == 200
            it = r.iter_lines()
            for line in it:
                if line.startswith("data: "):
                    lines.append(line)
                    break
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.HTTPError):
                httpx.get(url + "/livez", timeout=1.0)
            lines.extend(line for line in it if line.startswith("data: "))
        assert lines[-1] == "data: [DONE]", lines
        assert len(lines) >= 4, lines
        assert proc.wait(20) == 0, logpath.read_text()
        assert time.monotonic() - t0 < 20
    finally:
        stop(proc)
