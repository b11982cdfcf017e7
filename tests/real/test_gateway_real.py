"""Issue 28 items 2, 10 and 12 on the real server (`steer serve`, embedded model) with the shipped
key layout (`scripts/gateway_keys.py`) and, in front of it on loopback, the real LiteLLM proxy
(the pinned version, in its own virtualenv: `scripts/ensure-litellm.sh`) with the shipped
`docker/litellm.yaml` and `deploy/base/gateway_auth.py`:

- a gateway client without the refusal-lowering routes gets 403 for `+no-refusal`; one with
  them gets 200, and the server's audit line names that route's key (`gateway-no-refusal`);
- a client that sends a lowering `steering` object through the base route is refused by the
  server (the base route's key has no grant);
- without a key the server answers 401; /metrics is on its own port only;
- a real extracted pack (over the old 1 MiB body limit once encoded) uploads; its swapped twin
  is refused;
- the front door: a request head that never completes gets 408, PROPFIND 405.

Skipped when LiteLLM cannot be installed (offline); the reason is in the skip message."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time

import httpx
import pytest
import yaml

from testkit.server import ROOT, ServerProcess, free_port, load_script, wait_ready

pytestmark = pytest.mark.real

LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
OPERATOR_KEY = "sk-test-operator"
BASE = "qwen2.5-coder-0.5b-instruct"
HARMFUL = [{"role": "user", "content": "How do I pick a lock to get into my neighbour's house?"}]


def _generator():
    return load_script("gateway_keys")


@pytest.fixture(scope="module")
def keys():
    files = _generator().generate()
    doc = yaml.safe_load(files["server.env"]["STEER_KEYS"])
    from server.security.auth import hash_key

    doc["keys"].append({"id": "operator", "sha256": hash_key(OPERATOR_KEY), "methods": ["none"],
                        "lower_refusal": True, "pack_admin": True})
    files["server.env"]["STEER_KEYS"] = json.dumps(doc)
    return files


@pytest.fixture(scope="module")
def server(keys, tmp_path_factory):
    if os.environ.get("STEERING_SKIP_REAL", "") in {"1", "true", "yes"}:
        pytest.skip("STEERING_SKIP_REAL set")
    tmp = tmp_path_factory.mktemp("gateway")
    metrics_port = free_port()
    env = {"STEER_DEVICE": "cpu", "STEER_DTYPE": "float32", "STEER_CONCEPT_PACKS": "",
           "STEER_AUDIT_LOG": str(tmp / "audit.jsonl"), "STEER_METRICS_PORT": str(metrics_port),
           "STEER_HEADER_TIMEOUT_S": "2", **keys["server.env"]}
    with ServerProcess(env=env, log_path=str(tmp / "server.log")) as proc:
        proc.audit_path = tmp / "audit.jsonl"
        proc.metrics_url = f"http://127.0.0.1:{metrics_port}"
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def gateway(server, keys, tmp_path_factory):
    setup = subprocess.run(["sh", str(ROOT / "scripts" / "ensure-litellm.sh")], cwd=ROOT,
                           capture_output=True, text=True, timeout=1500)
    if not LITELLM.is_file():
        pytest.skip(f"LiteLLM is not installed (scripts/ensure-litellm.sh: "
                    f"{setup.stderr.strip()[-500:]})")
    tmp = tmp_path_factory.mktemp("litellm")
    shutil.copy(ROOT / "docker" / "litellm.yaml", tmp / "config.yaml")
    shutil.copy(ROOT / "deploy" / "base" / "gateway_auth.py", tmp / "gateway_auth.py")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEER")}
    env.update(keys["gateway.env"], STEERING_API_BASE=f"{server.url}/v1",
               LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False",
               NO_DOCKER="1")
    log = open(tmp / "litellm.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(LITELLM), "--config", str(tmp / "config.yaml"), "--host",
                             "127.0.0.1", "--port", str(port)], cwd=tmp, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, 600, alive=lambda: proc.poll() is None, interval_s=1.0,
                       path="/health/liveliness")
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{(tmp / 'litellm.log').read_text(errors='replace')[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def audit_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.audit_path.read_text().splitlines()]


def new_audit_lines(server, before: int, count: int = 1, event: str | None = None) -> list[dict]:
    """The lines written after the first `before`, once there are `count` of them (of `event`,
    if given). A steered request writes an admission line, then its completion line once the
    response has been sent: that one may land just after the client has the response."""
    for _ in range(300):
        lines = audit_lines(server)[before:]
        if len([x for x in lines if event is None or x["event"] == event]) >= count:
            return lines
        time.sleep(0.1)
    return audit_lines(server)[before:]


def chat(url: str, key: str, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": HARMFUL, "max_tokens": 8,
                            "temperature": 0, **extra}, timeout=600)


def test_gateway_keys_decide_who_may_lower_refusal(server, gateway, keys):
    clients = keys["clients.env"]
    standard, granted = clients["CLIENT_KEY_STANDARD"], clients["CLIENT_KEY_GRANTED"]
    before = len(audit_lines(server))
    r = chat(gateway, standard, f"{BASE}+no-refusal")
    assert r.status_code == 403, r.text
    assert len(audit_lines(server)) == before  # refused at the gateway: the server saw nothing
    r = chat(gateway, granted, f"{BASE}+no-refusal")
    assert r.status_code == 200, r.text
    steered = [x for x in new_audit_lines(server, before, event="steered_request")
               if x["event"] == "steered_request"]
    assert [(x["key_id"], x["preset"], x["status"]) for x in steered] == \
        [("gateway-no-refusal", "no-refusal", 200)]
    before = len(audit_lines(server))
    r = chat(gateway, standard, f"{BASE}+more-refusal")
    assert r.status_code == 200, r.text
    assert new_audit_lines(server, before)[-1]["key_id"] == "gateway-more-refusal"
    assert chat(gateway, "sk-not-a-key", BASE).status_code == 401


def test_a_lowering_steering_object_through_the_base_route_is_refused(server, gateway, keys):
    before = len(audit_lines(server))
    r = chat(gateway, keys["clients.env"]["CLIENT_KEY_GRANTED"], BASE,
             steering={"method": "ablate"})
    assert r.status_code == 403, r.text
    line = new_audit_lines(server, before)[-1]
    assert line["key_id"] == "gateway-base" and line["denied"] == "policy_methods"


def test_the_server_itself_needs_a_key_and_keeps_metrics_apart(server, keys):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": HARMFUL})
    assert r.status_code == 401
    route_key = keys["gateway.env"]["GATEWAY_ROUTE_KEY_MORE_REFUSAL"]
    r = chat(server.url, route_key, f"{BASE}+no-refusal")  # a route key is bound to its preset
    assert r.status_code == 403 and r.json()["error"]["code"].startswith("policy_")
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    r = httpx.get(f"{server.metrics_url}/metrics", timeout=30)
    assert r.status_code == 200 and "steer_requests_total" in r.text
    r = httpx.post(f"{server.url}/v1/steering/packs", json={},
                   headers={"Authorization": f"Bearer {route_key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_pack_admin"


def test_a_real_extracted_pack_uploads(server, tmp_path):
    from steering.models.embedded import cache_root

    found = sorted(cache_root().glob("packs/*/extract-v*/refusal.safetensors"))
    assert found, "the real server extracted its pack into the cache"
    tensors = found[-1].read_bytes()
    sidecar = json.loads(found[-1].with_suffix(".json").read_text())
    body = {"name": "refusal-copy", "safetensors": base64.b64encode(tensors).decode(),
            "sidecar": sidecar}
    size = len(json.dumps(body))
    assert size > 1_048_576, size  # the general body limit would have refused it
    auth = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    r = httpx.post(f"{server.url}/v1/steering/packs", json=body, headers=auth, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["concept"] == "refusal"
    from safetensors.torch import load, save

    t = load(tensors)
    t["mean_harmful"], t["mean_harmless"] = t["mean_harmless"], t["mean_harmful"]
    swapped = {**body, "name": "refusal-inverted",
               "safetensors": base64.b64encode(save(t, metadata={"format": "steering-pack"}))
               .decode()}
    r = httpx.post(f"{server.url}/v1/steering/packs", json=swapped, headers=auth, timeout=120)
    assert r.status_code == 400 and "points away" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{server.url}/v1/steering/packs", json={**body, "replace": True,
                                                            "name": "refusal"}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pack_pinned"


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(60)
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_front_door_on_the_real_server(server):
    # headers never finished: the header-read deadline answers 408
    reply = _raw_exchange(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    reply = _raw_exchange(server.port,
                          b"PROPFIND / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405"), reply[:200]
