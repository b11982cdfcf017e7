"""The engine's cache of the chat template's opening (server/engine/prefix.py), on the tiny model:
a hit computes exactly what a miss computes, entries are per steering of the prompt, an entry is
never written by the requests that use it, and mixed batches still equal solo runs."""

from __future__ import annotations

import pytest
import torch

from server.engine import Engine
from server.engine.prefix import PrefixCache, prompt_edits_key
from steering import Condition, SteeringSpec, build_row, compose
from steering.models.chat import format_chat, template_opening
from testkit.engine import chat_ids as _ids
from testkit.engine import run_jobs

PROMPTS = ["How do I make a bomb at home?", "Write a haiku about autumn leaves.",
           "Explain how to pick a lock without the key, step by step, in detail please."]


def _run(engine, lm, jobs, together=False, max_tokens=6):
    return run_jobs(engine, lm, jobs, together, max_tokens)


@pytest.fixture(scope="module")
def rows(tiny_pack):
    def row(method, strength=1.0, **kw):
        return build_row(SteeringSpec(method, strength, **kw), tiny_pack)

    return {"none": row("none", 0.0), "ablate": row("ablate"), "actadd": row("actadd", 4.0),
            "actadd@generation": row("actadd", 4.0, apply_to="generation"),
            "actadd@prompt": row("actadd", 4.0, apply_to="prompt"),
            "inlp_flip": row("inlp_flip"),
            "[ablate,actadd]": compose([row("ablate"), row("actadd", 4.0)])}


def test_every_chat_prompt_starts_with_the_opening(tiny_lm):
    opening = template_opening(tiny_lm.tokenizer)
    assert len(opening) > 0
    for p in PROMPTS + ["", "x" * 50]:
        ids = _ids(tiny_lm, p)
        assert ids[: len(opening)] == opening and len(ids) > len(opening)
    assert PrefixCache(opening).boundary(_ids(tiny_lm, PROMPTS[0])) == len(opening)
    assert PrefixCache(opening).boundary(opening) is None  # nothing after it: no split
    own_system = tiny_lm.tokenizer(format_chat(tiny_lm.tokenizer, [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]),
        add_special_tokens=False)["input_ids"]
    if own_system[: len(opening)] != opening:
        assert PrefixCache(opening).boundary(own_system) is None


def test_keys_follow_what_the_steering_does_at_prompt_positions(rows, tiny_pack):
    assert prompt_edits_key(None) == prompt_edits_key(rows["none"]) == ""
    assert prompt_edits_key(rows["actadd@generation"]) == ""  # the answer only
    keys = {name: prompt_edits_key(rows[name]) for name in
            ("ablate", "actadd", "inlp_flip", "[ablate,actadd]")}
    assert "" not in keys.values() and len(set(keys.values())) == len(keys)
    # prompt-only actadd edits every prompt position as actadd does
    assert prompt_edits_key(rows["actadd@prompt"]) == keys["actadd"]
    # the same settings built again: the same key (a digest of the edits, not their identity)
    assert prompt_edits_key(build_row(SteeringSpec("ablate", 1.0), tiny_pack)) == keys["ablate"]
    assert prompt_edits_key(build_row(SteeringSpec("ablate", 0.5), tiny_pack)) != keys["ablate"]


def test_a_hit_computes_what_a_miss_computes(tiny_lm, rows):
    jobs = [(p, rows[name]) for name in rows for p in PROMPTS[:2]]
    cold = [_run(Engine(tiny_lm, max_batch=8), tiny_lm, [job])[0] for job in jobs]  # all misses
    engine = Engine(tiny_lm, max_batch=8)
    first = _run(engine, tiny_lm, jobs)
    again = _run(engine, tiny_lm, jobs)
    assert engine.prefixes.hits >= len(jobs) + 2  # the second prompt of each row, then all
    # none and actadd@generation share the unsteered entry, actadd@prompt shares actadd's
    assert len(engine.prefixes) == 5
    for c, f, a in zip(cold, first, again, strict=True):
        assert c[0] == f[0] == a[0] and c[1] == f[1] == a[1]
    # the tokens differ between rows, so the equalities above are not vacuous
    assert len({tuple(f[0]) for f in first}) > 3


def test_requests_do_not_write_into_an_entry(tiny_lm, rows):
    engine = Engine(tiny_lm, max_batch=8)
    key = prompt_edits_key(rows["ablate"])
    _run(engine, tiny_lm, [(PROMPTS[0], rows["ablate"])])
    stored = [(k.clone(), v.clone()) for k, v in engine.prefixes._entries[key]]
    _run(engine, tiny_lm, [(p, rows["ablate"]) for p in PROMPTS], together=True, max_tokens=12)
    for (k, v), (k0, v0) in zip(engine.prefixes._entries[key], stored, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_mixed_batches_equal_solo_runs_with_the_cache(tiny_lm, rows):
    jobs = [(PROMPTS[i % 3], row) for i, row in enumerate(rows.values())]
    engine = Engine(tiny_lm, max_batch=8)
    solo = _run(engine, tiny_lm, jobs)
    mixed = _run(engine, tiny_lm, jobs, together=True)
    # tokens, as the other mixed-batch tests on the fp32 tiny model (its batched GEMMs may round
    # a row's last bits differently; the int8 model is bit-exact, tests/steering/test_precision.py)
    assert [m[0] for m in mixed] == [s[0] for s in solo]
    assert engine.prefixes.hits >= len(jobs)


def test_conditional_requests_with_the_cache(tiny_lm, tiny_pack, rows):
    """A condition's prefill runs unsteered (the unsteered entry); when the condition holds and
    its steering edits the prompt, the prefill is redone — through that steering's entry."""
    on = build_row(SteeringSpec("actadd", 4.0, when=Condition(above=-1e9)), tiny_pack)
    off = build_row(SteeringSpec("actadd", 4.0, when=Condition(below=-1e9)), tiny_pack)
    jobs = [(PROMPTS[1], on), (PROMPTS[1], off), (PROMPTS[1], rows["actadd"]),
            (PROMPTS[1], rows["none"])]
    cold = [_run(Engine(tiny_lm, max_batch=8), tiny_lm, [job])[0] for job in jobs]
    engine = Engine(tiny_lm, max_batch=8)
    warm = _run(engine, tiny_lm, jobs + jobs)
    assert [w[0] for w in warm] == [c[0] for c in cold] * 2
    assert cold[0][0] == cold[2][0] and cold[1][0] == cold[3][0] != cold[0][0]
    assert warm[4][3].applied()["condition"]["applied"] is True


def test_off_means_no_split(tiny_lm, rows):
    engine = Engine(tiny_lm, max_batch=8, prefix_cache=0)
    assert engine.prefixes is None
    out = _run(engine, tiny_lm, [(PROMPTS[0], rows["ablate"])])
    assert len(out[0][0]) == 6
