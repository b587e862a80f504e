"""The Helm chart (deploy/helm/helixagent) renders, with Helm's own engine, to objects that validate against
the Kubernetes schemas, and those objects run the gateway the way the chart promises.

Rendering: no `helm` binary is shipped by any registry this project reaches (not Debian, PyPI or npm), so the
test uses helm-python-sdk: Helm v4's official Go SDK (chart loader, template engine with Sprig, `required`,
`lint`) built as a C library and bound with ctypes -- the same code path as `helm template`, not a
re-implementation.  Validation: kubernetes-validate, offline, against the bundled OpenAPI schemas of the
oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest one bundled, in strict mode
(unknown fields are errors).  The ServiceMonitor is a CRD (Prometheus Operator) without a bundled schema: it
is checked structurally against the Service it selects.  `kubectl --validate` needs an API server, so it is
not used here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from helixagent.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "helixagent"
SECRET = "helixagent-secrets"
BASE: dict[str, Any] = {"secrets": {"existingSecret": SECRET}}
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values: dict[str, Any] | None = None, *, name: str = "demo",
           namespace: str = "llm") -> list[dict[str, Any]]:
    """`helm template demo deploy/helm/helixagent -n llm -f values`: every rendered object."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(_merge(BASE, values or {}), name=name, namespace=namespace, is_install=True)
    objs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                objs.append(doc)
    return objs


def notes(values: dict[str, Any] | None = None) -> str:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(_merge(BASE, values or {}), name="demo", namespace="llm", is_install=True)
    return next(v for k, v in manifests.items() if k.endswith("NOTES.txt"))


def kinds(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = kinds(objs).get(kind, [])
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def gateway_deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")


def migration_job(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Job")


ALL_ON: dict[str, Any] = {"metrics": {"serviceMonitor": {"enabled": True}}}


def test_every_object_validates_against_the_kubernetes_schemas() -> None:
    objs = render(ALL_ON)
    by_kind = kinds(objs)
    assert set(by_kind) == {"ServiceAccount", "ConfigMap", "Service", "Deployment", "Job",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"}
    checked = 0
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked in test_service_monitor_scrapes_the_metrics_port
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
    assert checked == (len(objs) - 1) * len(K8S_VERSIONS)


def test_the_validator_is_not_vacuous() -> None:
    """The same validation rejects a broken object of the chart, so a pass above means something."""
    dep = gateway_deployment(render())
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "seven-oh-six-one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = gateway_deployment(render())
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def test_helm_lint_is_clean() -> None:
    result = helm.lint(str(CHART), BASE, strict=True, kube_version="1.30.0")
    assert result["errors"] == []
    # severities: 1 info, 2 warning, 3 error (Helm's support.Severity)
    assert [m for m in result["messages"] if m["severity"] >= 2] == []


def test_the_config_map_is_the_gateways_config_and_validates(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render()
    cms = {c["metadata"]["name"]: c for c in kinds(objs)["ConfigMap"]}
    assert set(cms) == {"demo-helixagent", "demo-helixagent-migrate"}
    text = cms["demo-helixagent"]["data"]["config.yaml"]
    assert cms["demo-helixagent-migrate"]["data"]["config.yaml"] == text
    with open(CHART / "values.yaml") as f:
        values = yaml.safe_load(f)
    assert yaml.safe_load(text) == values["config"]
    # the gateway's own loader accepts it, with the secrets coming from the environment as in the pod
    for var in ("HELIXAGENT_API_KEY", "HELIXAGENT_REDIS_URL", "HELIXAGENT_DATABASE_URL"):
        monkeypatch.setenv(var, {"HELIXAGENT_REDIS_URL": "redis://redis:6379/0",
                                 "HELIXAGENT_DATABASE_URL": "postgresql://hx@pg:5432/hx"}.get(var, "sk-x"))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load_config(path)
    dep = gateway_deployment(objs)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # HELIXAGENT_CONFIG names the mounted file
    assert env["HELIXAGENT_CONFIG"]["value"] == mounts["config"]["mountPath"] + "/config.yaml"
    assert mounts["config"]["readOnly"] is True
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == "demo-helixagent"
    # the ports the pod exposes are the ones the config binds
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": cfg.server.port, "metrics": cfg.metrics.port}
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", str(cfg.server.port)]
    # the spool lies on the writable volume
    assert Path(cfg.database.spool_dir).is_relative_to(mounts["spool"]["mountPath"])
    # a config change rolls the pods
    changed = render({"config": {"logging": {"level": "debug"}}})
    ann = dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert gateway_deployment(changed)["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != ann


def _secret_refs(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = pod_spec["containers"][0]["env"]
    plain = [e for e in env if "valueFrom" not in e]
    assert [e["name"] for e in plain] == ["HELIXAGENT_CONFIG"]  # the only literal value: a path
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}


def test_secrets_only_by_reference() -> None:
    objs = render()
    assert "Secret" not in kinds(objs)
    required = {"HELIXAGENT_API_KEY", "HELIXAGENT_DATABASE_URL", "HELIXAGENT_REDIS_URL",
                "HELIXAGENT_ENCRYPTION_KEYS"}
    providers = {"ANTHROPIC_API_KEY", "OPENAI_API_KEY", "DEEPSEEK_API_KEY", "GEMINI_API_KEY"}
    optional = providers | {"HELIXAGENT_DATABASE_READ_URL"}  # the read replica is optional too
    for pod in (gateway_deployment(objs)["spec"]["template"]["spec"],
                migration_job(objs)["spec"]["template"]["spec"]):
        refs = _secret_refs(pod)
        assert set(refs) == required | optional
        for name, ref in refs.items():
            assert ref["name"] == SECRET and ref["key"] == name
            assert ref.get("optional", False) == (name in optional)
    # a database URL from another Secret (e.g. an operator's), under another key
    objs = render({"secrets": {"env": {"HELIXAGENT_DATABASE_URL": {"secret": "pg-app", "key": "uri"}}}})
    ref = _secret_refs(gateway_deployment(objs)["spec"]["template"]["spec"])["HELIXAGENT_DATABASE_URL"]
    assert ref == {"name": "pg-app", "key": "uri"}


def test_rendering_without_the_secret_name_fails_loudly() -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError) as exc:
        chart.render({}, name="demo", namespace="llm")
    assert "secrets.existingSecret is required" in str(exc.value)


def test_probes_security_context_and_writable_volumes() -> None:
    objs = render()
    for pod in (gateway_deployment(objs)["spec"]["template"]["spec"],
                migration_job(objs)["spec"]["template"]["spec"]):
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        c = pod["containers"][0]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert pod["automountServiceAccountToken"] is False
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        # every writable mount is an emptyDir; the only other one is the read-only config
        assert "emptyDir" in vols[mounts["/tmp"]]
        assert "emptyDir" in vols[mounts["/var/lib/helixagent"]]
        assert {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")} == {"spool", "tmp"}
    c = gateway_deployment(objs)["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["resources"]["requests"]["cpu"]  # the HPA's CPU target needs a request
    spec = gateway_deployment(objs)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + 25
    # a spool that outlives the pod
    objs = render({"spool": {"persistentVolumeClaim": {"claimName": "hx-spool"}}})
    vols = {v["name"]: v for v in gateway_deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["spool"] == {"name": "spool", "persistentVolumeClaim": {"claimName": "hx-spool"}}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(gateway_deployment(objs), version, strict=True)


def test_migration_job_is_a_pre_install_pre_upgrade_hook() -> None:
    objs = render()
    job = migration_job(objs)
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert set(ann["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    cm = next(c for c in kinds(objs)["ConfigMap"] if c["metadata"]["name"].endswith("-migrate"))
    # its config exists before it: a hook of its own, created first (lower weight)
    assert cm["metadata"]["annotations"]["helm.sh/hook"] == ann["helm.sh/hook"]
    assert int(cm["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(ann["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    c = pod["containers"][0]
    assert c["args"][:2] == ["migrate", "up"]
    env = {e["name"]: e for e in c["env"]}
    assert c["args"][c["args"].index("--config") + 1] == env["HELIXAGENT_CONFIG"]["value"]
    assert {v["name"]: v for v in pod["volumes"]}["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert "Job" not in kinds(render({"migration": {"enabled": False}}))


def _in_flight_gauge() -> str:
    src = (ROOT / "src" / "helixagent" / "observability" / "metrics.py").read_text()
    names = re.findall(r'Gauge\(\s*"([a-z_]*in_flight[a-z_]*)"', src)
    assert len(names) == 1, names
    return names[0]


def test_hpa_scales_on_cpu_and_the_gateways_in_flight_gauge() -> None:
    objs = render()
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    dep = gateway_deployment(objs)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == _in_flight_gauge()
    assert metrics["Pods"]["pods"]["target"]["type"] == "AverageValue"
    # without autoscaling: a fixed replica count and no HPA
    objs = render({"autoscaling": {"enabled": False}, "replicaCount": 3})
    assert "HorizontalPodAutoscaler" not in kinds(objs)
    assert gateway_deployment(objs)["spec"]["replicas"] == 3
    # CPU only (no prometheus-adapter)
    hpa = one(render({"autoscaling": {"inFlight": {"enabled": False}}}), "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]


def test_pdb_and_service_select_the_gateway_pods() -> None:
    objs = render()
    labels = gateway_deployment(objs)["spec"]["template"]["metadata"]["labels"]
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    svc = one(objs, "Service")
    for selector in (pdb["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]):
        assert selector.items() <= labels.items()
    # the migration Job's pods are not gateway pods: the Service must not route to them, nor the PDB count them
    job_labels = migration_job(objs)["spec"]["template"]["metadata"]["labels"]
    for selector in (pdb["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                     gateway_deployment(objs)["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= job_labels.items()
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    pdb = one(render({"podDisruptionBudget": {"maxUnavailable": 1}}), "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}


def test_service_monitor_scrapes_the_metrics_port() -> None:
    assert "ServiceMonitor" not in kinds(render())  # optional: the CRD may not be installed
    objs = render(ALL_ON)
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"] and sm["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    # the job label is the Service's label named by jobLabel: the one the shipped alert rules select on
    job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
    alerts = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    assert f'up{{job="{job}"}}' in alerts
    (ep,) = sm["spec"]["endpoints"]
    port = next(p for p in svc["spec"]["ports"] if p["name"] == ep["port"])
    assert port["port"] == 9464 and ep["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep[key]), ep[key]
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmError) as exc:
        chart.render(_merge(BASE, _merge(ALL_ON, {"config": {"metrics": {"port": None}}})), name="demo")
    assert "config.metrics.port" in str(exc.value)


def test_notes_name_the_secret_and_the_probe() -> None:
    text = notes()
    assert f'"{SECRET}"' in text and "/readyz" in text and "helixagent_requests_in_flight" in text
