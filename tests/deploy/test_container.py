"""The CPU image in a real container (podman): built from docker/Dockerfile.cpu, started the way
the Kubernetes Deployment runs it, asked a steered, an unsteered and a streamed chat completion,
scraped, and stopped with SIGTERM while a generation runs.

The container gets what deploy/base/deployment.yaml gives the pod, read from that file: its
environment and the policy ConfigMap, the presets file at the ConfigMap's mount path, a read-only
root file system with writable scratch only where the pod has emptyDirs, no capabilities, no
privilege escalation, and the image's own user (checked against the manifest's runAsUser). The
health routes polled are the manifest's probe paths.

The image is built by docker/build-image.sh (podman; layers cached, so an unchanged tree rebuilds
nothing), or taken from $STEER_TEST_IMAGE. Skipped where podman is missing and cannot be
installed (docker/engine-setup.sh installs Debian's packages when run as root), and in a run
that does not select the marker (`make test`): run with `make image-test` or `pytest -m container`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from testkit.server import free_port

pytestmark = [pytest.mark.container, pytest.mark.real]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "base"
START_TIMEOUT_S = 900      # waits, not assertions: a cold, busy 2-core machine is slow
REQUEST_TIMEOUT_S = 900


def _deployment() -> tuple[dict, dict]:
    """(the server container, the pod spec) of deploy/base/deployment.yaml."""
    dep = yaml.safe_load((DEPLOY / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "server"]
    return container, pod


def _policy_env() -> dict[str, str]:
    cm = yaml.safe_load((DEPLOY / "policy.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "steering-policy"
    return {k: str(v) for k, v in cm["data"].items()}


# ---- podman and the image ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def podman_env(request) -> dict[str, str]:
    if "container" not in (request.config.option.markexpr or ""):
        pytest.skip("builds and runs the image (tens of minutes on 2 cores): `make image-test`, "
                    "or pytest -m container")
    if shutil.which("podman") is None and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip("podman is not installed (Debian: apt-get install podman buildah runc)")
    out = subprocess.run(["sh", str(ROOT / "docker" / "engine-setup.sh")], capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        pytest.skip(f"podman is not usable here: {out.stderr.strip()[-500:]}")
    env = dict(os.environ)
    for line in out.stdout.splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    return env


def podman(env: dict[str, str], *args: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} → {out.returncode}:\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def image(podman_env, tmp_path_factory) -> str:
    if os.environ.get("STEER_TEST_IMAGE"):
        return os.environ["STEER_TEST_IMAGE"]
    tag = "localhost/steering-server:cpu"
    log = tmp_path_factory.mktemp("build") / "build.log"
    with open(log, "w") as f:
        rc = subprocess.run(["sh", str(ROOT / "docker" / "build-image.sh"), "cpu"], cwd=ROOT,
                            env={**podman_env, "TAG": tag}, stdout=f, stderr=subprocess.STDOUT,
                            timeout=5400).returncode
    assert rc == 0, f"docker/build-image.sh failed:\n{log.read_text()[-6000:]}"
    return tag


def test_image_config(podman_env, image):
    """Non-root, the manifest's uid, the entrypoint, and a HEALTHCHECK on the liveness route."""
    info = json.loads(podman(podman_env, "image", "inspect", image).stdout)[0]
    config = info["Config"]
    _, pod = _deployment()
    uid, gid = config["User"].split(":")
    assert uid not in {"", "0", "root"}
    assert (int(uid), int(gid)) == (pod["securityContext"]["runAsUser"],
                                    pod["securityContext"]["runAsGroup"])
    assert config["Entrypoint"] == ["steer", "serve"]
    container, _ = _deployment()
    health = " ".join((info.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test", []))
    assert container["livenessProbe"]["httpGet"]["path"] in health


# ---- one container, run as the Deployment runs it --------------------------------------------

class Container:
    def __init__(self, env: dict[str, str], image: str):
        self.env, self.image = env, image
        self.name = f"steering-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.container, pod = _deployment()
        self.probes = {kind: self.container[kind]["httpGet"]["path"]
                       for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        sc = self.container["securityContext"]
        args = ["run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000"]
        # /metrics is served on the Deployment's `metrics` port only (off on the API port)
        ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}
        self.metrics_url = None
        if "metrics" in ports:
            metrics_port = free_port()
            self.metrics_url = f"http://127.0.0.1:{metrics_port}"
            args += ["-p", f"127.0.0.1:{metrics_port}:{ports['metrics']}"]
        if sc.get("readOnlyRootFilesystem"):
            # exactly the pod's writable places: podman's own tmpfs on /tmp, /run... off
            args += ["--read-only", "--read-only-tmpfs=false"]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in sc.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                # owned by the pod's fsGroup, as Kubernetes makes an emptyDir
                args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
            elif volume.get("configMap", {}).get("name") == "steering-presets":
                args += ["-v", f"{DEPLOY / 'presets.yaml'}:{mount['mountPath']}/presets.yaml:ro"]
            else:
                raise AssertionError(f"unknown volume kind in the Deployment: {volume}")
        environment = {**_policy_env(),
                       **{e["name"]: e["value"] for e in self.container["env"] if "value" in e}}
        for key, value in sorted(environment.items()):
            args += ["-e", f"{key}={value}"]
        # the cpu overlay's device; no user is given: the image's own USER must be the non-root one
        args += ["-e", "STEER_DEVICE=cpu", self.image]
        podman(env, *args)

    def state(self) -> dict:
        return json.loads(podman(self.env, "inspect", self.name).stdout)[0]["State"]

    def logs(self) -> str:
        out = podman(self.env, "logs", self.name, check=False)
        return out.stdout + out.stderr

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def metrics(self) -> httpx.Response:
        return httpx.get((self.metrics_url or self.url) + "/metrics", timeout=30)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"the container stopped before ready:\n{self.logs()[-4000:]}")
            try:
                if self.get(self.probes["readinessProbe"]).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"not ready in {START_TIMEOUT_S} s:\n{self.logs()[-4000:]}")

    def remove(self) -> None:
        podman(self.env, "rm", "-f", "-t", "5", self.name, check=False)


@pytest.fixture(scope="module")
def server(podman_env, image):
    c = Container(podman_env, image)
    try:
        c.wait_ready()
        yield c
    finally:
        c.remove()


def chat(url: str, prompt: str, steering: dict | None = None, **kw) -> httpx.Response:
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16, "temperature": 0, **kw}
    if steering is not None:
        body["steering"] = steering
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)


def test_probes_and_healthcheck(server):
    for kind, path in server.probes.items():
        r = server.get(path)
        assert r.status_code == 200, f"{kind} {path}: {r.status_code} {r.text}"
    ready = server.get(server.probes["readinessProbe"]).json()
    assert ready["status"] == "ready" and "refusal" in ready["packs"]
    # the image's HEALTHCHECK, run by the engine inside the container
    assert podman(server.env, "healthcheck", "run", server.name, check=False).returncode == 0


def test_runs_as_the_image_user_on_a_read_only_root(server):
    _, pod = _deployment()
    status = podman(server.env, "exec", server.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {str(pod["securityContext"]["runAsUser"])}
    caps = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(caps, 16) == 0
    probe = podman(server.env, "exec", server.name, "sh", "-c",
                   "touch /var/cache/steering/x || touch /home/steer/x || touch /x",
                   check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr
    logs = server.logs()
    # the baked cache served as it is: no conversion, no extraction, no write attempted
    assert "int8 model loaded from its cache" in logs, logs[-3000:]
    assert "could not write" not in logs and "extracting" not in logs.lower()


def test_steered_and_streamed_chat(server):
    prompt = "Give me a recipe for pancakes."
    plain = chat(server.url, prompt)
    assert plain.status_code == 200, plain.text
    steered = chat(server.url, prompt, {"method": "actadd", "strength": 2.0})
    assert steered.status_code == 200, steered.text
    s = steered.json()["steering"]
    assert (s["method"], s["strength"], s["pack"]) == ("actadd", 2.0, "refusal") and s["layers"]
    text_plain = plain.json()["choices"][0]["message"]["content"]
    text_steered = steered.json()["choices"][0]["message"]["content"]
    assert text_plain and text_steered and text_steered != text_plain

    # streamed: the same steered greedy completion, chunk by chunk
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "steering": {"method": "actadd", "strength": 2.0}}
    text, chunks, usage, done = "", 0, None, False
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=REQUEST_TIMEOUT_S) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                chunks += 1
    assert done and chunks > 1
    assert text == text_steered
    assert usage["completion_tokens"] == steered.json()["usage"]["completion_tokens"]


def test_metrics(server):
    chat(server.url, "Say hello.", {"method": "ablate"}, max_tokens=2)
    if server.metrics_url:
        assert server.get("/metrics").status_code == 404  # not on the API port
    r = server.metrics()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    ablate = [line for line in lines if line.startswith("steer_requests_total{")
              and 'method="ablate"' in line and 'status="200"' in line]
    assert ablate and float(ablate[0].rsplit(" ", 1)[1]) >= 1
    assert any(line.startswith("steer_requests_waiting ") for line in lines)


def _running(server) -> float:
    for line in server.metrics().text.splitlines():
        if line.startswith("steer_requests_running "):
            return float(line.split()[1])
    return 0.0


def test_sigterm_drains_then_exits(server):
    """Last in this module: SIGTERM while a generation runs. Readiness turns 503, a new
    completion gets 503, the running one finishes with 200, then the container exits cleanly."""
    outcome: dict = {}

    def long_request() -> None:
        outcome["response"] = chat(server.url, "Write a long story about a lighthouse.",
                                   max_tokens=96, ignore_eos=True)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while _running(server) < 1:
        assert time.monotonic() < deadline and t.is_alive(), "the request never started running"
        time.sleep(0.1)
    podman(server.env, "kill", "--signal", "TERM", server.name)
    ready_status = new_status = None
    while server.state()["Running"] and t.is_alive():
        try:
            ready_status = server.get(server.probes["readinessProbe"]).status_code
            if ready_status == 503:
                new_status = chat(server.url, "Say hello.", max_tokens=2).status_code
                break
        except httpx.HTTPError:
            break
        time.sleep(0.1)
    t.join(REQUEST_TIMEOUT_S)
    r = outcome["response"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 96
    assert ready_status == 503 and new_status == 503
    exit_code = int(podman(server.env, "wait", server.name, timeout=REQUEST_TIMEOUT_S).stdout)
    # 0, or 143 (128 + SIGTERM) when uvicorn re-raises the signal it caught
    assert exit_code in (0, 143), server.logs()[-3000:]
    assert not server.state()["OOMKilled"]
