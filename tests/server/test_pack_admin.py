"""Issue 14 on the tiny model: packs loaded and unloaded while serving (pack_admin keys only, same
validation as start-up, audited), several packs at once, per-key pack policy, and requests that
finish on the pack version they started with. Issue 28 items 4 and 10: the upload grant needs
the refusal-lowering grant, packs loaded at start are pinned, an upload is checked against the
shipped refusal pack, the upload has its own streamed limit, and a refused DELETE is audited."""

from __future__ import annotations

import base64
import json
import logging
import pickle
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.security.auth import hash_key
from server.settings import Settings
from steering.packs.format import SteeringPack, pack_paths

MODEL = "tiny-qwen2"
KEYS = {"keys": [
    {"id": "root", "sha256": hash_key("k-root"), "methods": "*", "admin": True,
     "lower_refusal": True, "pack_admin": True},
    {"id": "user", "sha256": hash_key("k-user"), "methods": "*", "packs": ["refusal"]},
    {"id": "viewer", "sha256": hash_key("k-viewer"), "methods": "*", "admin": True,
     "lower_refusal": True},  # sees internals, may lower refusal, may not change packs
]}
ROOT = {"Authorization": "Bearer k-root"}
USER = {"Authorization": "Bearer k-user"}
VIEWER = {"Authorization": "Bearer k-viewer"}


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


def test_only_pack_admin_keys_load_and_unload(client, tiny_pack, tmp_path):
    body = upload_body(variant(tiny_pack, "tone"), tmp_path)
    for headers in (USER, VIEWER):  # `admin` alone (even with the grant) is not enough
        r = client.post("/v1/steering/packs", headers=headers, json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_pack_admin", r.text
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


def test_a_running_request_finishes_on_the_pack_it_started_with(client, tiny_lm, tiny_pack,
                                                                tmp_path):
    first, second = variant(tiny_pack, "tone", 3.0), variant(tiny_pack, "tone", 0.2)
    assert client.post("/v1/steering/packs", headers=ROOT,
                       json=upload_body(first, tmp_path)).status_code == 201
    n = 48
    reference = complete(client, "tone", max_tokens=n).json()["choices"][0]["text"]
    engine = client.app.state.steer.engine
    # hold the engine thread inside its second forward (the first decode step) until the pack
    # has been replaced and deleted, so the request is surely mid-decode whatever the machine
    forwards, decoding, release = [0], threading.Event(), threading.Event()

    def hold(_module, _args):
        if threading.current_thread().name == "engine":
            forwards[0] += 1
            if forwards[0] == 2:
                decoding.set()
                release.wait(60)

    handle = tiny_lm.model.register_forward_pre_hook(hold)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=complete(client, "tone", max_tokens=n)))
    try:
        worker.start()
        assert decoding.wait(60)
        (tmp_path / "v2").mkdir()
        r = client.post("/v1/steering/packs", headers=ROOT,
                        json=upload_body(second, tmp_path / "v2", replace=True))
        assert r.status_code == 201
        assert engine.stats()["running"] == 1  # the request is still decoding
        assert client.delete("/v1/steering/packs/tone", headers=ROOT).status_code == 200
    finally:
        release.set()
        handle.remove()
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


def test_pack_admin_check_fails_closed_when_keys_are_configured_but_no_key_is_seen():
    from types import SimpleNamespace

    from server.api.errors import APIError
    from server.api.pack_admin import _require_pack_admin

    def request(settings):
        app = SimpleNamespace(state=SimpleNamespace(steer=SimpleNamespace(settings=settings)))
        return SimpleNamespace(scope={}, app=app)  # no key in its request context

    for settings in (Settings(), Settings(keys=json.dumps(KEYS))):
        with pytest.raises(APIError) as err:
            _require_pack_admin(request(settings))
        assert err.value.status == 403


def test_without_keys_nobody_changes_packs(tiny_lm, tiny_pack, tmp_path):
    """Item 2: a keyless server (authentication off) serves the packs it started with."""
    app = create_app(Settings(), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/steering/packs", json=upload_body(variant(tiny_pack, "tone"), tmp_path))
        assert r.status_code == 403 and r.json()["error"]["code"] == "pack_admin_needs_keys"
        r = c.delete("/v1/steering/packs/refusal")
        assert r.status_code == 403 and r.json()["error"]["code"] == "pack_admin_needs_keys"
        assert set(app.state.steer.packs) == {"refusal"}


def test_packs_loaded_at_start_are_pinned(client, tiny_pack, tmp_path):
    """Item 4: `replace: true` over the default pack (or deleting it) is refused."""
    state = client.app.state.steer
    before = state.packs["refusal"]
    body = upload_body(variant(tiny_pack, "refusal", 1.0), tmp_path, replace=True)
    r = client.post("/v1/steering/packs", headers=ROOT, json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pack_pinned", r.text
    r = client.delete("/v1/steering/packs/refusal", headers=ROOT)
    assert r.status_code == 409 and r.json()["error"]["code"] == "pack_pinned"
    assert state.packs["refusal"] is before and state.default_pack == "refusal"
    # an uploaded pack may still be replaced and deleted
    assert client.post("/v1/steering/packs", headers=ROOT,
                       json=upload_body(variant(tiny_pack, "tone"), tmp_path)).status_code == 201
    r = client.post("/v1/steering/packs", headers=ROOT,
                    json=upload_body(variant(tiny_pack, "tone", 2.0), tmp_path, replace=True))
    assert r.status_code == 201 and r.json()["replaced"] is True
    assert client.delete("/v1/steering/packs/tone", headers=ROOT).status_code == 200


def swapped(pack: SteeringPack, name: str) -> SteeringPack:
    """The attack of item 4: the class means swapped, the sidecar (fingerprint) copied."""
    return SteeringPack(name, pack.mean_harmless.clone(), pack.mean_harmful.clone(),
                        list(pack.positions), pack.layer, pack.position, dict(pack.inlp),
                        dict(pack.meta))


def test_uploads_are_checked_against_the_shipped_refusal_pack(client, tiny_pack, tmp_path):
    def refused(pack, match, param="safetensors"):
        (tmp_path / pack.name).mkdir(exist_ok=True)
        r = client.post("/v1/steering/packs", headers=ROOT,
                        json=upload_body(pack, tmp_path / pack.name))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_pack" and match in err["message"], err
        assert err["param"] == param
        assert pack.name not in client.app.state.steer.packs

    refused(swapped(tiny_pack, "refusal2"), "points away from the shipped refusal direction")
    inverted = swapped(tiny_pack, "tone")  # the same, under another concept's name
    inverted.meta = {**inverted.meta, "concept": {"name": "tone"}}
    refused(inverted, "runs against the shipped refusal direction")
    longer = variant(tiny_pack, "refusal3", 5.0)  # an actadd strength five times the key's
    longer.meta = {k: v for k, v in longer.meta.items() if k != "concept"}
    refused(longer, "more than 2× the shipped one")
    moved = variant(tiny_pack, "refusal4", 1.0)  # ACE's reference moved along r̂
    moved.meta = dict(tiny_pack.meta)
    r = tiny_pack.mean_harmful - tiny_pack.mean_harmless
    moved.mean_harmless = tiny_pack.mean_harmless - 2.0 * r
    moved.mean_harmful = moved.mean_harmless + r
    refused(moved, "harmless mean sits")
    if tiny_pack.inlp:
        flipped = variant(tiny_pack, "refusal5", 1.0)
        flipped.meta = dict(tiny_pack.meta)
        flipped.inlp = {lay: type(d)(-d.directions, d.accuracy, d.boundary)
                        for lay, d in tiny_pack.inlp.items()}
        refused(flipped, "leading INLP direction")
        skewed = variant(tiny_pack, "refusal6", 1.0)
        skewed.meta = dict(tiny_pack.meta)
        skewed.inlp = {lay: type(d)(d.directions * 2.0, d.accuracy, d.boundary)
                       for lay, d in tiny_pack.inlp.items()}
        refused(skewed, "not orthonormal")
    # the shipped pack itself, under another name, is accepted
    same = variant(tiny_pack, "refusal-copy", 1.0)
    same.meta = dict(tiny_pack.meta)
    r = client.post("/v1/steering/packs", headers=ROOT, json=upload_body(same, tmp_path))
    assert r.status_code == 201, r.text


def test_integer_packs_are_refused_at_load(client, tiny_pack, tmp_path):
    """Item 10: an int32 pack used to load and then fail inside `ace` / `ablate` with a 500."""
    from safetensors.torch import load_file, save_file

    body = upload_body(tiny_pack, tmp_path, name="int")
    tensors, _ = pack_paths(tmp_path / "int")
    data = {k: (v * 100).to(torch.int32) for k, v in load_file(str(tensors)).items()}
    save_file(data, str(tensors), metadata={"format": "steering-pack"})
    body["safetensors"] = base64.b64encode(tensors.read_bytes()).decode()
    r = client.post("/v1/steering/packs", headers=ROOT, json=body)
    assert r.status_code == 400 and "int32" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "safetensors"
    from steering.packs.format import PackError, load_pack
    with pytest.raises(PackError, match="float32"):
        load_pack(tensors)


def test_upload_has_its_own_streamed_limit(tiny_lm, tiny_pack, tmp_path):
    """Item 10: the upload is not bound by the completion body limit, but by its own."""
    raw = json.dumps(upload_body(variant(tiny_pack, "tone"), tmp_path)).encode()
    headers = {**ROOT, "content-type": "application/json"}
    assert len(raw) > 2048
    settings = Settings(keys=json.dumps(KEYS), max_body_bytes=2048, max_pack_bytes=len(raw))
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", headers=ROOT, json={
            "model": MODEL, "prompt": "x" * 3000, "max_tokens": 1})
        assert r.status_code == 413  # the general limit still holds elsewhere
        assert c.post("/v1/steering/packs", headers=headers, content=raw).status_code == 201
    settings = Settings(keys=json.dumps(KEYS), max_pack_bytes=len(raw) - 1)
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/steering/packs", headers=headers, content=raw)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds as the chunks arrive
            for i in range(0, len(raw), 1000):
                yield raw[i:i + 1000]

        r = c.post("/v1/steering/packs", headers=headers, content=chunks())
        assert r.status_code == 413, r.text
        r = c.post("/v1/steering/packs", headers=ROOT,
                   json={**json.loads(raw), "sidecar": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "sidecar"
        assert "tone" not in app.state.steer.packs


def test_a_refused_delete_is_audited(client, caplog):
    """Item 10: a DELETE answered 404 (or 409) leaves an audit line like a refused POST."""
    caplog.set_level(logging.INFO, logger="steer.audit")
    assert client.delete("/v1/steering/packs/nope", headers=ROOT).status_code == 404
    assert client.delete("/v1/steering/packs/refusal", headers=ROOT).status_code == 409
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "steer.audit"]
    denied = [x for x in lines if x["event"] == "denied_request"]
    assert [(x["pack"], x["status"], x["denied"], x["key_id"]) for x in denied] == [
        ("nope", 404, "pack_not_found", "root"), ("refusal", 409, "pack_pinned", "root")]
