import os
import subprocess
import sys
from pathlib import Path

import helixagent

SRC = str(Path(helixagent.__file__).resolve().parents[1])


def run(*args, env=None):
    e = dict(os.environ, PYTHONPATH=SRC, **(env or {}))
    return subprocess.run([sys.executable, "-m", "helixagent", *args], capture_output=True, text=True, env=e, timeout=60)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"helixagent {helixagent.__version__}"


def test_config_check_masks_secrets(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("providers:\n  - name: openai\n    api_key: ${HX_TEST_KEY}\n")
    r = run("config", "check", str(f), env={"HX_TEST_KEY": "sk-live-abcdefghijklmnop"})
    assert r.returncode == 0, r.stderr
    assert "sk-live-abcdefghijklmnop" not in r.stdout
    assert "api_key: sk-****op" in r.stdout


def test_config_check_reports_bad_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("providers:\n  - name: openai\n    prority: 1\n")
    r = run("config", "check", str(f))
    assert r.returncode == 2
    assert "providers[0].prority: unknown key" in r.stderr
