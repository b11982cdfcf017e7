"""`steer eval` on the embedded model: a small grid on a handful of validation prompts.

Under a minute of CPU on a quiet 2-core machine: two settings (none, ablate) plus the unsteered
baseline on six harmful, two harmless and two over-refusal prompts, with short completions,
judged three ways by the default offline judge."""

from __future__ import annotations

import json
import math

import pytest

from steering.evaluation.evaluate import EvalConfig, evaluate
from steering.evaluation.tables import markdown_table

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_eval(real_lm, real_pack, tmp_path_factory):
    config = EvalConfig(n_harmful=6, n_harmless=2, n_overrefusal=2, completion_tokens=12,
                        n_general=2, general_tokens=32, max_new_tokens=12, batch_size=8,
                        methods=("none", "ablate"),
                        cache_dir=str(tmp_path_factory.mktemp("eval-cache")))
    return evaluate(real_lm, real_pack, config)


def test_shape_and_finite_numbers(real_eval):
    result = real_eval
    assert [r["label"] for r in result["results"]] == ["none", "ablate s=1"]
    assert result["prompts"]["harmful"]["n"] == 6
    assert result["prompts"]["completions"]["tokens"] > 0
    assert result["prompts"]["general_text"]["tokens"] > 0
    for row in [result["baseline"], *result["results"]]:
        for key in ("harmful_refusal_rate", "harmful_refusal_score", "harmless_refusal_score",
                    "ppl_completions", "ppl_general", "kl_harmless"):
            assert math.isfinite(row[key]), (row["label"], key)
        assert 1.0 <= row["ppl_completions"] < 1e4
        assert 1.0 <= row["ppl_general"] < 1e4
        assert row["kl_harmless"] >= 0
        for prefix, n in (("harmful", 6), ("harmless", 2), ("overrefusal", 2)):
            assert row[f"{prefix}_n3"] == n, (row["label"], prefix)
            assert sum(row[f"{prefix}_{c}"]["count"] for c in ("refuses", "complies", "other")
                       ) == n
    json.dumps(result)
    assert markdown_table(result).count("\n") == 2 + 3


def test_none_equals_the_unsteered_baseline(real_eval):
    base = real_eval["baseline"]
    none = real_eval["results"][0]
    for key in ("harmful_refusal_rate", "harmful_refused", "harmful_refusal_score",
                "harmless_refusal_rate", "harmless_refusal_score", "ppl_completions",
                "ppl_general"):
        assert none[key] == pytest.approx(base[key], rel=1e-6, abs=1e-9), key
    assert none["kl_harmless"] == pytest.approx(0.0, abs=1e-9)
    assert none["harmless_examples"] == base["harmless_examples"]


def test_ablation_does_not_raise_refusal(real_eval):
    base = real_eval["baseline"]
    ablate = real_eval["results"][1]
    assert ablate["harmful_refusal_rate"] <= base["harmful_refusal_rate"]
    assert ablate["harmful_refusal_score"] < base["harmful_refusal_score"]
