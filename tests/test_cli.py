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


def test_serve_with_embedded_defaults_answers_from_mock(tmp_path):
    """The quick start: `helixagent serve` with no config and no keys answers from the mock provider."""
    import time

    import httpx

    from support.servers import free_port
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "HELIXAGENT_CONFIG"}
    env["PYTHONPATH"] = SRC
    p = subprocess.Popen([sys.executable, "-m", "helixagent", "serve", "--port", str(port)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.time() < deadline, "gateway did not start"
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       json={"model": "anything", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("Mock")
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=30)
    assert "mock" in out and "OPENAI_API_KEY" in out  # the start-up warning says how to add keys
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal
    assert "Application shutdown complete" in out
    assert p.returncode in (0, -15)
