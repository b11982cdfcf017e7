"""Issue 7 on the tiny model: API keys and per-key policy (401 / 403 per rule / 429), the audit
log, input hardening, pack and preset names, refused packs, and engine fault isolation."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import shutil

import pytest
from fastapi.testclient import TestClient

from server.api import resolve
from server.app import create_app
from server.engine import Engine, GenerationRequest, SamplingParams
from server.security.auth import hash_key
from server.security.hardening import valid_name
from server.settings import Settings
from steering import SteeringSpec, build_row
from steering.models.chat import format_chat
from testkit.tiny import HELLO, MODEL

SECRET_PROMPT = "my secret prompt: the launch code is 0000"
KEYS = {
    "keys": [
        {"id": "basic", "sha256": hash_key("k-basic")},
        {"id": "power", "sha256": hash_key("k-power"), "methods": "*", "packs": ["refusal"],
         "presets": ["ablate", "more-refusal"], "max_strength": 2, "max_k": 2,
         "lower_refusal": True},
        {"id": "wide", "sha256": hash_key("k-wide"), "methods": "*",
         "strength": {"actadd": {"min": 0.5, "max": 1.5}}},
        {"id": "slow", "sha256": hash_key("k-slow"), "requests_per_minute": 2},
        {"id": "thrifty", "sha256": hash_key("k-thrifty"), "tokens_per_minute": 200},
        {"id": "admin", "sha256": hash_key("k-admin"), "admin": True},
    ],
}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def packs_dir(tmp_path_factory, tiny_pack):
    """Good and broken extra packs: corrupt, truncated, pickled, another model's."""
    d = tmp_path_factory.mktemp("packs")
    tiny_pack.save(d / "good")
    tiny_pack.save(d / "corrupt")
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    tiny_pack.save(d / "truncated")
    raw = (d / "truncated.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    shutil.copy(d / "good.json", d / "pickled.json")
    (d / "pickled.safetensors").write_bytes(pickle.dumps({"mean_harmful": [1.0]}))
    tiny_pack.save(d / "other")
    meta = json.loads((d / "other.json").read_text())
    meta["fingerprint"]["probe"] = [p + 1.0 for p in meta["fingerprint"]["probe"]]
    (d / "other.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack, packs_dir, audit_file):
    extra = ",".join(str(packs_dir / f"{n}.safetensors")
                     for n in ("good", "corrupt", "truncated", "pickled", "other"))
    settings = Settings(keys=json.dumps(KEYS), audit_log=str(audit_file), extra_packs=extra,
                        max_tokens_limit=64, max_messages=8, max_body_bytes=4096, max_stop=2,
                        max_stop_chars=16, max_prompt_tokens=200)
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def chat(client, key="k-basic", headers=None, **body):
    body.setdefault("model", MODEL)
    body.setdefault("messages", HELLO)
    body.setdefault("max_tokens", 4)
    body.setdefault("temperature", 0)
    return client.post("/v1/chat/completions", json=body,
                       headers=headers if headers is not None else _auth(key))


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    return err


# ---- keys ------------------------------------------------------------------------------------------


def test_missing_and_wrong_keys_get_401(client):
    for headers in ({}, _auth("nope"), {"Authorization": "Basic abc"}, _auth("")):
        r = chat(client, headers=headers)
        _error(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/v1/models").status_code == 401


def test_open_endpoints_stay_open(client):
    for path in ("/healthz", "/health", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert client.get("/health").json() == client.get("/healthz").json()  # vLLM's name for it


def test_default_policy_allows_more_refusal(client):
    for method in ("none", "actadd", "ace"):
        r = chat(client, steering={"method": method, "strength": 1.0})
        assert r.status_code == 200, r.text
        assert r.json()["steering"]["method"] == method


def test_default_policy_refuses_refusal_removal(client):
    for method in ("ablate", "inlp_null", "inlp_flip"):
        err = _error(chat(client, steering={"method": method}), 403)
        assert err["code"] == "policy_methods" and "'methods'" in err["message"]
        assert err["type"] == "permission_error"


@pytest.mark.parametrize("steering", [
    {"method": "actadd", "strength": -1.0},
    {"method": "actadd", "strength": -0.01},
    {"method": "ace", "strength": 0.0},
    {"method": "ace", "strength": 0.5},
    {"method": "ace", "strength": -2.0},
])
def test_default_policy_refuses_lowering_refusal(client, steering):
    """Issue 12 finding 1: the default methods only add refusal in the direction of effect."""
    err = _error(chat(client, steering=steering), 403)
    assert err["code"] == "policy_lower_refusal" and "lower_refusal" in err["message"]


@pytest.mark.parametrize("steering", [
    {"method": "actadd", "strength": 0.0}, {"method": "actadd", "strength": 2.0},
    {"method": "ace", "strength": 1.0}, {"method": "ace", "strength": 3.0},
])
def test_default_policy_allows_raising_refusal(client, steering):
    assert chat(client, steering=steering).status_code == 200


def test_every_method_without_the_grant_cannot_lower_refusal(client):
    # "*" names every method, but lowering refusal still needs the explicit grant
    for method in ("ablate", "inlp_null", "inlp_flip", "inlp_reflect"):
        err = _error(chat(client, "k-wide", steering={"method": method}), 403)
        assert err["code"] == "policy_lower_refusal"
    err = _error(chat(client, "k-wide", model=f"{MODEL}+no-refusal"), 403)
    assert err["code"] == "policy_lower_refusal"


def test_methods_state_their_direction_of_effect(client):
    methods = {m["id"]: m for m in client.get("/v1/steering/methods",
                                              headers=_auth("k-basic")).json()["data"]}
    assert methods["actadd"]["effect"]["lowers_refusal"] == "strength < 0"
    assert methods["actadd"]["effect"]["strength_without_grant"] == {"min": 0.0, "max": None}
    assert methods["ace"]["effect"]["strength_without_grant"]["min"] == 1.0
    for method in ("ablate", "inlp_null", "inlp_flip", "inlp_reflect"):
        assert methods[method]["effect"]["requires_grant"] is True, method
        assert methods[method]["effect"]["lowers_refusal"], method
    assert methods["none"]["effect"]["requires_grant"] is False


def test_signed_per_method_bounds(client):
    assert chat(client, "k-wide", steering={"method": "actadd", "strength": 1.0}).status_code \
        == 200
    for strength in (0.25, 1.75):
        err = _error(chat(client, "k-wide", steering={"method": "actadd",
                                                      "strength": strength}), 403)
        assert err["code"] == "policy_strength"


def test_granted_key_may_lower_refusal(client):
    for steering in ({"method": "actadd", "strength": -1.0}, {"method": "ace", "strength": 0.0},
                     {"method": "inlp_flip", "k": 1}):
        r = chat(client, "k-power", steering=steering)
        assert r.status_code == 200, (steering, r.text)


def test_bad_policy_documents_are_refused():
    from server.security.auth import parse_keys
    from server.security.policy import PolicyError

    for entry in ({"lower_refusal": "yes"}, {"strength": {"actadd": {"min": 2, "max": 1}}},
                  {"strength": {"actadd": {"low": 0}}}, {"strength": [0, 1]},
                  {"strength": {"ace": {"min": float("nan")}}}):
        with pytest.raises(PolicyError):
            parse_keys({"keys": [{"id": "x", "sha256": "0" * 64, **entry}]})


def test_token_bucket_average_holds_under_large_requests(monkeypatch):
    """Issue 12 finding 5: requests larger than the bucket cannot beat the per-minute rate."""
    from server.security import policy as pol

    clock = {"t": 1000.0}
    monkeypatch.setattr(pol.time, "monotonic", lambda: clock["t"])
    limiter = pol.RateLimiter()
    p = pol.Policy(tokens_per_minute=1000)
    spent = 0
    for _ in range(3600):  # one hour, one attempt per second at 65k tokens
        try:
            limiter.take("k", p, 65_000)
            spent += 65_000
        except pol.APIError as exc:
            assert exc.status == 429 and int(exc.headers["Retry-After"]) >= 1
        clock["t"] += 1.0
    assert spent <= 1000 * 60 + 65_000  # the rate over the hour, plus one request of debt
    assert spent > 0  # a large request is never starved


def test_named_key_may_remove_refusal(client):
    r = chat(client, "k-power", steering={"method": "ablate", "strength": 1.0})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("steering,rule", [
    ({"method": "actadd", "strength": 3.0}, "max_strength"),
    ({"method": "actadd", "strength": -3.0}, "max_strength"),
    ({"method": "inlp_null", "k": 3}, "max_k"),
])
def test_policy_limits_name_the_rule(client, steering, rule):
    err = _error(chat(client, "k-power", steering=steering), 403)
    assert err["code"] == f"policy_{rule}" and rule in err["message"]


def test_policy_packs(client):
    err = _error(chat(client, "k-power", steering={"method": "actadd", "pack": "good"}), 403)
    assert err["code"] == "policy_packs"
    assert chat(client, steering={"method": "actadd", "pack": "good"}).status_code == 200


def test_presets_obey_the_policy(client):
    # basic: the preset expands to ablate, which basic may not use
    err = _error(chat(client, model=f"{MODEL}+ablate"), 403)
    assert err["code"] == "policy_methods"
    assert chat(client, "k-power", model=f"{MODEL}+ablate").status_code == 200
    err = _error(chat(client, "k-power", model=f"{MODEL}+ace-refuse"), 403)
    assert err["code"] == "policy_presets"
    # overriding the preset's strength past the key's maximum is refused too
    err = _error(chat(client, "k-power", model=f"{MODEL}+more-refusal",
                      steering={"strength": 5.0}), 403)
    assert err["code"] == "policy_max_strength"


def test_completions_are_policed_too(client):
    r = client.post("/v1/completions", headers=_auth("k-basic"),
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                          "steering": {"method": "inlp_flip"}})
    assert _error(r, 403)["code"] == "policy_methods"


def test_compare_variants_are_policed(client):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "variants": ["more-refusal"]}
    r = client.post("/v1/steering/compare", json=body, headers=_auth("k-basic"))
    assert r.status_code == 200, r.text
    body["variants"] = ["more-refusal", {"method": "ablate"}]
    r = client.post("/v1/steering/compare", json=body, headers=_auth("k-basic"))
    assert _error(r, 403)["code"] == "policy_methods"
    body["variants"] = ["more-refusal"] * 9
    r = client.post("/v1/steering/compare", json=body, headers=_auth("k-basic"))
    assert _error(r, 400)["code"] == "too_many_variants"
    assert client.post("/v1/steering/compare", json=body).status_code == 401


def test_requests_per_minute(client):
    assert chat(client, "k-slow").status_code == 200
    assert chat(client, "k-slow").status_code == 200
    r = chat(client, "k-slow")
    err = _error(r, 429)
    assert err["code"] == "rate_limit_requests"
    assert int(r.headers["retry-after"]) >= 1
    assert chat(client).status_code == 200  # other keys are not affected


def test_tokens_per_minute(client):
    # prompt + 4 × 60 > 200: admitted on a full bucket (never starved), charged in full (debt)
    assert chat(client, "k-thrifty", max_tokens=60, n=4).status_code == 200
    r = chat(client, "k-thrifty", max_tokens=2)
    err = _error(r, 429)
    assert err["code"] == "rate_limit_tokens"
    assert int(r.headers["retry-after"]) > 12  # the 40+ tokens of debt take > 12 s to repay


# ---- audit -------------------------------------------------------------------------------------------


def test_audit_line_fields_and_no_prompt_text(client, caplog, audit_file):
    caplog.set_level(logging.INFO, logger="steer.audit")
    messages = [{"role": "user", "content": SECRET_PROMPT}]
    r = chat(client, "k-power", messages=messages,
             steering={"method": "inlp_null", "k": 2, "strength": 1.5},
             headers={**_auth("k-power"), "X-Request-ID": "audit-test-1"})
    assert r.status_code == 200, r.text
    lines = [json.loads(rec.getMessage()) for rec in caplog.records
             if rec.name == "steer.audit"]
    line = next(x for x in lines if x["client_request_id"] == "audit-test-1"
                and x["event"] == "steered_request")
    assert line["request_id"] == r.headers["x-request-id"] != "audit-test-1"
    for field in ("time", "key_id", "endpoint", "method", "strength", "k", "pack", "preset",
                  "status", "prompt_tokens", "completion_tokens", "request_id",
                  "prompt_hmac_sha256"):
        assert field in line, field
    assert line["key_id"] == "power" and line["endpoint"] == "/v1/chat/completions"
    assert (line["method"], line["k"], line["strength"], line["status"]) == \
        ("inlp_null", 2, 1.5, 200)
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] > 0
    assert len(line["prompt_hmac_sha256"]) == 64
    text = audit_file.read_text()
    assert r.headers["x-request-id"] in text
    for blob in (text, json.dumps(lines)):
        assert "launch code" not in blob and "k-power" not in blob


def test_audit_records_denials(client, caplog):
    caplog.set_level(logging.INFO, logger="steer.audit")
    chat(client, steering={"method": "ablate"}, headers={**_auth("k-basic"),
                                                         "X-Request-ID": "audit-denied"})
    line = next(json.loads(r.getMessage()) for r in caplog.records
                if r.name == "steer.audit" and "audit-denied" in r.getMessage())
    assert line["status"] == 403 and line["key_id"] == "basic"
    assert line["denied"] == "policy_methods"


# ---- input hardening ------------------------------------------------------------------------------


def _raw(client, body: bytes | str, path="/v1/chat/completions"):
    return client.post(path, content=body, headers={**_auth("k-basic"),
                                                    "Content-Type": "application/json"})


def test_body_size_limit(client):
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]})
    assert _error(_raw(client, big), 413)["code"] == "request_too_large"


@pytest.mark.parametrize("body", [
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], '
    '"temperature": NaN}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], '
    '"top_p": Infinity}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], '
    '"steering": {"method": "actadd", "strength": -Infinity}}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "\\ud800"}]}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], '
    '"max_tokens": 1e400}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], '
    '"max_tokens": 99999999999999999999999999}',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}], "n": "two"}',
    '{"model": "tiny-qwen2", "messages": "hi"}',
    '{"model": 5, "messages": []}',
    '[1, 2, 3]',
    '{"model": "tiny-qwen2", "messages": [{"role": "user", "content": "hi"}]',
    '\xff\xfe garbage',
    '[' * 200 + ']' * 200,
])
def test_bad_bodies_are_4xx(client, body):
    r = _raw(client, body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body)
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_odd_but_valid_unicode_passes(client):
    text = "\u202eright-to-left \u200b zero-width 🐳 e\u0301 \ufeff"
    r = chat(client, messages=[{"role": "user", "content": text}])
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,code", [
    ({"messages": HELLO * 9}, "too_many_messages"),
    ({"stop": ["a", "b", "c"]}, None),
    ({"stop": ["x" * 17]}, "stop_too_long"),
    ({"max_tokens": 65}, "max_tokens_too_large"),
    ({"n": 100}, None),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "prompt_too_long"),
])
def test_input_limits(client, body, code):
    err = _error(chat(client, **body), 400)
    if code:
        assert err["code"] == code


def test_completion_limits(client):
    r = client.post("/v1/completions", headers=_auth("k-basic"),
                    json={"model": MODEL, "prompt": ["a"] * 40, "max_tokens": 1})
    assert _error(r, 400)["code"] == "too_many_prompts"


@pytest.mark.parametrize("name", ["../refusal", "..", "a/b", "/etc/passwd", "..\\x", ".hidden",
                                  "a..b", "x" * 65, "%2e%2e", "pack\x00", "ré"])
def test_pack_names_cannot_traverse(client, name):
    assert not valid_name(name)
    r = chat(client, steering={"method": "actadd", "pack": name})
    assert r.status_code in (400, 404), r.text
    r = chat(client, model=f"{MODEL}+{name}")
    assert r.status_code in (400, 404), r.text


# ---- packs refused at load -------------------------------------------------------------------------


def test_bad_packs_are_refused_and_listed(client):
    r = client.get("/v1/steering/packs", headers=_auth("k-admin"))
    assert r.status_code == 200
    body = r.json()
    loaded = {p["id"] for p in body["data"] if p["status"] == "loaded"}
    failed = {p["id"]: p["error"] for p in body["failed"]}
    assert {"refusal", "good"} <= loaded
    assert set(failed) == {"corrupt", "truncated", "pickled", "other"}
    assert "pickle" in failed["pickled"]
    assert "other weights" in failed["other"] or "another model" in failed["other"]
    for reason in failed.values():
        assert reason
    # the server still serves the good packs
    assert chat(client, steering={"method": "actadd", "pack": "good"}).status_code == 200
    assert _error(chat(client, steering={"method": "actadd", "pack": "corrupt"}),
                  404)["code"] == "pack_not_found"


def test_bad_pack_is_logged(tiny_lm, tiny_pack, packs_dir, caplog):
    caplog.set_level(logging.ERROR, logger="server")
    app = create_app(Settings(extra_packs=str(packs_dir / "pickled.safetensors")), lm=tiny_lm,
                     packs=[tiny_pack])
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
    assert any("pickled" in r.getMessage() and "refused" in r.getMessage()
               for r in caplog.records)


# ---- engine faults ------------------------------------------------------------------------------------


class _Boom(dict):
    """A row's edits that break after `ok` lookups (prefill: one per site)."""

    def __init__(self, edits, ok: int):
        super().__init__(edits)
        self.ok = ok

    def get(self, *args):
        self.ok -= 1
        if self.ok < 0:
            raise RuntimeError("injected fault")
        return super().get(*args)


def _request(lm, pack, prompt, edits_ok=None, max_tokens=8):
    ids = lm.tokenizer(format_chat(lm.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    row = build_row(SteeringSpec("actadd", 1.5), pack)
    if edits_ok is not None:
        row.edits = _Boom(row.edits, edits_ok(len(row.edits)))
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), row)


async def _collect(handle):
    tokens, last = [], None
    async for event in handle:
        if event.token_id is not None:
            tokens.append(event.token_id)
        last = event
    return tokens, last.finish_reason


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_engine_fault_fails_one_request(tiny_lm, tiny_pack, where):
    prompts = ["hello there", "write a poem about the sea", "tell me a story"]
    ok = (lambda n: 0) if where == "prefill" else (lambda n: n)

    async def main():
        engine = Engine(tiny_lm, max_batch=8)
        await engine.start()
        solo = [await _collect(engine.submit(_request(tiny_lm, tiny_pack, p)))
                for p in prompts]
        handles = [engine.submit(_request(tiny_lm, tiny_pack, p,
                                          edits_ok=ok if i == 1 else None))
                   for i, p in enumerate(prompts)]
        mixed = await asyncio.gather(*[_collect(h) for h in handles])
        after = await _collect(engine.submit(_request(tiny_lm, tiny_pack, prompts[1])))
        await engine.shutdown()
        return solo, mixed, after

    solo, mixed, after = asyncio.run(main())
    assert mixed[1][1] == "error"
    assert mixed[0] == solo[0] and mixed[2] == solo[2]
    assert after == solo[1]  # the engine keeps serving


def test_engine_fault_is_a_500_with_request_id(client, tiny_pack, monkeypatch):
    _inject_fault(monkeypatch)
    r = chat(client, steering={"method": "actadd", "strength": 0.125},
             headers={**_auth("k-basic"), "X-Request-ID": "fault-1"})
    err = _error(r, 500)
    assert r.headers["x-request-id"] in err["message"] and err["type"] == "server_error"
    assert chat(client, steering={"method": "actadd", "strength": 0.5}).status_code == 200


# ---- internals stay inside (issue 12 finding 9) --------------------------------------------------


def _inject_fault(monkeypatch, strength: float = 0.125) -> None:
    """Steering at `strength` builds edits that fail in the engine."""
    real = resolve.Checked.build

    def faulty(self):
        resolved = real(self)
        if self.parts[0].spec.strength == strength:
            resolved.row.edits = _Boom(resolved.row.edits, 0)
        return resolved

    monkeypatch.setattr(resolve.Checked, "build", faulty)


@pytest.mark.parametrize("stream", [False, True])
def test_engine_fault_text_goes_to_the_log_not_the_client(client, monkeypatch, caplog, stream):
    caplog.set_level(logging.ERROR, logger="server")
    _inject_fault(monkeypatch)
    r = chat(client, steering={"method": "actadd", "strength": 0.125}, stream=stream)
    rid = r.headers["x-request-id"]
    if stream:
        assert r.status_code == 200
        [event] = [json.loads(line[6:]) for line in r.text.splitlines()
                   if line.startswith("data: {") and '"error"' in line]
        err = event["error"]
    else:
        err = _error(r, 500)
    assert rid in err["message"] and err["type"] == "server_error"
    assert "injected fault" not in r.text and "RuntimeError" not in r.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "injected fault" in logged and rid in logged


def test_stream_failure_is_generic_and_logged_with_traceback(client, monkeypatch, caplog):
    from server.api import streaming

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (secret detail)")

    caplog.set_level(logging.ERROR, logger="server")
    monkeypatch.setattr(streaming.ChunkBuilder, "piece", broken)
    r = chat(client, stream=True)
    assert r.status_code == 200
    assert "CUDA" not in r.text and "secret detail" not in r.text
    assert r.headers["x-request-id"] in r.text and r.text.rstrip().endswith("data: [DONE]")
    [record] = [rec for rec in caplog.records if "stream failed" in rec.getMessage()]
    assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


def test_models_do_not_show_the_local_path(tiny_lm, tiny_pack):
    from dataclasses import replace

    lm = replace(tiny_lm, model_id="/srv/private/models/qwen-weights")
    with TestClient(create_app(Settings(), lm=lm, packs=[tiny_pack])) as c:
        text = c.get("/v1/models").text + c.get(f"/v1/models/{lm.name}").text
    assert "/srv/private" not in text and "qwen-weights" not in text


def test_pack_internals_only_for_admin_keys(client, packs_dir):
    def packs(key: str) -> dict:
        r = client.get("/v1/steering/packs", headers=_auth(key))
        assert r.status_code == 200
        return r.json()

    basic, admin = packs("k-basic"), packs("k-admin")
    for body in (basic, admin):
        assert {p["id"] for p in body["failed"]} == {"corrupt", "truncated", "pickled", "other"}
    assert all("meta" not in p for p in basic["data"] if p["status"] == "loaded")
    text = json.dumps(basic)
    assert str(packs_dir) not in text, text[max(0, text.find(str(packs_dir)) - 200):][:400]
    assert all("meta" in p for p in admin["data"] if p["status"] == "loaded")
    assert "pickle" in {p["id"]: p["error"] for p in admin["failed"]}["pickled"]


def test_admin_must_be_a_boolean():
    from server.security.auth import parse_keys
    from server.security.policy import PolicyError

    with pytest.raises(PolicyError, match="admin"):
        parse_keys({"keys": [{"id": "a", "sha256": hash_key("a"), "admin": "yes"}]})
