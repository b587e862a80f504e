"""``helixagent serve --config file`` as a separate gateway PROCESS, for the multi-process tests.

The config is written to ``<tmp>/<name>.yaml`` and the output to ``<tmp>/<name>.log``; vendor API keys and
``HELIXAGENT_CONFIG`` are left out of the child's environment (a test's config says everything)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

import helixagent
from support.servers import free_port

SRC = str(Path(helixagent.__file__).resolve().parents[1])


class ServeProcess:
    def __init__(self, cfg: dict[str, Any], tmp: Path, name: str, cwd: Path | None = None):
        self.port = free_port()
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "HELIXAGENT_CONFIG"}
        env["PYTHONPATH"] = SRC
        self.log = open(tmp / f"{name}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--config", str(path),
                                      "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=str(cwd) if cwd is not None else None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        """What "started" means for this test (default: /health answers 200)."""
        return httpx.get(self.url + "/health", timeout=1).status_code == 200

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if self.ready():
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"gateway process {self.port} did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
