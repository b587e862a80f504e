"""Private Redis deployments of each URL kind for tests: TLS (``rediss://`` with a test CA made with
``cryptography``), Sentinel (a master + one ``redis-server --sentinel``) and Cluster (three
``--cluster-enabled yes`` nodes joined by ``redis-cli --cluster create``).  Each runs on free loopback
ports in its own temp directory and is stopped by ``close()``."""
from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from support.servers import free_port

REDIS = shutil.which("redis-server") or "redis-server"
CLI = shutil.which("redis-cli") or "redis-cli"


def _ping(port: int, tls_ctx: ssl.SSLContext | None = None, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            s: socket.socket = tls_ctx.wrap_socket(raw, server_hostname="127.0.0.1") if tls_ctx else raw
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except (OSError, ssl.SSLError):
        return False


class _Procs:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="helix-redis-kind-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"p{len(self.procs)}.log", "wb")
        p = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append(p)
        return p

    def wait(self, pred, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "\n".join(f.read_text(errors="replace")[-2000:] for f in self.dir.glob("*.log"))
                self.close()
                raise RuntimeError(f"{what} did not come up:\n{logs}")
            time.sleep(0.05)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a test CA and a certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("helix redis test CA")).issuer_name(name("helix redis test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


_BASE = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")


class TLSRedis(_Procs):
    """redis-server with TLS only (``--port 0 --tls-port``), a password, and a test CA."""

    password = "tls-secret-pw"

    def __init__(self) -> None:
        super().__init__()
        self.ca, cert, key = make_ca(self.dir)
        self.port = free_port()
        self.spawn(REDIS, *_BASE, "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                   "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
                   "--requirepass", self.password, "--dir", str(self.dir))
        ctx = ssl.create_default_context(cafile=str(self.ca))
        self.wait(lambda: _ping(self.port, ctx, self.password), "TLS redis-server")

    @property
    def url(self) -> str:
        return (f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_cert_reqs=required"
                f"&ssl_ca_certs={self.ca}")


class SentinelRedis(_Procs):
    """A master with a password and one sentinel monitoring it as service ``helixmaster``."""

    password = "sentinel-master-pw"
    service = "helixmaster"

    def __init__(self) -> None:
        super().__init__()
        self.master_port = free_port()
        self.spawn(REDIS, *_BASE, "--port", str(self.master_port), "--requirepass", self.password,
                   "--masterauth", self.password, "--dir", str(self.dir))
        self.wait(lambda: _ping(self.master_port, None, self.password), "sentinel's master")
        self.port = free_port()
        conf = self.dir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\nsentinel monitor {self.service} 127.0.0.1 "
                        f"{self.master_port} 1\nsentinel auth-pass {self.service} {self.password}\n"
                        f"sentinel down-after-milliseconds {self.service} 5000\n")
        self.spawn(REDIS, str(conf), "--sentinel")
        self.wait(lambda: _ping(self.port), "redis sentinel")

    @property
    def url(self) -> str:
        return f"redis+sentinel://:{self.password}@127.0.0.1:{self.port}/{self.service}/0"


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    import random
    for _ in range(200):
        p = random.randint(20000, 45000)
        ok = True
        for q in (p, p + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
        if ok:
            return p
    raise RuntimeError("no free port pair for a cluster node")


class ClusterRedis(_Procs):
    """Three masters (no replicas) covering all 16384 slots."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.ports = [_cluster_port() for _ in range(n)]
        for p in self.ports:
            d = self.dir / str(p)
            d.mkdir()
            self.spawn(REDIS, *_BASE, "--port", str(p), "--cluster-enabled", "yes", "--cluster-config-file",
                       str(d / "nodes.conf"), "--dir", str(d), "--cluster-node-timeout", "5000")
        self.wait(lambda: all(_ping(p) for p in self.ports), "cluster nodes")
        out = subprocess.run([CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                              "--cluster-yes"], capture_output=True, timeout=60)
        if out.returncode != 0:
            self.close()
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout!r} {out.stderr!r}")

        def ok() -> bool:
            r = subprocess.run([CLI, "-p", str(self.ports[0]), "cluster", "info"], capture_output=True, timeout=10)
            return b"cluster_state:ok" in r.stdout
        self.wait(ok, "cluster state ok", 30)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])
