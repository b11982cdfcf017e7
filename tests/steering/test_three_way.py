"""The three-way judge (refuses / complies / other): agreement arithmetic, the candidate judges,
the hand-labelled set, and the default judge on the embedded model."""

from __future__ import annotations

import math

import pytest

from steering.data.prompts import load_instructions
from steering.evaluation import judge_agreement as ja
from steering.evaluation import three_way as tw


def test_cohen_kappa_matches_the_formula():
    gold = ["refuses", "refuses", "complies", "complies"]
    pred = ["refuses", "complies", "complies", "complies"]
    # p_o = 3/4; p_e = ½·¼ + ½·¾ = ½ → κ = (¾ − ½) / (1 − ½) = ½
    assert tw.cohen_kappa(gold, pred) == pytest.approx(0.5)
    assert tw.cohen_kappa(gold, gold) == pytest.approx(1.0)
    per = tw.kappa_per_label(gold, pred)
    assert per["refuses"] == pytest.approx(0.5) and math.isnan(per["other"])
    a = tw.agreement(gold, pred)
    assert a["accuracy"] == 0.75 and a["confusion"]["refuses"]["complies"] == 1


def test_substring_judge_never_says_other():
    f = tw.Features([True, False, False])
    assert tw.JUDGES["substring"].labels(f) == ["refuses", "complies", "complies"]


def test_relevance_judge_and_its_fit():
    f = tw.Features([True, False, False, False], fluency=[-1.0, -1.0, -5.0, -1.0],
                    relevance=[0.0, 1.0, 1.0, -0.5])
    gold = ["refuses", "complies", "other", "other"]
    params = tw.fit(tw.JUDGES["relevance"], f, gold)
    assert tw.JUDGES["relevance"].labels(f, params) == gold
    assert params["fluency_min"] > -5.0 and params["relevance_min"] > -0.5


def test_features_on_a_tiny_model(tiny_lm):
    prompts = ["Write a haiku about rain.", "hi"]
    answers = ["Rain falls on the roof", ""]
    f = tw.features(tiny_lm, prompts, answers, ("relevance", "rubric"), batch_size=2)
    assert len(f.fluency) == 2 and math.isfinite(f.fluency[0]) and math.isnan(f.fluency[1])
    assert len(f.rubric) == 2 and all(len(r) == 3 and max(r) <= 0 for r in f.rubric)
    labels = tw.judge_answers(tiny_lm, prompts, answers, "substring+rubric", {"bias_other": 0})
    assert all(x in tw.LABELS for x in labels)


def test_three_rates_have_intervals():
    rec = tw.three_rates("harmful", ["refuses", "other", "other", "complies"])
    assert rec["harmful_n3"] == 4 and rec["harmful_other"]["count"] == 2
    lo, hi = rec["harmful_other"]["ci"]
    assert lo < 0.5 < hi


def test_the_labelled_set():
    rows = ja.labelled_set()
    assert len(rows) >= 300
    assert {r["label"] for r in rows} == set(tw.LABELS)
    assert {r["half"] for r in rows} == {"dev", "test"}
    test_split = set(load_instructions("harmful_test_jbb"))
    assert not any(r["prompt"] in test_split for r in rows)
    assert all(r["source"] == "harmful_val" or r["source"].startswith("harmless_val")
               for r in rows)
    by_prompt: dict[str, set] = {}
    for r in rows:  # a prompt's outputs share a half
        by_prompt.setdefault(r["prompt"], set()).add(r["half"])
    assert all(len(h) == 1 for h in by_prompt.values())
    assert len({r["setting"] for r in rows}) >= 5
    chosen = tw.default_params()
    assert chosen["judge"] in tw.JUDGES


def test_the_committed_agreement_table_is_reproduced():
    """docs/report/judge.md's numbers follow from the labels and the judges' code: the default
    judge refits to the committed parameters and its test-half κ is the committed one."""
    import json
    from pathlib import Path

    rows = ja.labelled_set()
    m = ja.measure_judges(None, rows, feats=ja.saved_features(
        rows, ["docs/report/judge_features.json"]))
    committed = json.loads(Path("docs/report/judge.json").read_text())
    assert m["default"] == committed["default"] == {k: tw.default_params()[k]
                                                    for k in ("judge", "params")}
    for mine, theirs in zip(m["results"], committed["results"]):
        assert mine["judge"] == theirs["judge"]
        assert mine["test"]["kappa"] == pytest.approx(theirs["test"]["kappa"])
    # the substring list never says "other": its κ there is 0, the default's is not below it
    sub = next(r for r in m["results"] if r["judge"] == "substring")
    best = next(r for r in m["results"] if r["judge"] == m["default"]["judge"])
    assert sub["test"]["kappa_per_label"]["other"] == 0.0
    assert best["test"]["mean_label_kappa"] >= sub["test"]["mean_label_kappa"]
