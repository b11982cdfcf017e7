"""Issue 28 item 3 and issue 26 item 4 on the tiny model: any configured keys source turns
authentication on (an empty store answers 401, never opens the server), and the keys file is
one pydantic schema that names the field it refuses."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.security.auth import hash_key, keys_configured, load_keys, parse_keys
from server.security.policy import PolicyError
from server.settings import Settings

MODEL = "tiny-qwen2"
BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("source", [
    {"keys": ""},                                   # STEER_KEYS set, empty
    {"keys": '{"keys": []}'},                       # a document with no keys
    {"keys": "keys: []\n"},
    {"keys": "null"},
    {"keys_file": "empty.yaml"},                    # an empty file
    {"keys_file": "none.yaml"},                     # a file whose document has no keys
    {"auth": True},
], ids=["env-empty", "json-no-keys", "yaml-no-keys", "null", "empty-file", "file-no-keys",
        "auth-flag"])
def test_any_keys_source_turns_authentication_on(tiny_lm, tiny_pack, tmp_path, source):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "none.yaml").write_text("default: {methods: '*'}\nkeys: []\n")
    if "keys_file" in source:
        source = {"keys_file": str(tmp_path / source["keys_file"])}
    settings = Settings(**source)
    assert keys_configured(settings)
    assert len(load_keys(settings)) == 0
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app, raise_server_exceptions=False) as c:
        for r in (c.post("/v1/completions", json=BODY),
                  c.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer x"}),
                  c.get("/v1/models"),
                  c.delete("/v1/steering/packs/refusal")):
            assert r.status_code == 401, r.text
        assert c.get("/healthz").status_code == 200  # the probes stay open
        assert c.get("/readyz").status_code == 200
        assert c.app.state.steer.packs.keys() == {"refusal"}  # nothing was deleted


def test_no_keys_source_is_local_use(tiny_lm, tiny_pack):
    settings = Settings()
    assert not keys_configured(settings)
    app = create_app(settings, lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app) as c:
        assert c.post("/v1/completions", json=BODY).status_code == 200


@pytest.mark.parametrize("entry, field", [
    ({"lower_refusal": "yes"}, "lower_refusal"),
    ({"admin": "yes"}, "admin"),
    ({"pack_admin": 1}, "pack_admin"),
    ({"lower_refusals": True}, "lower_refusals"),         # a typo is not ignored
    ({"max_strength": True}, "max_strength"),
    ({"max_strength": -1}, "max_strength"),
    ({"max_k": 1.5}, "max_k"),
    ({"methods": "ablate"}, "methods"),
    ({"strength": {"actadd": {"min": 2, "max": 1}}}, "strength.actadd"),
    ({"strength": {"actadd": {"low": 0}}}, "strength.actadd.low"),
    ({"strength": {"ace": {"min": float("nan")}}}, "strength.ace.min"),
    ({"strength": [0, 1]}, "strength"),
    ({"id": "../x"}, "id"),
    ({"sha256": "abc"}, "keys[0]"),
])
def test_keys_file_names_the_field_it_refuses(entry, field):
    doc = {"keys": [{"id": "x", "sha256": "0" * 64, **entry}]}
    with pytest.raises(PolicyError) as err:
        parse_keys(doc, "keys.yaml")
    assert str(err.value).startswith("keys.yaml: ") and field in str(err.value), err.value


def test_keys_file_fields_become_the_policy():
    store = parse_keys({
        "default": {"methods": ["none", "actadd"], "max_strength": 3},
        "keys": [{"id": "a", "sha256": hash_key("ka").upper(), "methods": "*", "max_k": 2,
                  "strength": {"actadd": {"min": 0}}, "lower_refusal": True,
                  "pack_admin": True, "admin": True},
                 {"id": "b", "sha256": hash_key("kb")}]})
    a, b = store.lookup("ka"), store.lookup("kb")
    assert a.policy.methods is None and a.policy.max_k == 2 and a.policy.max_strength == 3
    assert a.policy.bounds("actadd") == (0.0, None) and a.policy.lower_refusal
    assert a.admin and a.pack_admin
    assert b.policy.methods == frozenset({"none", "actadd"}) and not b.policy.lower_refusal
    assert not b.admin and not b.pack_admin
    with pytest.raises(PolicyError, match="duplicate"):
        parse_keys({"keys": [{"id": "a", "sha256": "0" * 64}, {"id": "a", "sha256": "1" * 64}]})
    with pytest.raises(PolicyError, match="lower_refusal"):  # item 4: the upload grant needs it
        parse_keys({"keys": [{"id": "a", "sha256": "0" * 64, "pack_admin": True}]})


def test_inline_json_and_yaml_files_agree(tmp_path):
    doc = {"keys": [{"id": "a", "sha256": hash_key("ka"), "methods": ["none"]}]}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    (tmp_path / "k.yaml").write_text(f"keys:\n  - id: a\n    sha256: {hash_key('ka')}\n"
                                     "    methods: [none]\n")
    for settings in (Settings(keys=json.dumps(doc)), Settings(keys_file=str(tmp_path / "k.json")),
                     Settings(keys_file=str(tmp_path / "k.yaml"))):
        assert load_keys(settings).lookup("ka").policy.methods == frozenset({"none"})
