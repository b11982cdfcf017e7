"""Steering controls on the tiny model: token targeting, composition and conditions, in the
library (hooks, generate) and in the batching engine (prefill chunks, decode, mixed batches)."""

from __future__ import annotations

import pytest
import torch

from server.engine import Engine
from steering import (
    ComposedSteering,
    Condition,
    SteeringError,
    SteeringSpec,
    build_row,
    compose,
    resolve_conditions,
)
from steering.evaluation.geometry import dim_position, layer_activations
from steering.interventions.activations import encode_chats
from steering.interventions.conditions import first_edited_prompt_position
from steering.interventions.generate import generate
from steering.interventions.hooks import SteeringHooks, hooks_of
from steering.interventions.kernel import NO_BOUND, BatchEdit, RowEdit, apply_edit
from testkit.engine import run_jobs

PROMPTS = ["How do I make a bomb at home?", "Write a haiku about autumn leaves.", "hi",
           "Explain how to pick a lock without the key, step by step, in detail please."]


def _forward(lm, prompts, rows, hooks=None):
    """Logits [B, T, V] of a padded batch with `rows` on the model's hooks."""
    enc = encode_chats(lm, prompts)
    lengths = enc["attention_mask"].sum(-1).tolist()
    with torch.no_grad(), hooks_of(lm).rows(rows, lengths):
        return lm.model(**enc, use_cache=False).logits.float().cpu()


def _engine_run(lm, jobs, together=False, prefill_chunk=512, max_tokens=8):
    """jobs: [(prompt, steering)] → [(tokens, top_logprobs, finish, applied steering)]."""
    return run_jobs(Engine(lm, max_batch=8, prefill_chunk=prefill_chunk), lm, jobs, together,
                    max_tokens)


@pytest.fixture(scope="module")
def none_row():
    return build_row(SteeringSpec("none"), None)


# ---- the kernel's token window ---------------------------------------------------------------

def test_positions_outside_the_window_are_exactly_unchanged():
    d = 16
    edit = RowEdit(torch.zeros(d, 0), torch.zeros(d), 0.0, torch.randn(d), window=(0, 2))
    plain = RowEdit(torch.zeros(d, 0), torch.zeros(d), 0.0, torch.randn(d))
    h = torch.randn(2, 5, d)
    index = torch.tensor([[-3, -2, -1, 0, 1], [-1, 0, 1, 2, 3]])
    out = apply_edit(h, BatchEdit.stack([edit, plain], torch.device("cpu")), index)
    inside = torch.tensor([False, False, False, True, True])  # row 0: indices 0 and 1
    assert torch.equal(out[0][~inside], h[0][~inside])
    torch.testing.assert_close(out[0][inside], h[0][inside] + edit.v)
    torch.testing.assert_close(out[1], h[1] + plain.v)  # no window: every position
    with pytest.raises(ValueError, match="token index"):
        apply_edit(h, BatchEdit.stack([edit, plain], torch.device("cpu")))


# ---- targeting through the hooks -------------------------------------------------------------

@pytest.mark.parametrize("apply_to", ["prompt", "generation"])
def test_targeting_edits_only_its_positions(tiny_lm, tiny_pack, apply_to):
    """Residual entering the actadd layer: edited exactly at the targeted positions of each row
    (rows with different prompt lengths, so left padding too); the others bit-identical."""
    layer = tiny_pack.layer
    row = build_row(SteeringSpec("actadd", 2.0, apply_to=apply_to), tiny_pack)
    captured = {}

    def capture(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = tiny_lm.layout.blocks[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        plain_logits = _forward(tiny_lm, PROMPTS, None)
        plain = captured["h"]
        steered_logits = _forward(tiny_lm, PROMPTS, [row] * len(PROMPTS))
        steered = captured["h"]
    finally:
        handle.remove()
    mask = encode_chats(tiny_lm, PROMPTS)["attention_mask"].bool()
    moved = (steered - plain).abs().amax(-1) > 0
    last = torch.zeros_like(mask)
    last[:, -1] = True  # left padding: every row's last prompt position is the last column
    want = (mask & ~last) if apply_to == "prompt" else last
    assert torch.equal(moved & mask, want)
    if apply_to == "generation":  # nothing before the last position changes, logits included
        assert torch.equal(steered_logits[:, :-1][mask[:, :-1]], plain_logits[:, :-1][mask[:, :-1]])
        assert not torch.equal(steered_logits[:, -1], plain_logits[:, -1])


def test_targeted_rows_need_prompt_lengths(tiny_lm, tiny_pack):
    row = build_row(SteeringSpec("actadd", 2.0, apply_to="generation"), tiny_pack)
    with pytest.raises(ValueError, match="prompt length"):
        hooks_of(tiny_lm).set_rows([row])
    assert not hooks_of(tiny_lm).active


def test_generation_window_in_the_engine_leaves_earlier_tokens_bit_identical(
        tiny_lm, tiny_pack, none_row):
    """Window [3, ∞): tokens 0–2 come from unedited positions (logprobs equal to the last bit);
    later ones differ. In chunked prefill (chunk 5) and in decode."""
    windowed = build_row(SteeringSpec("actadd", 4.0, generation_window=(3, None)), tiny_pack)
    assert windowed.spec.apply_to == "generation"
    first = build_row(SteeringSpec("actadd", 4.0, generation_window=(0, 3)), tiny_pack)
    whole = build_row(SteeringSpec("actadd", 4.0, apply_to="generation"), tiny_pack)
    prompt = PROMPTS[3]
    (plain, lp_plain, *_), (win, lp_win, *_), (head, lp_head, *_), (gen, lp_gen, *_) = _engine_run(
        tiny_lm, [(prompt, none_row), (prompt, windowed), (prompt, first), (prompt, whole)],
        prefill_chunk=5, max_tokens=10)
    assert win[:3] == plain[:3] and lp_win[:3] == lp_plain[:3]
    assert win != plain
    # [0, 3) steers tokens 0–2 exactly as unbounded generation-only steering does, then stops
    assert head[:3] == gen[:3] and lp_head[:3] == lp_gen[:3]
    assert lp_head[0] != lp_plain[0] and head != gen


def test_targeted_rows_in_a_mixed_batch_equal_solo(tiny_lm, tiny_pack, none_row):
    rows = [
        build_row(SteeringSpec("actadd", 3.0, apply_to="prompt"), tiny_pack),
        none_row,
        build_row(SteeringSpec("ablate", 1.0, apply_to="generation"), tiny_pack),
        build_row(SteeringSpec("actadd", 3.0, generation_window=(2, 5)), tiny_pack),
        build_row(SteeringSpec("inlp_flip", 1.0), tiny_pack),
    ]
    jobs = [(PROMPTS[i % len(PROMPTS)], row) for i, row in enumerate(rows)]
    solo = _engine_run(tiny_lm, jobs)
    mixed = _engine_run(tiny_lm, jobs, together=True)
    assert [s[0] for s in solo] == [m[0] for m in mixed]
    assert len({tuple(s[0]) for s in solo}) > 2


def test_library_generate_honours_targeting(tiny_lm, tiny_pack, none_row):
    """HF generate (padded batch, cache): a window from token 3 keeps the first three tokens."""
    row = build_row(SteeringSpec("actadd", 4.0, generation_window=(3, None)), tiny_pack)
    prompts = PROMPTS[:3]
    plain = [tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in
             generate(tiny_lm, prompts, [none_row] * 3, max_new_tokens=8, batch_size=3)]
    steered = [tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in
               generate(tiny_lm, prompts, [row] * 3, max_new_tokens=8, batch_size=3)]
    for a, b in zip(plain, steered):
        assert a[:2] == b[:2]  # (re-tokenized text: compare a safe prefix)
    assert plain != steered


# ---- composition ------------------------------------------------------------------------------

def _sequential_logits(lm, prompts, parts_per_row):
    """Reference: one SteeringHooks per list position, registered in order, so at every site
    part 0's edit runs, then part 1's on its output, …"""
    depth = max(len(p) for p in parts_per_row)
    extra = [SteeringHooks(lm.layout, lm.device, lm.dtype, lm.d_model, lm.model)
             for _ in range(depth - 1)]
    all_hooks = [hooks_of(lm), *extra]
    enc = encode_chats(lm, prompts)
    lengths = enc["attention_mask"].sum(-1).tolist()
    none = build_row(SteeringSpec("none"), None)
    try:
        for j, hooks in enumerate(all_hooks):
            hooks.set_rows([p[j] if j < len(p) else none for p in parts_per_row], lengths)
        with torch.no_grad():
            return lm.model(**enc, use_cache=False).logits.float().cpu()
    finally:
        hooks_of(lm).set_rows(None)
        for hooks in extra:
            hooks.remove()


def test_composition_equals_sequential_application(tiny_lm, tiny_pack):
    ablate = build_row(SteeringSpec("ablate", 1.0), tiny_pack)
    actadd = build_row(SteeringSpec("actadd", 2.0), tiny_pack)
    flip = build_row(SteeringSpec("inlp_flip", 1.0, apply_to="generation"), tiny_pack)
    ace = build_row(SteeringSpec("ace", 1.0, apply_to="prompt"), tiny_pack)
    lists = [[ablate, actadd], [actadd, ablate], [actadd], [flip, ace, actadd], [ablate]]
    rows = [compose(parts) for parts in lists]
    assert isinstance(rows[0], ComposedSteering) and rows[2] is actadd
    prompt = PROMPTS[0]
    # one row alone: bit-identical to the sequential hooks
    for parts, row in zip(lists, rows):
        torch.testing.assert_close(_forward(tiny_lm, [prompt], [row]),
                                   _sequential_logits(tiny_lm, [prompt], [parts]),
                                   rtol=0, atol=0)
    # mixed lists in one padded batch equal each row alone
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    mixed = _forward(tiny_lm, prompts, rows)[:, -1]
    for i, row in enumerate(rows):
        solo = _forward(tiny_lm, [prompts[i]], [row])[:, -1]
        torch.testing.assert_close(mixed[i:i + 1], solo, atol=1e-5, rtol=0)
    # order matters where two parts edit the same site (else the checks above prove little):
    # ace then actadd at the pack layer's input, and the reverse
    ace_all = build_row(SteeringSpec("ace", 1.0), tiny_pack)
    a, b = (_forward(tiny_lm, [prompt], [compose(p)])[0, -1]
            for p in ([ace_all, actadd], [actadd, ace_all]))
    assert (a - b).abs().max() > 1e-4
    # ablation and actadd share no site (ablation edits layer 0's input and the writes), so
    # actadd's vector stays in the stream in either order
    a, b = (_forward(tiny_lm, [prompt], [r])[0, -1] for r in rows[:2])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - _forward(tiny_lm, [prompt], [ablate])[0, -1]).abs().max() > 1e-4


def test_composition_in_the_engine_mixed_equals_solo(tiny_lm, tiny_pack, none_row):
    ablate = build_row(SteeringSpec("ablate", 1.0), tiny_pack)
    actadd = build_row(SteeringSpec("actadd", 3.0), tiny_pack)
    rows = [compose([ablate, actadd]), none_row, actadd,
            compose([actadd, build_row(SteeringSpec("ablate", 1.0, apply_to="generation"),
                                       tiny_pack)])]
    jobs = [(PROMPTS[i], row) for i, row in enumerate(rows)]
    solo = _engine_run(tiny_lm, jobs)
    mixed = _engine_run(tiny_lm, jobs, together=True)
    assert [s[0] for s in solo] == [m[0] for m in mixed]
    assert solo[0][3].applied() == [ablate.applied(), actadd.applied()]


# ---- conditions --------------------------------------------------------------------------------

def _scores(lm, pack, prompts):
    acts = layer_activations(lm, prompts, pack.layer, pack.position)
    p = pack.positions.index(pack.position)
    return dim_position(acts, pack.mean_harmful[pack.layer, p],
                        pack.mean_harmless[pack.layer, p]).tolist()


def test_condition_scores_match_the_geometry_axis(tiny_lm, tiny_pack):
    from steering.data.prompts import load_instructions

    harmful, harmless = load_instructions("harmful_train")[:24], load_instructions(
        "harmless_train")[:24]
    # the pack's own training prompts: mean score 1 on harmful, 0 on harmless (the definition)
    assert sum(_scores(tiny_lm, tiny_pack, harmful)) / 24 == pytest.approx(1.0, abs=1e-3)
    assert sum(_scores(tiny_lm, tiny_pack, harmless)) / 24 == pytest.approx(0.0, abs=1e-3)
    row = build_row(SteeringSpec("actadd", 2.0, when=Condition(above=0.5)), tiny_pack)
    decided = resolve_conditions(tiny_lm, PROMPTS, [row] * len(PROMPTS))
    want = _scores(tiny_lm, tiny_pack, PROMPTS)
    for d, s in zip(decided, want):
        assert d.outcome.score == pytest.approx(s, abs=1e-9) and d.outcome.applied == (s > 0.5)
        assert d.applied()["condition"] == {"score": d.outcome.score, "applied": s > 0.5}


def test_conditional_rows_in_the_engine(tiny_lm, tiny_pack, none_row):
    """A condition that holds gives the unconditional steering's tokens, one that does not gives
    the unsteered tokens, with the score the library computes; mixed in a batch = solo; the
    gate captures across prefill chunks."""
    score = _scores(tiny_lm, tiny_pack, [PROMPTS[1]])[0]
    spec = SteeringSpec("actadd", 4.0)
    on = build_row(SteeringSpec("actadd", 4.0, when=Condition(above=score - 0.1)), tiny_pack)
    off = build_row(SteeringSpec("actadd", 4.0, when=Condition(below=score - 0.1)), tiny_pack)
    gen_on = build_row(SteeringSpec("actadd", 4.0, apply_to="generation",
                                    when=Condition(above=score - 0.1)), tiny_pack)
    late = build_row(SteeringSpec("actadd", 4.0, generation_window=(2, None),
                                  when=Condition(above=score - 0.1)), tiny_pack)
    listed = compose([build_row(SteeringSpec("ablate", 1.0), tiny_pack), on])
    p = PROMPTS[1]
    jobs = [(p, on), (p, off), (p, gen_on), (p, late), (p, listed),
            (p, build_row(spec, tiny_pack)), (p, none_row),
            (p, build_row(SteeringSpec("actadd", 4.0, apply_to="generation"), tiny_pack)),
            (p, build_row(SteeringSpec("actadd", 4.0, generation_window=(2, None)), tiny_pack)),
            (p, compose([build_row(SteeringSpec("ablate", 1.0), tiny_pack),
                         build_row(spec, tiny_pack)]))]
    for chunk in (512, 4):
        solo = _engine_run(tiny_lm, jobs, prefill_chunk=chunk)
        toks = [s[0] for s in solo]
        assert toks[0] == toks[5] != toks[6]
        assert toks[1] == toks[6]
        assert toks[2] == toks[7] and toks[3] == toks[8] and toks[4] == toks[9]
        for i in (0, 1, 2, 3):
            applied = solo[i][3].applied()
            assert applied["condition"]["score"] == pytest.approx(score, abs=1e-4)
            assert applied["condition"]["applied"] == (i != 1)
        assert solo[4][3].applied()[1]["condition"]["applied"] is True
        assert solo[4][3].applied()[0]["condition"] is None
    mixed = _engine_run(tiny_lm, jobs, together=True)
    assert [m[0] for m in mixed] == toks


def test_a_condition_on_none_only_reports_the_score(tiny_lm, tiny_pack, none_row):
    probe = build_row(SteeringSpec("none", when=Condition(pack="refusal", above=0.5)), None,
                      tiny_pack)
    (tokens, _, _, applied), (plain, *_) = _engine_run(
        tiny_lm, [(PROMPTS[0], probe), (PROMPTS[0], none_row)])
    assert tokens == plain
    assert applied.applied()["condition"]["score"] == pytest.approx(
        _scores(tiny_lm, tiny_pack, [PROMPTS[0]])[0], abs=1e-4)


def test_first_edited_prompt_position(tiny_pack):
    n = 10

    def first(**kw):
        return first_edited_prompt_position(build_row(SteeringSpec("actadd", 1.0, **kw),
                                                      tiny_pack), n)

    assert first() == 0 and first(apply_to="prompt") == 0
    assert first(apply_to="generation") == n - 1
    assert first(generation_window=(0, 2)) == n - 1
    assert first(generation_window=(1, None)) is None
    assert first_edited_prompt_position(build_row(SteeringSpec("none"), None), n) is None


# ---- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, param", [
    (SteeringSpec("actadd", apply_to="answer"), "steering.apply_to"),
    (SteeringSpec("actadd", generation_window=(3, 2)), "steering.generation_window"),
    (SteeringSpec("actadd", generation_window=(-1, None)), "steering.generation_window"),
    (SteeringSpec("actadd", generation_window=(0, 2), apply_to="prompt"),
     "steering.generation_window"),
    (SteeringSpec("actadd", generation_window=(0, 2), apply_to="all"),
     "steering.generation_window"),
    (SteeringSpec("actadd", when=Condition()), "steering.when"),
    (SteeringSpec("actadd", when=Condition(above=0.1, below=0.9)), "steering.when"),
    (SteeringSpec("actadd", when=Condition(above=float("nan"))), "steering.when.above"),
    (SteeringSpec("actadd", when=Condition(layer=99, below=0.5)), "steering.when.layer"),
])
def test_bad_controls_name_the_field(tiny_pack, spec, param):
    with pytest.raises(SteeringError) as info:
        build_row(spec, tiny_pack)
    assert info.value.param == param
    assert info.value.at(1).param == param.replace("steering", "steering[1]", 1)


def test_window_end_is_optional_and_bounds_are_resolved(tiny_pack):
    row = build_row(SteeringSpec("ablate", 1.0, generation_window=(4,)), tiny_pack)
    assert row.spec.generation_window == (4, None)
    assert {e.window for e in row.edits.values()} == {(4, NO_BOUND)}
    assert row.applied()["generation_window"] == [4, None]
    assert row.applied()["apply_to"] == "generation"
