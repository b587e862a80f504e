#!/usr/bin/env python3
"""Build the image and run it as the README says: `migrate up`, a non-root user, `serve` answering /health.

Needs a Docker daemon, which the development and CI machines of this project do not have (`docker info`:
"Cannot connect to the Docker daemon"), so this is a script to run where one exists, not a test that would
only ever skip here.  Usage: python deploy/scripts/image_smoke.py   (exit 0 = the image works)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if r.returncode != 0:
        print("no Docker daemon:", (r.stderr.strip().splitlines() or ["docker info failed"])[-1], file=sys.stderr)
        return 2
    tag = f"helixagent-smoke:{os.getpid()}"
    b = subprocess.run(["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=900)
    if b.returncode != 0:
        print(b.stdout[-4000:] + b.stderr[-4000:], file=sys.stderr)
        return 1
    try:
        m = subprocess.run(["docker", "run", "--rm", tag, "migrate", "up"], capture_output=True, text=True,
                           timeout=120)
        assert m.returncode == 0 and "migrated to" in m.stdout, m.stdout + m.stderr
        user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True,
                              text=True, timeout=60)
        assert user.stdout.strip() not in ("", "0"), user.stdout + user.stderr
        size = subprocess.run(["docker", "image", "inspect", tag, "--format", "{{.Size}}"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
        port = free_port()
        cid = subprocess.run(["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:7061",
                              "-e", "HELIXAGENT_API_KEY=test-master-key-container", tag, "serve", "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        assert cid, "docker run -d failed"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as h:
                        if h.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the container did not answer /health"
                time.sleep(0.5)
        finally:
            subprocess.run(["docker", "stop", cid], capture_output=True, timeout=60)
        print(f"image ok: migrate up, non-root, /health 200; size {int(size) / 1e6:.0f} MB" if size else "image ok")
        return 0
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


if __name__ == "__main__":
    sys.exit(main())
