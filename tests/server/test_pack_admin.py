"""Issue 14 on the tiny model: packs loaded and unloaded while serving (admin keys only, same
validation as start-up, audited), several packs at once, per-key pack policy, and requests that
finish on the pack version they started with."""

from __future__ import annotations

import base64
import json
import logging
import pickle
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.security.auth import hash_key
from server.settings import Settings
from steering.packs.format import SteeringPack, pack_paths

MODEL = "tiny-qwen2"
KEYS = {"keys": [
    {"id": "root", "sha256": hash_key("k-root"), "methods": "*", "admin": True},
    {"id": "user", "sha256": hash_key("k-user"), "methods": "*", "packs": ["refusal"]},
]}
ROOT = {"Authorization": "Bearer k-root"}
USER = {"Authorization": "Bearer k-user"}


def variant(pack: SteeringPack, name: str, scale: float = 3.0) -> SteeringPack:
    """Another pack for the same model: the same means with the positive one pushed further."""
    return SteeringPack(name, pack.mean_harmless + scale * (pack.mean_harmful - pack.mean_harmless),
                        pack.mean_harmless.clone(), list(pack.positions), pack.layer,
                        pack.position, dict(pack.inlp),
                        {**pack.meta, "concept": {"name": name}})


def upload_body(pack: SteeringPack, tmp_path, name: str | None = None, **extra) -> dict:
    tensors, sidecar = pack_paths(pack.save(tmp_path / (name or pack.name)))
    return {"name": name or pack.name,
            "safetensors": base64.b64encode(tensors.read_bytes()).decode(),
            "sidecar": json.loads(sidecar.read_text()), **extra}


@pytest.fixture()
def client(tiny_lm, tiny_pack, tmp_path):
    settings = Settings(keys=json.dumps(KEYS), audit_log=str(tmp_path / "audit.jsonl"),
                        max_body_bytes=4 * 1024 * 1024)
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def complete(client, pack: str, headers=ROOT, max_tokens: int = 6, strength: float = 4.0):
    return client.post("/v1/completions", headers=headers, json={
        "model": MODEL, "prompt": "Tell me about the sea", "max_tokens": max_tokens,
        "temperature": 0, "steering": {"method": "actadd", "strength": strength, "pack": pack}})


def test_upload_list_use_delete(client, tiny_pack, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="steer.audit")
    r = client.post("/v1/steering/packs", headers=ROOT,
                    json=upload_body(variant(tiny_pack, "tone"), tmp_path))
    assert r.status_code == 201, r.text
    assert r.json()["concept"] == "tone" and "actadd" in r.json()["methods"]
    listed = {p["id"]: p for p in client.get("/v1/steering/packs", headers=ROOT).json()["data"]}
    assert set(listed) == {"refusal", "tone"}
    for entry in listed.values():
        assert {"concept", "methods", "hook", "layer", "created"} <= set(entry)
    assert listed["tone"]["hook"]["site"] == "block_input"
    assert complete(client, "tone").status_code == 200
    assert client.delete("/v1/steering/packs/tone", headers=ROOT).status_code == 200
    r = complete(client, "tone")
    assert r.status_code == 404 and r.json()["error"]["param"] == "steering.pack"
    events = [json.loads(rec.getMessage()) for rec in caplog.records
              if rec.name == "steer.audit"]
    kinds = [e["event"] for e in events]
    assert "pack_uploaded" in kinds and "pack_deleted" in kinds
    up = next(e for e in events if e["event"] == "pack_uploaded")
    assert up["key_id"] == "root" and up["pack"] == "tone" and len(up["safetensors_sha256"]) == 64


def test_only_admin_keys_load_and_unload(client, tiny_pack, tmp_path):
    body = upload_body(variant(tiny_pack, "tone"), tmp_path)
    r = client.post("/v1/steering/packs", headers=USER, json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    assert client.post("/v1/steering/packs", json=body).status_code == 401
    assert client.delete("/v1/steering/packs/refusal", headers=USER).status_code == 403
    assert client.post("/v1/steering/packs", headers=ROOT, json=body).status_code == 201
    # per-key pack policy applies to uploaded packs too: 'user' may use 'refusal' only
    r = complete(client, "tone", headers=USER)
    assert r.status_code == 403 and r.json()["error"]["code"] == "policy_packs"
    assert complete(client, "refusal", headers=USER).status_code == 200


def test_uploads_get_the_start_up_validation(client, tiny_pack, tmp_path):
    good = upload_body(variant(tiny_pack, "tone"), tmp_path)

    def refused(body, param, match):
        r = client.post("/v1/steering/packs", headers=ROOT, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and match in err["message"], err
        assert "steer-pack-" not in err["message"]  # no scratch paths

    other = json.loads(json.dumps(good["sidecar"]))
    other["fingerprint"]["probe"] = [p + 1.0 for p in other["fingerprint"]["probe"]]
    refused({**good, "sidecar": other}, "sidecar", "other weights")
    newer = {**good["sidecar"], "format_version": 99}
    refused({**good, "sidecar": newer}, "sidecar", "format_version 99")
    hook = {**good["sidecar"], "hook": {**good["sidecar"]["hook"], "site": "attn_output"}}
    refused({**good, "sidecar": hook}, "sidecar", "hook site")
    pickled = base64.b64encode(pickle.dumps({"mean_harmful": [1.0]})).decode()
    refused({**good, "safetensors": pickled}, "safetensors", "pickle")
    refused({**good, "safetensors": "not base64!"}, "safetensors", "base64")
    bad = variant(tiny_pack, "nan")
    bad.mean_harmful[0, 0, 0] = float("nan")
    refused(upload_body(bad, tmp_path), "safetensors", "non-finite")
    r = client.post("/v1/steering/packs", headers=ROOT, json={**good, "name": "../x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert client.post("/v1/steering/packs", headers=ROOT, json=good).status_code == 201
    r = client.post("/v1/steering/packs", headers=ROOT, json=good)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pack_exists"
    r = client.post("/v1/steering/packs", headers=ROOT, json={**good, "replace": True})
    assert r.status_code == 201 and r.json()["replaced"] is True
    r = client.delete("/v1/steering/packs/nope", headers=ROOT)
    assert r.status_code == 404 and r.json()["error"]["param"] == "name"


def test_a_running_request_finishes_on_the_pack_it_started_with(client, tiny_pack, tmp_path):
    first, second = variant(tiny_pack, "tone", 3.0), variant(tiny_pack, "tone", -3.0)
    assert client.post("/v1/steering/packs", headers=ROOT,
                       json=upload_body(first, tmp_path)).status_code == 201
    n = 48
    reference = complete(client, "tone", max_tokens=n).json()["choices"][0]["text"]
    engine = client.app.state.steer.engine
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=complete(client, "tone", max_tokens=n)))
    worker.start()
    deadline = time.monotonic() + 60
    while engine.stats()["running"] == 0 and worker.is_alive() \
            and time.monotonic() < deadline:
        time.sleep(0.002)
    # replace the pack, then delete it, while the request decodes
    (tmp_path / "v2").mkdir()
    r = client.post("/v1/steering/packs", headers=ROOT,
                    json=upload_body(second, tmp_path / "v2", replace=True))
    assert r.status_code == 201
    assert engine.stats()["running"] == 1  # the request was still decoding
    assert client.delete("/v1/steering/packs/tone", headers=ROOT).status_code == 200
    worker.join(120)
    assert out["r"].status_code == 200
    assert out["r"].json()["choices"][0]["text"] == reference


def test_methods_a_pack_was_not_made_for_are_refused(client, tiny_pack, tmp_path):
    add_only = variant(tiny_pack, "cv")
    add_only.inlp = {}
    add_only.meta = {**add_only.meta, "vectors": {"dim": {
        "tensors": ["mean_harmful", "mean_harmless"], "operations": ["add"]}}}
    assert client.post("/v1/steering/packs", headers=ROOT,
                       json=upload_body(add_only, tmp_path)).status_code == 201
    assert client.get("/v1/steering/packs", headers=ROOT).json()["data"][1]["methods"] == \
        ["actadd"]
    for method in ("ablate", "ace", "inlp_null"):
        r = client.post("/v1/completions", headers=ROOT, json={
            "model": MODEL, "prompt": "hi", "max_tokens": 2,
            "steering": {"method": method, "pack": "cv"}})
        assert r.status_code == 400, (method, r.text)
        assert r.json()["error"]["code"] == "method_not_in_pack"
    assert torch.isfinite(add_only.dim()).all()


def test_admin_check_fails_closed_when_keys_are_configured_but_no_key_is_seen():
    from types import SimpleNamespace

    from server.api.errors import APIError
    from server.api.pack_admin import _require_admin

    def request(settings):
        app = SimpleNamespace(state=SimpleNamespace(steer=SimpleNamespace(settings=settings)))
        return SimpleNamespace(scope={}, app=app)  # no key in its request context

    _require_admin(request(Settings()))  # authentication off: the local operator
    with pytest.raises(APIError) as err:
        _require_admin(request(Settings(keys=json.dumps(KEYS))))
    assert err.value.status == 403
