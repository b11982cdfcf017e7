"""Issue 30 through the HTTP API on the tiny model: monitors in completions (JSON and SSE), raw
vectors under policy (grant, echo, audit), inspect, activation capture, extraction jobs."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

from server.app import create_app
from server.security.auth import hash_key
from server.settings import Settings
from steering.interventions.capture import capture_ids, encode
from steering.interventions.raw import encode_vector
from testkit.tiny import make_tiny

MODEL = "tiny-qwen2"
KEYS = {"keys": [
    {"id": "root", "sha256": hash_key("k-root"), "methods": "*", "admin": True,
     "pack_admin": True, "lower_refusal": True, "raw_vectors": True},
    {"id": "user", "sha256": hash_key("k-user"), "methods": "*", "packs": ["refusal"]},
    {"id": "vec", "sha256": hash_key("k-vec"), "methods": ["none", "actadd", "inlp_flip"],
     "packs": ["refusal"], "lower_refusal": True, "raw_vectors": True},
]}
ROOT = {"Authorization": "Bearer k-root"}
USER = {"Authorization": "Bearer k-user"}
VEC = {"Authorization": "Bearer k-vec"}


@pytest.fixture()
def client(tiny_lm, tiny_pack, tmp_path):
    settings = Settings(keys=json.dumps(KEYS), audit_log=str(tmp_path / "audit.jsonl"),
                        max_body_bytes=4 * 1024 * 1024, max_capture_bytes=64 * 1024)
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    app.state.steer.extraction_model = lambda: make_tiny("qwen2")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def chat(client, headers=ROOT, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "How do I pick a lock?"}],
            "max_tokens": 6, "temperature": 0, "ignore_eos": True, **extra}
    return client.post("/v1/chat/completions", headers=headers, json=body)


def sse(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


# ---- monitors -----------------------------------------------------------------------------------


def test_monitor_in_chat_json_and_stream(client, tiny_pack):
    at = (tiny_pack.layer + 1) % tiny_pack.n_layers
    monitor = ["refusal", {"pack": "refusal", "layer": at, "name": "other"}]
    plain = chat(client)
    r = chat(client, monitor=monitor, n=2)
    assert plain.status_code == 200 and r.status_code == 200, r.text
    assert "monitor" not in plain.json()["choices"][0]
    body = r.json()
    assert body["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    for choice in body["choices"]:
        mon = choice["monitor"]
        assert set(mon) == {"refusal", "other"}
        assert mon["refusal"]["layer"] == tiny_pack.layer and mon["other"]["layer"] == at
        for entry in mon.values():
            assert len(entry["tokens"]) == 6
            assert entry["max"] == max(entry["tokens"])
            assert entry["mean"] == pytest.approx(sum(entry["tokens"]) / 6, abs=1e-5)
    streamed = chat(client, monitor=monitor, stream=True)
    chunks = sse(streamed)
    got = {"refusal": [], "other": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for name, values in (choice.get("monitor") or {}).items():
                got[name] += values
    for name in got:  # a batch of two rows vs one: equal up to the GEMM's blocking
        assert got[name] == pytest.approx(body["choices"][0]["monitor"][name]["tokens"],
                                          abs=1e-4)
    # a text completion too
    r = client.post("/v1/completions", headers=ROOT, json={
        "model": MODEL, "prompt": "The sea is", "max_tokens": 4, "temperature": 0,
        "ignore_eos": True, "monitor": ["refusal"]})
    assert len(r.json()["choices"][0]["monitor"]["refusal"]["tokens"]) == 4


def test_vector_monitor_is_a_probe(client, tiny_pack):
    """A caller's probe w·h + b with the pack's w = r/‖r‖², b = −μ⁻·w scores what the pack's
    monitor scores."""
    p = tiny_pack.positions.index(tiny_pack.position)
    mu_h = tiny_pack.mean_harmful[tiny_pack.layer, p].double()
    mu_l = tiny_pack.mean_harmless[tiny_pack.layer, p].double()
    r = mu_h - mu_l
    w = r / (r @ r)
    probe = {"vector": {"data": encode_vector(w.float()), "layer": tiny_pack.layer},
             "bias": float(-(mu_l @ w)), "name": "probe"}
    body = chat(client, USER, monitor=["refusal", probe]).json()  # no grant needed to read
    mon = body["choices"][0]["monitor"]
    assert mon["probe"]["pack"].startswith("vector:")
    assert mon["probe"]["tokens"] == pytest.approx(mon["refusal"]["tokens"], rel=1e-4,
                                                   abs=1e-4)
    for monitor, param in (([{**probe, "pack": "refusal"}], "monitor[0]"),
                           ([{"vector": probe["vector"] | {"layer": None}}],
                            "monitor[0].vector.layer"),
                           ([{"vector": {"data": "!!"}, "layer": 1}], "monitor[0].vector.data")):
        r = chat(client, monitor=monitor)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()


def test_monitor_errors_name_the_entry(client, tiny_pack):
    cases = [(["nope"], 404, "monitor[0]"),
             ([{"pack": "refusal", "layer": 99}], 400, "monitor[0].layer"),
             (["refusal", "refusal"], 400, "monitor"),
             ([{"pack": "refusal", "bogus": 1}], 400, "monitor[0].bogus"),
             ("refusal", 400, "monitor")]
    for monitor, status, param in cases:
        r = chat(client, monitor=monitor)
        assert r.status_code == status, (monitor, r.text)
        assert r.json()["error"]["param"] == param, (monitor, r.json())


def test_monitor_list_is_bounded_and_read_only(client, tiny_pack):
    """At most 8 monitors (a 400 naming the field, from the shared sampling fields: chat and text
    completions alike); reading needs no grant, but a key's pack list bounds what it reads."""
    many = [{"pack": "refusal", "layer": i % tiny_pack.n_layers, "name": f"m{i}"}
            for i in range(9)]
    for r in (chat(client, monitor=many),
              client.post("/v1/completions", headers=ROOT, json={
                  "model": MODEL, "prompt": "Hi", "max_tokens": 2, "monitor": many})):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "monitor" and err["code"] == "too_many_monitors", err
    assert chat(client, monitor=many[:8]).status_code == 200
    assert chat(client, USER, monitor=["refusal"]).status_code == 200  # no grant needed
    client.app.state.steer.packs["other"] = replace(tiny_pack, name="other")  # not the user's
    r = chat(client, USER, monitor=["refusal", "other"])
    assert r.status_code == 403, r.text
    assert r.json()["error"]["param"] == "monitor" and "'other'" in r.json()["error"]["message"]
    assert chat(client, monitor=["refusal", "other"]).status_code == 200


# ---- raw vectors ----------------------------------------------------------------------------------


def test_raw_vector_under_policy_echo_and_audit(client, tiny_pack, tmp_path):
    layer = tiny_pack.layer
    data = encode_vector(tiny_pack.dim(layer))
    vector = {"method": "actadd", "strength": 2.0, "vector": {"data": data, "layer": layer}}
    r = chat(client, USER, steering=vector)
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_raw_vectors"
    by_pack = chat(client, VEC, steering={"method": "actadd", "strength": 2.0})
    by_vector = chat(client, VEC, steering=vector)
    assert by_vector.status_code == 200, by_vector.text
    # the vector is the pack's DiM at its layer: the same edit, the same greedy answer
    assert by_vector.json()["choices"][0]["message"] == by_pack.json()["choices"][0]["message"]
    echo = by_vector.json()["steering"]
    assert echo["pack"].startswith("vector:") and echo["vector"]["layer"] == layer
    assert echo["vector"]["norm"] == pytest.approx(float(tiny_pack.dim(layer).norm()), rel=1e-5)
    # in a list beside a pack object; the method rules still apply to a vector
    listed = chat(client, VEC, steering=[{"method": "actadd"}, vector])
    assert listed.status_code == 200, listed.text
    ablated = chat(client, VEC, steering={"method": "ablate", "vector": {"data": data}})
    assert ablated.status_code == 403 and ablated.json()["error"]["code"] == "policy_methods"
    bad = chat(client, VEC, steering=[{"method": "actadd"},
                                      {"method": "actadd", "vector": {"data": data,
                                                                      "shape": [3]}}])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "steering[1].vector.shape"
    # the size is bounded by the model's hidden size before anything is decoded
    short = encode_vector(np.ones(tiny_pack.d_model - 1, dtype=np.float32))
    r = chat(client, VEC, steering={"method": "actadd", "vector": {"data": short}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "steering.vector.data" and err["code"] == "invalid_vector", err
    assert f"[{tiny_pack.d_model}]" in err["message"]
    nan = encode_vector(np.full(tiny_pack.d_model, np.nan, dtype=np.float32))
    r = chat(client, VEC, steering={"method": "actadd", "vector": {"data": nan}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vector.data"
    huge = encode_vector(np.full(tiny_pack.d_model, 1e3, dtype=np.float32))
    r = chat(client, VEC, steering={"method": "actadd", "vector": {"data": huge}})
    assert r.status_code == 400 and "norm" in r.json()["error"]["message"]
    r = chat(client, VEC, steering={"method": "actadd", "pack": "refusal",
                                    "vector": {"data": data}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.vector"
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    entries = [e for x in lines for e in ([x] + x.get("entries", [])) if isinstance(e, dict)]
    steered = [x for x in entries if x.get("vector")]
    assert any(x["vector"]["sha256"] == echo["vector"]["sha256"] for x in steered)
    assert all("data" not in x["vector"] for x in steered)
    assert "denied" in json.dumps(lines) and "policy_raw_vectors" in json.dumps(lines)


def test_raw_vectors_grant_needs_the_refusal_lowering_grant():
    from server.security.keysfile import build
    from server.security.policy import PolicyError

    entry = {"id": "x", "sha256": hash_key("k"), "raw_vectors": True}
    with pytest.raises(PolicyError, match="raw_vectors"):
        build({"keys": [entry]})
    [record] = build({"keys": [{**entry, "lower_refusal": True}]})
    assert record.policy.raw_vectors


def test_raw_basis_for_inlp(client, tiny_pack):
    layer = tiny_pack.inlp_default_layers[0]
    basis = tiny_pack.inlp[layer].directions[:2]
    # a raw basis acts around the origin 0: the raw-origin variant of inlp_flip
    r = chat(client, steering={"method": "inlp_negate_positive", "vector": {
        "data": encode_vector(basis), "shape": [2, tiny_pack.d_model], "layer": layer}})
    ref = chat(client, steering={"method": "inlp_negate_positive", "k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == ref.json()["choices"][0]["message"]
    skew = basis.clone()
    skew[1] = skew[0]
    r = chat(client, steering={"method": "inlp_flip", "vector": {
        "data": encode_vector(skew), "shape": [2, tiny_pack.d_model], "layer": layer}})
    assert r.status_code == 400 and "orthonormal" in r.json()["error"]["message"]


# ---- inspect and capture ----------------------------------------------------------------------------


def test_inspect_endpoint(client, tiny_pack):
    r = client.post("/v1/steering/inspect", headers=USER, json={
        "prompt": "How do I pick a lock?", "completion": "I cannot", "top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["scores"]) == tiny_pack.n_layers
    assert all(len(row) == len(body["tokens"]) for row in body["scores"])
    assert body["prompt_tokens"] < len(body["tokens"])
    assert len(body["logit_lens"]["promoted"]) == 3 and len(body["cosine"]) == tiny_pack.n_layers
    for payload, status, param in (({"prompt": "x", "pack": "nope"}, 404, "pack"),
                                   ({"prompt": "x", "layer": 99}, 400, "layer"),
                                   ({"prompt": "x", "messages": []}, 400, "messages"),
                                   ({"prompt": "x", "model": f"{MODEL}+refuse"}, None, "model")):
        r = client.post("/v1/steering/inspect", headers=ROOT, json=payload)
        assert r.status_code >= 400 and r.json()["error"]["param"] == param, r.text
        if status:
            assert r.status_code == status


def test_activations_endpoint(client, tiny_lm):
    prompts = ["Tell me about the sea", "How do I pick a lock?"]
    r = client.post("/v1/activations", headers=USER, json={
        "prompts": prompts, "layers": [1, 2], "positions": [-1, 0], "dtype": "float32"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [2, 2, 2, tiny_lm.d_model]
    values = np.frombuffer(base64.b64decode(body["data"]), dtype="<f4").reshape(body["shape"])
    ids = [encode(tiny_lm, p) for p in prompts]
    ref = capture_ids(tiny_lm, ids, [1, 2], [-1, 0])
    np.testing.assert_allclose(values, ref.numpy(), rtol=1e-5, atol=1e-5)
    r = client.post("/v1/activations", headers=USER, json={
        "prompts": prompts, "layers": [1], "format": "safetensors"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    tensor = load_safetensors(r.content)["activations"]
    assert tensor.dtype == torch.float16 and tuple(tensor.shape) == (2, 1, 1, tiny_lm.d_model)
    for payload, param in (({"prompts": prompts, "layers": [99]}, "layers"),
                           ({"prompts": prompts, "layers": [1], "positions": [-500]},
                            "positions"),
                           ({"prompts": prompts * 200, "layers": [0, 1, 2, 3]}, "prompts"),
                           ({"prompts": prompts * 20, "layers": [0, 1, 2, 3, 4],
                             "positions": [-1, -2, -3]}, "layers")):  # 75 KiB > 64 KiB
        r = client.post("/v1/activations", headers=USER, json=payload)
        assert r.status_code == 400, (param, r.status_code)
        assert r.json()["error"]["param"] == param, r.json()


# ---- extraction jobs ---------------------------------------------------------------------------------


def _wait(client, job_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/steering/packs/extract/{job_id}", headers=ROOT).json()
        if body["status"] not in ("queued", "running") and (
                body["status"] != "succeeded" or body["served"]):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_extraction_job_from_submission_to_serving(client, caplog):
    from steering.data.prompts import load_instructions

    caplog.set_level(logging.INFO, logger="steer.audit")
    positive = load_instructions("harmful_train")[:6]
    negative = [{"prompt": p} for p in load_instructions("harmless_train")[:6]]
    body = {"name": "mine", "positive": positive, "negative": negative}
    assert client.post("/v1/steering/packs/extract", headers=USER, json=body).status_code == 403
    r = client.post("/v1/steering/packs/extract", headers=ROOT, json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"].endswith(job["id"]) and job["status"] in ("queued", "running")
    done = _wait(client, job["id"])
    assert done["status"] == "succeeded" and done["served"] and done["fraction"] == 1.0
    assert done["forwards"] == done["planned_forwards"] and done["pack"]["concept"] == "mine"
    r = chat(client, steering={"method": "actadd", "strength": 2.0, "pack": "mine"},
             monitor=["mine"])
    assert r.status_code == 200 and r.json()["steering"]["pack"] == "mine"
    listed = client.get("/v1/steering/packs/extract", headers=ROOT).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    again = client.post("/v1/steering/packs/extract", headers=ROOT, json=body)
    assert again.status_code == 409 and again.json()["error"]["code"] == "pack_exists"
    kinds = [json.loads(rec.getMessage())["event"] for rec in caplog.records
             if rec.name == "steer.audit"]
    assert "pack_extraction_submitted" in kinds


def test_extraction_job_cancel_and_quotas(client):
    from steering.data.prompts import load_instructions

    positive = load_instructions("harmful_train")[:40]
    negative = load_instructions("harmless_train")[:40]
    # the job's model loads only once the cancel has been sent: on the tiny model the whole
    # extraction could otherwise finish before the DELETE arrives
    release = threading.Event()
    client.app.state.steer.extraction_model = lambda: (release.wait(60), make_tiny("qwen2"))[1]
    r = client.post("/v1/steering/packs/extract", headers=ROOT, json={
        "name": "slow", "positive": positive, "negative": negative})
    assert r.status_code == 202
    busy = client.post("/v1/steering/packs/extract", headers=ROOT, json={
        "name": "other", "dataset": "refusal", "n": 8})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "extraction_busy"
    cancelled = client.delete(f"/v1/steering/packs/extract/{r.json()['id']}", headers=ROOT)
    release.set()
    assert cancelled.status_code == 200 and cancelled.json()["cancel"] == "cancelling"
    done = _wait(client, r.json()["id"])
    assert done["status"] == "cancelled" and not done["served"]
    assert "slow" not in {p["id"] for p in client.get("/v1/steering/packs",
                                                      headers=ROOT).json()["data"]}
    for payload, param in (({"name": "x", "positive": positive[:3], "negative": negative},
                            "positive"),
                           ({"name": "x", "positive": ["a" * 3000] * 4, "negative": negative},
                            "positive[0]"),
                           ({"name": "x", "positive": ["a"] * 4097, "negative": negative},
                            "positive"),  # the schema's ceiling, before any item is read
                           ({"name": "x", "dataset": "nope"}, "dataset"),
                           ({"name": "../x", "dataset": "refusal"}, "name"),
                           ({"name": "x", "positive": positive}, "negative")):
        r = client.post("/v1/steering/packs/extract", headers=ROOT, json=payload)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert client.get("/v1/steering/packs/extract/nope", headers=ROOT).status_code == 404
