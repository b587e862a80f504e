"""Databases for store tests: a fresh PostgreSQL schema per test on the shared server, and a private
PostgreSQL server (initdb + pg_ctl on its own port) that a fault test may stop and start."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from typing import Iterator

from support.servers import free_port


def schema_url(base_url: str, schema: str) -> str:
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options=-csearch_path%3D{schema}"


def fresh_schema(base_url: str) -> Iterator[str]:
    """Create ``helix_<random>`` on the shared server, yield a URL whose search_path is that schema,
    drop it afterwards."""
    import psycopg2
    schema = "helix_" + uuid.uuid4().hex[:12]
    dsn = base_url.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema_url(base_url, schema)
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.close()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        path = shutil.which(name)
        if path:
            return path
        raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return found[-1]


class PrivatePostgres:
    """A throw-away PostgreSQL server on 127.0.0.1:<port>, run as the `postgres` OS user when we are root."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="helix-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([_pg_bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        self.start()

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        if self.as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, check=check, capture_output=True, timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c max_connections=50")
        self._run([_pg_bin("pg_ctl"), "-D", self.data, "-l", self.log, "-w", "-t", "30", "-o", opts, "start"])

    def stop(self, mode: str = "immediate") -> None:
        self._run([_pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "30", "stop"], check=False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
