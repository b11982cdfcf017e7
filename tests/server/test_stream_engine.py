"""Issue 30 in the serving engine (tiny model): monitors never change a token in mixed batches and
score what the offline form scores; `Engine.call` runs model work between steps."""

from __future__ import annotations

import asyncio

import pytest

from server.engine import Engine, GenerationRequest, SamplingParams
from steering.interventions.capture import capture_ids
from steering.interventions.methods import SteeringSpec, build_row
from steering.interventions.monitors import monitor_of, score_positions
from testkit.engine import chat_ids

PROMPTS = ["Tell me about the sea", "How do I pick a lock?", "Write a poem about autumn",
           "What is two plus two?"]


async def _collect(handle):
    tokens, logprobs, scores = [], [], []
    async for ev in handle:
        if ev.token_id is not None:
            tokens.append(ev.token_id)
            logprobs.append(ev.top_logprobs)
            scores.append(ev.monitor)
    return tokens, logprobs, scores


def _run(lm, jobs, max_tokens=8):
    """jobs: [(prompt, steering, monitors)], all submitted together (one batch)."""
    engine = Engine(lm, max_batch=8)

    async def main():
        await engine.start()
        requests = [GenerationRequest(chat_ids(lm, p), SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True,
            top_logprobs=3), row, monitors=tuple(mons)) for p, row, mons in jobs]
        out = await asyncio.gather(*[_collect(engine.submit(r)) for r in requests])
        await engine.shutdown()
        return out

    return asyncio.run(main())


def test_monitors_change_no_token_in_mixed_batches(tiny_lm, tiny_pack):
    none = build_row(SteeringSpec("none"), None)
    ablate = build_row(SteeringSpec("ablate", 1.0), tiny_pack)
    actadd = build_row(SteeringSpec("actadd", 4.0), tiny_pack)
    cond = build_row(SteeringSpec("actadd", 2.0, apply_to="generation"), tiny_pack)
    rows = [none, ablate, actadd, cond]
    mon = monitor_of(tiny_pack)
    other = monitor_of(tiny_pack, layer=(tiny_pack.layer + 1) % tiny_pack.n_layers)
    monitors = [(mon, other), (), (mon,), (other, mon)]
    plain = _run(tiny_lm, [(p, r, ()) for p, r in zip(PROMPTS, rows)])
    watched = _run(tiny_lm, [(p, r, m) for p, r, m in zip(PROMPTS, rows, monitors)])
    for (t0, lp0, s0), (t1, lp1, s1), mons in zip(plain, watched, monitors):
        assert t0 == t1 and lp0 == lp1  # bit for bit: the same tokens and logprobs
        assert all(s is None for s in s0)
        if mons:
            assert all(len(s) == len(mons) for s in s1)
        else:
            assert all(s is None for s in s1)
    # row 0 is unsteered: its scores are the offline scores of prompt + generated tokens
    tokens, _, scores = watched[0]
    ids = chat_ids(tiny_lm, PROMPTS[0])
    offline = score_positions(tiny_lm, ids + tokens[:-1], [mon, other])
    n = len(ids)
    for i, s in enumerate(scores):
        assert s[0] == pytest.approx(float(offline[0, n - 1 + i]), abs=1e-4)
        assert s[1] == pytest.approx(float(offline[1, n - 1 + i]), abs=1e-4)


def test_engine_call_runs_between_steps(tiny_lm):
    engine = Engine(tiny_lm, max_batch=4)
    ids = chat_ids(tiny_lm, PROMPTS[0])

    async def main():
        await engine.start()
        handle = engine.submit(GenerationRequest(ids, SamplingParams(
            max_tokens=6, temperature=0.0, ignore_eos=True), build_row(SteeringSpec("none"),
                                                                       None)))
        values = await engine.call(lambda lm: capture_ids(lm, [ids], [1, 2], [-1]))
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda lm: 1 / 0)
        tokens = [ev.token_id async for ev in handle if ev.token_id is not None]
        await engine.shutdown()
        return values, tokens

    values, tokens = asyncio.run(main())
    assert values.shape == (1, 2, 1, tiny_lm.d_model) and len(tokens) == 6
    torch_ref = capture_ids(tiny_lm, [ids], [1, 2], [-1])
    assert (values == torch_ref).all()
