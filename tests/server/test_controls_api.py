"""Steering controls through the HTTP API on the tiny model: steering lists, targeting and
conditions in chat, completions, compare (plain and streamed), presets, policy and audit;
validation errors name the field (`steering[1].generation_window`)."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.security.auth import hash_key
from server.settings import Settings
from testkit.tiny import HELLO, MODEL

KEYS = {"keys": [
    {"id": "adder", "sha256": hash_key("k-adder"), "methods": ["none", "actadd"]},
    {"id": "all", "sha256": hash_key("k-all"), "methods": "*", "lower_refusal": True,
     "packs": ["refusal"]},
]}
PRESETS = {"presets": {
    "strip-then-add": {"description": "a list preset",
                       "steering": [{"method": "ablate"},
                                    {"method": "actadd", "strength": "calibrated",
                                     "apply_to": "generation"}]},
}}
ABLATE_ADD = [{"method": "ablate"}, {"method": "actadd", "strength": 2.0}]


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(tiny_lm, tiny_pack, tmp_path_factory):
    presets = tmp_path_factory.mktemp("presets") / "presets.json"
    presets.write_text(json.dumps(PRESETS))
    settings = Settings(max_tokens_limit=64, strength_min=-4.0, strength_max=4.0,
                        max_compare_variants=6, presets=str(presets), access_log=False)
    with TestClient(create_app(settings, lm=tiny_lm, packs=[tiny_pack]),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(tiny_lm, tiny_pack):
    settings = Settings(keys=json.dumps(KEYS), max_tokens_limit=64, access_log=False)
    with TestClient(create_app(settings, lm=tiny_lm, packs=[tiny_pack]),
                    raise_server_exceptions=False) as c:
        yield c


def chat(client, steering=None, headers=None, **body):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, **body}
    if steering is not None:
        body["steering"] = steering
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def text_of(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def sse(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    out = []
    for block in response.text.split("\n\n"):
        if block.strip():
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def score_of(client) -> float:
    """The prompt's condition score (a `none` object with a condition only measures it)."""
    r = chat(client, {"method": "none", "when": {"above": 0.5}})
    assert r.status_code == 200, r.text
    return r.json()["steering"]["condition"]["score"]


# ---- lists ----------------------------------------------------------------------------------------

def test_a_list_echoes_every_object_and_a_list_of_one_equals_the_object(client):
    r = chat(client, ABLATE_ADD)
    assert r.status_code == 200, r.text
    echo = r.json()["steering"]
    assert [e["method"] for e in echo] == ["ablate", "actadd"] and echo[1]["strength"] == 2.0
    one = chat(client, [{"method": "actadd", "strength": 2.0}])
    assert isinstance(one.json()["steering"], list)
    assert text_of(one) == text_of(chat(client, {"method": "actadd", "strength": 2.0}))
    assert text_of(r) != text_of(chat(client, {"method": "actadd", "strength": 2.0}))


def test_list_preset_resolves_every_object(client, tiny_pack):
    r = chat(client, model=f"{MODEL}+strip-then-add")
    assert r.status_code == 200, r.text
    echo = r.json()["steering"]
    assert [e["method"] for e in echo] == ["ablate", "actadd"]
    assert all(e["preset"] == "strip-then-add" for e in echo)
    assert echo[1]["apply_to"] == "generation"
    want = tiny_pack.calibrated_strength("actadd") or 1.0
    assert echo[1]["strength"] == pytest.approx(want)
    card = client.get(f"/v1/models/{MODEL}+strip-then-add").json()
    assert [e["method"] for e in card["steering"]] == ["ablate", "actadd"]


# ---- targeting and conditions -----------------------------------------------------------------

def test_targeting_is_echoed_and_a_late_window_keeps_the_first_tokens(client):
    plain = chat(client, logprobs=True, top_logprobs=2).json()
    late = chat(client, {"method": "actadd", "strength": 3.0, "generation_window": [4]},
                logprobs=True, top_logprobs=2).json()
    assert late["steering"]["apply_to"] == "generation"
    assert late["steering"]["generation_window"] == [4, None]
    first = [t["logprob"] for t in plain["choices"][0]["logprobs"]["content"][:4]]
    assert [t["logprob"] for t in late["choices"][0]["logprobs"]["content"][:4]] == first
    assert "apply_to" not in plain["steering"]  # untargeted echoes stay as they were


def test_condition_decides_per_request_and_reports_its_score(client):
    score = score_of(client)
    on = chat(client, {"method": "actadd", "strength": 3.0, "when": {"above": score - 1}})
    off = chat(client, {"method": "actadd", "strength": 3.0, "when": {"below": score - 1}})
    assert on.json()["steering"]["condition"] == {"score": pytest.approx(score), "applied": True}
    assert off.json()["steering"]["condition"]["applied"] is False
    assert text_of(on) == text_of(chat(client, {"method": "actadd", "strength": 3.0}))
    assert text_of(off) == text_of(chat(client))
    assert on.json()["steering"]["when"] == {"pack": "refusal", "layer": pytest.approx(
        on.json()["steering"]["when"]["layer"]), "above": score - 1}


def test_streamed_chat_closes_with_the_decided_condition(client):
    score = score_of(client)
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True,
        "steering": [{"method": "ablate", "apply_to": "generation"},
                     {"method": "actadd", "strength": 2.0, "when": {"above": score + 1}}]})
    events = sse(r)
    opening, closing = events[0], [e for e in events[:-1]
                                   if e["choices"] and e["choices"][0]["finish_reason"]][0]
    assert opening["steering"][1]["condition"] is None  # decided at prefill, after this chunk
    assert closing["steering"][1]["condition"] == {"score": pytest.approx(score),
                                                   "applied": False}
    assert closing["steering"][0]["apply_to"] == "generation"


def test_completions_take_lists_and_conditions(client):
    r = client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
        "steering": [{"method": "none", "when": {"above": 0.5}}, {"method": "ablate"}]})
    assert r.status_code == 200, r.text
    echo = r.json()["steering"]
    assert echo[0]["condition"] is not None and echo[1]["method"] == "ablate"


@pytest.mark.parametrize("steering, param, status", [
    ([{"method": "ablate"}, {"method": "actadd", "generation_window": "x"}],
     "steering[1].generation_window", 400),
    ([{"method": "ablate"}, {"method": "actadd", "generation_window": [3, 2]}],
     "steering[1].generation_window", 400),
    ([{"method": "ablate"}, {"method": "actadd", "generation_window": [0, 2],
                             "apply_to": "prompt"}], "steering[1].generation_window", 400),
    ({"method": "actadd", "apply_to": "answer"}, "steering.apply_to", 400),
    ({"method": "actadd", "when": {"above": 0.1, "below": 0.9}}, "steering.when", 400),
    ({"method": "actadd", "when": {"above": 0.5, "side": 1}}, "steering.when.side", 400),
    ([{"method": "actadd", "when": {"pack": "nope", "above": 0.5}}],
     "steering[0].when.pack", 404),
    ([{"method": "ablate"}, {"method": "actadd", "strength": 99}], "steering[1].strength", 400),
    ([{"method": "ablate"}, {"method": "bogus"}], "steering[1].method", 400),
    ([], "steering", 400),
    ([{"method": "none"}] * 9, "steering", 400),
    ([{"method": "ablate"}, "ablate"], "steering[1]", 400),
])
def test_bad_controls_name_the_field(client, steering, param, status):
    r = chat(client, steering)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()


# ---- policy and audit -------------------------------------------------------------------------

def test_policy_checks_every_object_of_a_list(keyed):
    ok = chat(keyed, [{"method": "actadd", "strength": 1.0}], headers=_auth("k-adder"))
    assert ok.status_code == 200, ok.text
    denied = chat(keyed, [{"method": "actadd", "strength": 1.0}, {"method": "ablate"}],
                  headers=_auth("k-adder"))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "policy_methods"
    assert chat(keyed, ABLATE_ADD, headers=_auth("k-all")).status_code == 200


def test_audit_line_records_the_list_and_the_condition(client, caplog):
    score = score_of(client)
    with caplog.at_level(logging.INFO, logger="steer.audit"):
        r = chat(client, [{"method": "ablate"},
                          {"method": "actadd", "strength": 2.0, "apply_to": "generation",
                           "when": {"above": score - 1}}])
    assert r.status_code == 200
    lines = [json.loads(rec.getMessage()) for rec in caplog.records
             if rec.name == "steer.audit"]
    line = lines[-1]
    assert line["method"] == "composed"
    assert [s["method"] for s in line["steering"]] == ["ablate", "actadd"]
    assert line["steering"][1]["apply_to"] == "generation"
    assert line["steering"][1]["condition"] == {"score": pytest.approx(score), "applied": True}


def test_methods_endpoint_documents_the_controls(client):
    data = client.get("/v1/steering/methods").json()
    controls = data["controls"]
    assert set(controls) == {"apply_to", "generation_window", "when", "list"}
    assert controls["apply_to"]["values"] == ["all", "prompt", "generation"]
    assert "refusal" in controls["when"]["packs"]


# ---- compare --------------------------------------------------------------------------------------

VARIANTS = [
    {"method": "none"},
    ABLATE_ADD,  # a bare list
    {"label": "late", "steering": [{"method": "actadd", "strength": 2.0,
                                    "generation_window": [2]}]},
    {"method": "actadd", "strength": 2.0, "when": {"above": -100}},
]


def _compare(client, **extra):
    return client.post("/v1/steering/compare", json={
        "model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0, "seed": 3,
        "ignore_eos": True, "variants": VARIANTS, **extra})


def test_compare_list_and_conditional_variants_equal_their_chats(client):
    r = _compare(client)
    assert r.status_code == 200, r.text
    out = r.json()["variants"]
    singles = [None, ABLATE_ADD, VARIANTS[2]["steering"], VARIANTS[3]]
    for v, steering in zip(out, singles):
        assert v["completion"] == text_of(chat(client, steering)), v["steering"]
    assert out[2]["label"] == "late" and isinstance(out[1]["steering"], list)
    assert out[3]["steering"]["condition"]["applied"] is True


def test_streamed_compare_tags_events_by_variant(client):
    plain = _compare(client).json()
    events = sse(_compare(client, stream=True))
    assert events[0]["type"] == "start" and len(events[0]["variants"]) == len(VARIANTS)
    assert events[-1] == "[DONE]" and events[-2]["type"] == "done"
    texts = {i: "" for i in range(len(VARIANTS))}
    finished = []
    for e in events[1:-2]:
        if e["type"] == "delta":
            assert e["index"] not in finished  # no text after a variant's result
            texts[e["index"]] += e["text"]
        else:
            assert e["type"] == "variant"
            finished.append(e["index"])
            assert e["result"]["completion"] == texts[e["index"]]
    assert sorted(finished) == list(range(len(VARIANTS)))
    done = events[-2]["compare"]
    for a, b in zip(done["variants"], plain["variants"]):
        assert a["completion"] == b["completion"] and a["steering"] == b["steering"]


@pytest.mark.parametrize("variant, param", [
    ([{"method": "ablate"}, {"method": "actadd", "generation_window": [5, 1]}],
     "variants[1].steering[1].generation_window"),
    ({"label": "x", "steering": [{"method": "bogus"}]}, "variants[1].steering[0].method"),
    ({"method": "ablate", "steering": [{"method": "ablate"}]}, "variants[1].steering"),
])
def test_bad_list_variants_name_the_field(client, variant, param):
    r = client.post("/v1/steering/compare", json={
        "model": MODEL, "messages": HELLO, "max_tokens": 4,
        "variants": [{"method": "none"}, variant]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
