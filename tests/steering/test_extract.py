"""Extraction's selection rule, prompt filters, calibration record and pack-cache versioning."""

from __future__ import annotations

import pytest

from server.presets import load_presets
from steering.extraction.extract import EXTRACT_VERSION, _keep, select


def cand(layer, bypass, induce, kl, score=0.0):
    return {"layer": layer, "position": -1, "bypass_rate": bypass, "induce_rate": induce,
            "kl": kl, "bypass_score": score}


def test_select_uses_both_filters_then_lowest_bypass():
    scores = [cand(1, 0.0, 0.9, 0.5),  # best bypass, but KL too high
              cand(2, 0.2, 0.3, 0.05),  # low KL, induces too little
              cand(3, 0.3, 0.6, 0.05),
              cand(4, 0.1, 0.7, 0.08)]
    chosen, filters = select(scores, kl_threshold=0.1, induce_threshold=0.5)
    assert filters == "kl+induce" and chosen["layer"] == 4
    assert scores[0]["passes"] == {"kl": False, "induce": True}
    assert scores[1]["passes"] == {"kl": True, "induce": False}


def test_select_falls_back_to_kl_then_to_nothing_and_says_so():
    scores = [cand(1, 0.0, 0.2, 0.5), cand(2, 0.3, 0.2, 0.05), cand(3, 0.3, 0.4, 0.01)]
    chosen, filters = select(scores, 0.1, 0.5)
    assert filters == "kl" and chosen["layer"] == 3  # tie on bypass: the higher induce rate
    chosen, filters = select([cand(1, 0.5, 0.0, 0.5), cand(2, 0.2, 0.0, 0.9)], 0.1, 0.5)
    assert filters == "none" and chosen["layer"] == 2


def test_select_breaks_rate_ties_with_the_first_token_score():
    scores = [cand(1, 0.1, 0.8, 0.01, score=-1.0), cand(2, 0.1, 0.8, 0.01, score=-3.0)]
    assert select(scores, 0.1, 0.5)[0]["layer"] == 2


def test_keep_applies_the_filter_or_records_why_not():
    prompts = list("abcdef")
    kept, rec = _keep(prompts, [True, False, True, True, False, True], True, minimum=3)
    assert kept == [0, 2, 3, 5] and rec == {"scanned": 6, "passed": 4, "kept": 4,
                                           "applied": True, "rule": "refused"}
    kept, rec = _keep(prompts, [True, False, False, False, False, False], True, minimum=3)
    assert kept == list(range(6)) and not rec["applied"] and rec["passed"] == 1
    kept, rec = _keep(prompts, [True, False, False, False, False, False], False, minimum=3)
    assert kept == [1, 2, 3, 4, 5] and rec["rule"] == "answered"


def test_tiny_pack_records_selection_filters_and_calibration(tiny_pack):
    meta = tiny_pack.meta
    assert meta["extract_version"] == EXTRACT_VERSION
    sel = meta["selection"]
    assert sel["filters"] in {"kl+induce", "kl", "none"}
    assert all({"bypass_rate", "induce_rate", "kl", "passes"} <= set(c) for c in sel["candidates"])
    for split in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        f = meta["data"][split]["filter"]
        assert f["kept"] == meta["data"][split]["n"] and f["passed"] <= f["scanned"]
    cal = meta["calibration"]
    for method in ("actadd", "ace"):
        entry = cal[method]
        assert entry["strength"] in {t["strength"] for t in entry["tried"]}
        assert entry["reached"] == (entry["harmless_val_refusal"] >= entry["target"])
        assert tiny_pack.calibrated_strength(method) == entry["strength"]
    assert tiny_pack.calibrated_strength("none") is None
    assert tiny_pack.layer in tiny_pack.inlp_default_layers or not tiny_pack.inlp


def test_calibrated_presets_resolve_to_the_packs_strength(tiny_lm, tiny_pack):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    presets = load_presets(None)
    assert presets["more-refusal"].calibrated and not presets["no-refusal"].calibrated
    app = create_app(Settings(), lm=tiny_lm, packs=[tiny_pack])
    with TestClient(app) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        want = tiny_pack.calibrated_strength("actadd")
        more = next(m for k, m in models.items() if k.endswith("+more-refusal"))
        assert more["steering"]["strength"] == want
        methods = {m["id"]: m for m in client.get("/v1/steering/methods").json()["data"]}
        assert methods["actadd"]["packs"]["refusal"]["calibrated_strength"] == want
        body = {"model": more["id"], "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}]}
        res = client.post("/v1/chat/completions", json=body).json()
        assert res["steering"]["strength"] == want
        body["steering"] = {"strength": 0.5}  # an explicit strength wins
        res = client.post("/v1/chat/completions", json=body).json()
        assert res["steering"]["strength"] == 0.5


def test_stale_cached_pack_is_extracted_again(tiny_lm, tiny_pack, tmp_path, monkeypatch):
    import steering.extraction.extract as extract
    from steering.extraction import store

    monkeypatch.setenv("STEERING_CACHE", str(tmp_path))
    target = store.default_pack_path(tiny_lm)
    assert f"extract-v{EXTRACT_VERSION}" in str(target)
    old = tiny_pack.meta.copy()
    tiny_pack.meta = {**old, "extract_version": 1}
    try:
        tiny_pack.save(target)
        tiny_pack.save(tmp_path / "mine" / "refusal")
    finally:
        tiny_pack.meta = old
    calls = []
    monkeypatch.setattr(extract, "extract_pack",
                        lambda lm, config=None, name="refusal": calls.append(name) or tiny_pack)
    pack = store.ensure_pack(tiny_lm)
    assert calls == ["refusal"] and pack is tiny_pack
    assert store.ensure_pack(tiny_lm).meta["extract_version"] == EXTRACT_VERSION  # re-saved
    # a pack the user names explicitly is used as given
    assert store.ensure_pack(tiny_lm, tmp_path / "mine" / "refusal").meta[
        "extract_version"] == 1
    assert calls == ["refusal"]


@pytest.mark.parametrize("bad", ["calibratedd", "max"])
def test_unknown_strength_words_are_rejected(bad):
    from server.presets import PresetError, parse_presets

    with pytest.raises(PresetError, match="strength"):
        parse_presets({"x": {"method": "actadd", "strength": bad}})


def test_judging_only_kl_passing_candidates_keeps_the_choice():
    """`_candidate_scores` judges bypass and induce only where KL passes (everywhere when none
    does): on any score table, hiding the other candidates' rates leaves `select` unchanged."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        full = [cand(i, rng.choice([0.0, 0.1, 0.2]), rng.choice([0.3, 0.5, 0.7]),
                     rng.choice([0.05, 0.2]), rng.random()) for i in range(6)]
        if any(c["kl"] < 0.1 for c in full):
            staged = [c if c["kl"] < 0.1 else {**c, "bypass_rate": None, "induce_rate": None,
                                                "bypass_score": None} for c in full]
        else:
            staged = [dict(c) for c in full]
        a, fa = select(full, 0.1, 0.5)
        b, fb = select(staged, 0.1, 0.5)
        assert (a["layer"], fa) == (b["layer"], fb)
