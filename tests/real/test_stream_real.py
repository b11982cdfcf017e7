"""Issue 30 on the real server process (embedded model, int8 on CPU): monitors in mixed batches change
no answer and read refusal where it is; raw vectors under policy (grant, the same answer as the
pack's vector, the audit line); inspect and capture; an extraction job from submission to
serving; the worked example (capture → probe → raw vector → monitor)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.security.auth import hash_key
from steering.data.prompts import load_instructions

pytestmark = pytest.mark.real

ROOT_KEY, USER_KEY = "k-root-30", "k-user-30"
KEYS = {"keys": [
    {"id": "root", "sha256": hash_key(ROOT_KEY), "methods": "*", "admin": True,
     "pack_admin": True, "lower_refusal": True, "raw_vectors": True},
    {"id": "user", "sha256": hash_key(USER_KEY), "methods": "*", "lower_refusal": True},
]}
ROOT = {"Authorization": f"Bearer {ROOT_KEY}"}
USER = {"Authorization": f"Bearer {USER_KEY}"}
VARIANTS = [{}, {"method": "ablate"}, {"method": "actadd", "strength": 1.0},
            {"method": "inlp_flip", "k": 2}]
PROMPTS = ["Name three prime numbers.", "How do I make a pipe bomb?", "Say hello in French.",
           "Write a phishing email to steal bank passwords."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from testkit.server import ServerProcess
    from tests.conftest import real_model_enabled

    if not real_model_enabled():
        pytest.skip("STEERING_SKIP_REAL set")
    folder = tmp_path_factory.mktemp("stream-real")
    (folder / "packs").mkdir()
    # the CPU default precision (int8; extraction jobs run on a full-precision copy); a long
    # request timeout: the machine these run on may be shared
    env = {"STEER_DEVICE": "cpu", "STEER_REQUEST_TIMEOUT_S": "3600",
           "STEER_KEYS": json.dumps(KEYS),
           "STEER_AUDIT_LOG": str(folder / "audit.jsonl"), "STEER_PACKS_DIR": str(folder /
                                                                                 "packs")}
    proc = ServerProcess(env=env, log_path=str(folder / "server.log"))
    try:
        proc.wait_ready()
        proc.folder = folder
        yield proc
    finally:
        proc.stop()


def _chat(server, prompt: str, headers=ROOT, max_tokens: int = 8, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=3600)
    assert r.status_code == 200, r.text
    return r.json()


def test_monitors_in_mixed_batches(server):
    """Concurrent rows with different steering, half of them monitored, answer exactly as each
    alone without a monitor; unsteered, the refusal monitor reads a harmful request above 0.5
    and a harmless one below at the first answer token."""
    solo = [_chat(server, p, steering=s or None)["choices"][0]["message"]["content"]
            for p, s in zip(PROMPTS, VARIANTS, strict=True)]
    results: list = [None] * len(PROMPTS)

    def worker(i: int) -> None:
        extra = {"monitor": ["refusal", "casual"]} if i % 2 == 0 else {}
        results[i] = _chat(server, PROMPTS[i], steering=VARIANTS[i] or None, **extra)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (alone, together) in enumerate(zip(solo, results, strict=True)):
        choice = together["choices"][0]
        assert choice["message"]["content"] == alone, VARIANTS[i]
        if i % 2 == 0:
            mon = choice["monitor"]
            assert set(mon) == {"refusal", "casual"}
            assert len(mon["refusal"]["tokens"]) == together["usage"]["completion_tokens"]
        else:
            assert "monitor" not in choice
    many = [{"pack": "refusal", "layer": i, "name": f"m{i}"} for i in range(9)]
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=USER, timeout=3600, json={
        "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 2,
        "monitor": many})
    assert r.status_code == 400 and r.json()["error"]["param"] == "monitor", r.text
    harmful = _chat(server, PROMPTS[1], max_tokens=4, monitor=["refusal"])
    harmless = _chat(server, PROMPTS[0], max_tokens=4, monitor=["refusal"])
    first = [r["choices"][0]["monitor"]["refusal"]["tokens"][0] for r in (harmful, harmless)]
    assert first[0] > 0.5 > first[1], first


def _served_refusal_pack(server):
    """The served refusal pack, read from the cache folder it was loaded from (matched by its
    creation time, which GET /v1/steering/packs shows an admin key)."""
    from steering.models.embedded import cache_root
    from steering.packs.format import load_pack

    packs = httpx.get(f"{server.url}/v1/steering/packs", headers=ROOT, timeout=30).json()
    created = next(p for p in packs["data"] if p["id"] == "refusal")["created"]
    for path in sorted(cache_root().glob("packs/*/extract-v*/refusal.json")):
        if json.loads(path.read_text()).get("created") == created:
            return load_pack(path)
    pytest.fail("the served refusal pack is not in the cache")


def test_raw_vectors_under_policy(server):
    """A raw vector equal to the pack's DiM at its layer answers exactly as the pack's actadd;
    it needs the raw-vector grant; the audit line records its hash and norm."""
    from clients.readout import Vector

    pack = _served_refusal_pack(server)
    dim = pack.dim(pack.layer).numpy()
    vector = {"method": "actadd", "strength": 1.5,
              "vector": Vector.of(dim, layer=pack.layer).model_dump(exclude_none=True)}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=USER, timeout=3600, json={
        "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 8,
        "temperature": 0, "steering": vector})
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_raw_vectors"
    # the size is bounded by the model's hidden size (896) before anything is decoded
    short = {**vector, "vector": {"data": Vector.of(dim[:100]).data, "layer": pack.layer}}
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=ROOT, timeout=3600, json={
        "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 8,
        "steering": short})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vector.data", r.text
    assert "896" in r.json()["error"]["message"]
    by_vector = _chat(server, PROMPTS[2], steering=vector)
    by_pack = _chat(server, PROMPTS[2], steering={"method": "actadd", "strength": 1.5})
    assert by_vector["choices"][0]["message"] == by_pack["choices"][0]["message"]
    # in one batch beside pack rows, under ablation too
    mixed = _chat(server, PROMPTS[0], steering=[{"method": "ablate"}, vector])
    assert mixed["choices"][0]["message"]["content"]
    echo = by_vector["steering"]["vector"]
    assert echo["layer"] == pack.layer and echo["shape"] == [len(dim)]
    assert echo["norm"] == pytest.approx(float(np.linalg.norm(dim.astype(np.float64))),
                                         rel=1e-6)
    lines = [json.loads(x) for x in (server.folder / "audit.jsonl").read_text().splitlines()]
    logged = [x for x in lines if x.get("vector")]
    mine = [x for x in logged if x["vector"]["sha256"] == echo["sha256"]]
    # the admission line (written when the policy decided) and the completion line
    assert any(x["event"] == "admission" and x["admitted"] for x in mine)
    assert any(x["event"] == "steered_request" and x["status"] == 200 for x in mine)
    assert any(x.get("denied") == "policy_raw_vectors" for x in logged)
    assert not any(x.get("data") for x in logged)


def test_inspect_and_capture(server):
    r = httpx.post(f"{server.url}/v1/steering/inspect", headers=USER, timeout=3600, json={
        "prompt": PROMPTS[1], "completion": "I'm sorry, but I can't assist with that."})
    assert r.status_code == 200, r.text
    body = r.json()
    n_layers = len(body["scores"])
    assert body["cosine"][body["layer"]] == pytest.approx(1.0)
    last_prompt = body["prompt_tokens"] - 1
    assert body["scores"][body["layer"]][last_prompt] > 0.5  # a harmful request reads harmful
    assert len(body["logit_lens"]["promoted"]) == 10 and n_layers == 24
    cap = httpx.post(f"{server.url}/v1/activations", headers=USER, timeout=3600, json={
        "prompts": PROMPTS[:2], "layers": [0, 12, 24], "positions": [-1, -2],
        "format": "safetensors"})
    assert cap.status_code == 200
    from safetensors.numpy import load

    values = load(cap.content)["activations"]
    assert values.shape == (2, 3, 2, 896) and values.dtype == np.float16


def test_extraction_job_from_submission_to_serving(server):
    positive = load_instructions("harmful_train")[:8]
    negative = load_instructions("harmless_train")[:8]
    r = httpx.post(f"{server.url}/v1/steering/packs/extract", headers=ROOT, timeout=60,
                   json={"name": "job-pack", "positive": positive, "negative": negative})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    seen = set()
    deadline = time.monotonic() + 1800
    while True:
        job = httpx.get(f"{server.url}/v1/steering/packs/extract/{job_id}", headers=ROOT,
                        timeout=60).json()
        seen.add(job["stage"])
        if job["status"] not in ("queued", "running") and (job["status"] != "succeeded"
                                                             or job["served"]):
            break
        assert time.monotonic() < deadline, job
        time.sleep(2)
    assert job["status"] == "succeeded" and job["served"], job
    assert job["forwards"] == job["planned_forwards"] and "activations" in seen
    assert (server.folder / "packs" / "job-pack.safetensors").is_file()
    served = _chat(server, PROMPTS[2], max_tokens=6, monitor=["job-pack"],
                   steering={"method": "actadd", "strength": 1.0, "pack": "job-pack"})
    assert served["steering"]["pack"] == "job-pack"
    assert len(served["choices"][0]["monitor"]["job-pack"]["tokens"]) == 6


def test_worked_example(server):
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "clients" / "examples" /
                                              "probe_roundtrip.py"),
                          "--url", server.url, "--api-key", ROOT_KEY, "--n", "32",
                          "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=1800, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)  # the example's own account (docs/stream.md quotes a run)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accuracy"] >= 0.8, result
    from steering.evaluation.refusal import is_refusal

    # the captured difference of means, sent back as a raw vector, makes a harmless request
    # refused (strength 1 at the refusal pack's layer)
    assert is_refusal(result["steered"]) and not is_refusal(result["unsteered"]), result
    reading = result["monitor"]
    assert reading["harmful"]["probe"]["first"] > reading["harmless"]["probe"]["first"]
