"""The batching engine on the tiny model: isolation, join/leave, cancellation, queue, drain."""

from __future__ import annotations

import asyncio

import pytest
from transformers import DynamicCache

from server.engine import Engine, EngineStopped, GenerationRequest, QueueFull, SamplingParams
from steering import SteeringSpec, build_row
from steering.models.chat import format_chat
from testkit.tiny import make_tiny

METHODS = ["none", "actadd", "ablate", "ace", "inlp_null", "inlp_flip"]
PROMPTS = ["hello there", "write a poem about the sea and the sky", "hi",
           "how do I bake bread quickly at home?", "x", "tell me a story about a dragon"]


def _request(lm, pack, i, method, max_tokens=12, temperature=0.0, seed=None):
    ids = lm.tokenizer(format_chat(lm.tokenizer, PROMPTS[i % len(PROMPTS)]),
                       add_special_tokens=False)["input_ids"]
    return GenerationRequest(ids, SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                 seed=seed),
                             build_row(SteeringSpec(method, 1.5), pack))


async def _collect(handle):
    tokens, text, last = [], "", None
    async for event in handle:
        if event.token_id is not None:
            tokens.append(event.token_id)
        text += event.text
        last = event
    return tokens, text, last.finish_reason


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_mixed_batch_equals_solo_runs(precision, tiny_lm, tiny_pack):
    """Per-row steering in one batch equals each request alone, also on the int8 engine."""
    lm = tiny_lm if precision == "float32" else make_tiny("qwen2", precision=precision)

    async def main():
        engine = Engine(lm, max_batch=8)
        await engine.start()
        solo = [await _collect(engine.submit(_request(lm, tiny_pack, i, m, 10 + i)))
                for i, m in enumerate(METHODS)]
        handles = [engine.submit(_request(lm, tiny_pack, i, m, 10 + i))
                   for i, m in enumerate(METHODS)]
        mixed = await asyncio.gather(*[_collect(h) for h in handles])
        await engine.shutdown()
        return solo, mixed

    solo, mixed = _run(main())
    for method, s, m in zip(METHODS, solo, mixed, strict=True):
        assert s == m, method
    # The methods really differ from one another (otherwise the check above is vacuous).
    assert len({tuple(s[0]) for s in solo}) > 1


def test_requests_join_and_leave_mid_decode(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=4)
        await engine.start()
        alone = await _collect(engine.submit(_request(tiny_lm, tiny_pack, 1, "ablate", 30)))
        long_handle = engine.submit(_request(tiny_lm, tiny_pack, 1, "ablate", 30))
        long_task = asyncio.create_task(_collect(long_handle))
        await asyncio.sleep(0.05)  # let it start decoding, then others join and leave
        short = [engine.submit(_request(tiny_lm, tiny_pack, i, m, 3))
                 for i, m in enumerate(["actadd", "inlp_flip", "none"])]
        await asyncio.gather(*[_collect(h) for h in short])
        late = await _collect(engine.submit(_request(tiny_lm, tiny_pack, 4, "ace", 5)))
        together = await long_task
        await engine.shutdown()
        return alone, together, late

    alone, together, late = _run(main())
    assert alone == together
    assert len(late[0]) == 5 and late[2] == "length"


def test_seeded_sampling_is_reproducible_in_a_batch(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=4)
        await engine.start()
        a = await _collect(engine.submit(_request(tiny_lm, tiny_pack, 0, "none", 8, 1.0, 7)))
        hs = [engine.submit(_request(tiny_lm, tiny_pack, 0, "none", 8, 1.0, 7)),
              engine.submit(_request(tiny_lm, tiny_pack, 2, "ablate", 8, 1.0, 9))]
        b, _ = await asyncio.gather(*[_collect(h) for h in hs])
        await engine.shutdown()
        return a, b

    a, b = _run(main())
    assert a == b


def test_cancellation_frees_the_slot(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=1)
        await engine.start()
        first = engine.submit(_request(tiny_lm, tiny_pack, 0, "none", 10_000))
        second = engine.submit(_request(tiny_lm, tiny_pack, 2, "none", 3))
        async for _ in first:  # consume one event, then walk away
            break
        result = await asyncio.wait_for(_collect(second), timeout=60)
        for _ in range(200):  # the step that emitted the last event drops the row right after
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        await engine.shutdown()
        return result, stats

    (tokens, _, reason), stats = _run(main())
    assert reason == "length" and len(tokens) == 3
    assert stats == {"running": 0, "waiting": 0}


def test_queue_limit_raises_queue_full(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=1, max_queue=2)
        # Not started: nothing leaves the queue.
        engine._accepting = True
        engine.submit(_request(tiny_lm, tiny_pack, 0, "none"))
        engine.submit(_request(tiny_lm, tiny_pack, 0, "none"))
        with pytest.raises(QueueFull):
            engine.submit(_request(tiny_lm, tiny_pack, 0, "none"))

    _run(main())


def test_shutdown_drains_running_requests_and_refuses_new(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=2)
        await engine.start()
        handles = [engine.submit(_request(tiny_lm, tiny_pack, i, "none", 20)) for i in range(3)]
        tasks = [asyncio.create_task(_collect(h)) for h in handles]
        await asyncio.sleep(0.01)
        await engine.shutdown()
        with pytest.raises(EngineStopped):
            engine.submit(_request(tiny_lm, tiny_pack, 0, "none"))
        return await asyncio.gather(*tasks)

    results = _run(main())
    assert [r[2] for r in results] == ["length"] * 3
    assert all(len(r[0]) == 20 for r in results)


def test_stop_string_cuts_the_text(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=2)
        await engine.start()
        free = await _collect(engine.submit(_request(tiny_lm, tiny_pack, 1, "none", 20)))
        stop = free[1][3:6]
        req = _request(tiny_lm, tiny_pack, 1, "none", 20)
        req.sampling.stop = [stop]
        cut = await _collect(engine.submit(req))
        await engine.shutdown()
        return free, stop, cut

    free, stop, cut = _run(main())
    if stop:
        assert cut[2] == "stop"
        assert cut[1] == free[1][: free[1].find(stop)]


def test_non_finite_logits_fail_only_their_row(tiny_lm, tiny_pack):
    """Issue 12 finding 4: one row's NaN logits (temperature > 0) fail that request alone; the
    other row of the same decode batch goes on, token for token as it runs solo."""
    def poison_second_row(module, args, out):
        if out.shape[0] == 2:  # only the two-row decode batch; prefill is one row
            out[1] = float("nan")
        return out

    async def main():
        engine = Engine(tiny_lm, max_batch=2)
        await engine.start()
        solo = await _collect(engine.submit(_request(tiny_lm, tiny_pack, 1, "none", 12, 1.0, 3)))
        hook = tiny_lm.model.lm_head.register_forward_hook(poison_second_row)
        try:
            good = engine.submit(_request(tiny_lm, tiny_pack, 1, "none", 12, 1.0, 3))
            good_task = asyncio.create_task(_collect(good))
            while engine.stats()["running"] == 0 or not engine._rows:
                await asyncio.sleep(0.001)
            bad = engine.submit(_request(tiny_lm, tiny_pack, 2, "actadd", 12, 1.0, 4))
            bad_events = [e async for e in bad]
            together = await good_task
        finally:
            hook.remove()
        await engine.shutdown()
        return solo, together, bad_events

    solo, together, bad_events = _run(main())
    assert together == solo
    assert bad_events[-1].finish_reason == "error"
    assert "non-finite" in bad_events[-1].error


def test_top_logprobs_only_where_asked_and_first_tokens_only(tiny_lm, tiny_pack):
    """Issue 12 finding 7: logprobs are computed for the rows (and first tokens) that ask."""
    async def main():
        engine = Engine(tiny_lm, max_batch=3)
        await engine.start()
        plain = _request(tiny_lm, tiny_pack, 0, "none", 6)
        full = _request(tiny_lm, tiny_pack, 1, "none", 6)
        full.sampling.logprobs, full.sampling.top_logprobs = True, 3
        first = _request(tiny_lm, tiny_pack, 2, "none", 6)
        first.sampling.logprobs, first.sampling.top_logprobs = True, 5
        first.sampling.logprobs_tokens = 1
        handles = [engine.submit(r) for r in (plain, full, first)]

        async def events(h):
            return [e async for e in h if e.token_id is not None]

        out = await asyncio.gather(*[events(h) for h in handles])
        await engine.shutdown()
        return out

    plain, full, first = _run(main())
    assert all(e.logprob is None and e.top_logprobs is None for e in plain)
    for e in full:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0][1] >= e.top_logprobs[-1][1]
        assert e.logprob <= e.top_logprobs[0][1] + 1e-6
        if e.token_id == e.top_logprobs[0][0]:  # greedy: the chosen token is the top one
            assert abs(e.logprob - e.top_logprobs[0][1]) < 1e-6
    assert len(first[0].top_logprobs) == 5
    assert all(e.logprob is None and e.top_logprobs is None for e in first[1:])


def test_one_host_transfer_per_step(tiny_lm):
    """Issue 12 finding 7: a step's tokens, logprobs and top-k reach the host in one transfer."""
    import torch

    from server.engine.sampling import RowSampling, draw

    logits = torch.randn(4, 50)
    rows = [RowSampling(0.0, 1.0, None, None), RowSampling(1.0, 0.9, torch.Generator(), 2),
            RowSampling(0.0, 1.0, None, 4), RowSampling(0.7, 1.0, torch.Generator(), 0)]
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return real(self)

    torch.Tensor.tolist = counting
    try:
        out = draw(logits, rows)
    finally:
        torch.Tensor.tolist = real
    assert len(calls) == 1
    assert out[0].token == int(logits[0].argmax()) and out[0].logprob is None
    assert out[2].token == int(logits[2].argmax())
    assert [t for t, _ in out[2].top_logprobs] == logits[2].topk(4).indices.tolist()
    assert len(out[1].top_logprobs) == 2 and out[3].top_logprobs is None
    assert out[3].logprob is not None


def test_growing_kv_layer_appends_in_place_and_matches_concatenation():
    """The engine's KV layers write a new token into spare room instead of re-concatenating
    the whole cache every step (DynamicLayer's torch.cat): same values, one buffer."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from server.engine.kv import GrowingLayer, select_row

    grow, plain = GrowingLayer(), DynamicLayer()
    first = torch.randn(2, 2, 5, 4)
    grow.update(first, first + 1)
    plain.update(first, first + 1)
    buffer = grow.keys.data_ptr()
    for _ in range(40):
        k = torch.randn(2, 2, 1, 4)
        gk, gv = grow.update(k, k * 2)
        pk, pv = plain.update(k, k * 2)
        assert torch.equal(gk, pk) and torch.equal(gv, pv)
    assert grow.keys.data_ptr() == buffer  # no reallocation within the room
    before = grow.keys.clone()

    class _Cache:
        layers = [grow]

    row = select_row(_Cache, 0)  # a trial forward on one row never writes the batch's buffer
    row.layers[0].update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert torch.equal(grow.keys, before)
    assert torch.equal(grow._kbuf[:, :, :before.shape[2]], before)
    assert not torch.equal(grow._kbuf[:1, :, before.shape[2]], torch.ones(1, 2, 4))


def test_one_step_admits_several_short_prompts(tiny_lm, tiny_pack):
    """TTFT under load (issue 11): short prompts waiting together are all prefilled in one step
    (up to `prefill_chunk` prompt tokens), not one per decode step; a prompt that does not fit
    the rest of the step's budget waits for the next."""
    async def main():
        engine = Engine(tiny_lm, max_batch=8, prefill_chunk=80)  # prompts: 20, 34, 15 tokens
        engine._accepting = True  # not started: the test drives the steps
        for i in range(3):
            engine.submit(_request(tiny_lm, tiny_pack, i, "none", 4))
        long = _request(tiny_lm, tiny_pack, 3, "none", 4)
        long.prompt_ids = long.prompt_ids * 3  # > the budget left after three short prompts
        engine.submit(long)
        engine._step()
        first = (len(engine._rows), engine.stats()["waiting"])
        engine._step()
        return first, len(engine._rows) + (engine._prefilling is not None)

    (rows, waiting), later = _run(main())
    assert rows == 3 and waiting == 1
    assert later == 4


def test_thread_tuner_keeps_the_faster_thread_count():
    """Decode steps are timed at 1 and at the maximum thread count; the faster one is kept
    until the next probe (on shared cores one thread can be several times faster)."""
    from server.engine.threads import ThreadTuner

    tuner = ThreadTuner(max_threads=2, window=2, period=3)
    speed = {1: 0.1, 2: 0.5}  # a loaded machine: one thread wins
    for _ in range(4):
        tuner.record(speed[tuner.threads()])
    assert tuner.current == 1 and tuner.threads() == 1
    speed = {1: 0.5, 2: 0.1}  # the cores became free
    for _ in range(3 + 4):
        tuner.record(speed[tuner.threads()])
    assert tuner.current == 2
    assert not ThreadTuner(max_threads=1).active


@pytest.mark.parametrize("tune", [False, True, None])
def test_the_tune_threads_setting_reaches_the_engine(tiny_lm, tune):
    """`STEER_TUNE_THREADS` / `steer serve --tune-threads`: the native engine measures its
    thread count when the setting asks for it; unset, at int8 only (the tiny model is fp32)."""
    from types import SimpleNamespace

    from server.engine.select import build, tune_threads
    from server.settings import Settings

    engine = build(SimpleNamespace(settings=Settings(tune_threads=tune), lm=tiny_lm, packs={}))
    assert (engine._threads is not None) == bool(tune)
    assert tune_threads(None, "int8") and not tune_threads(None, "fp32")
    assert not tune_threads(False, "int8") and tune_threads(True, "bf16")


def test_decode_logits_in_a_padded_batch_are_bit_identical_to_solo():
    """Row-exact attention: a row decoding in a left-padded batch runs the same attention call
    as alone (no mask over its own keys), so its logits match bit for bit — at int8 an ulp of
    difference can flip a rounding step and change the answer. (A regression guard: on the tiny
    model the batched SDPA call happens to agree too; on the embedded model at int8 it did not,
    see docs/engine.md.)"""
    import torch

    from server.engine.attention import use_row_exact_attention
    from server.engine.core import _left_pad

    lm = make_tiny("qwen2", precision="int8")
    use_row_exact_attention(lm.model)
    prompts = [[5, 9, 33, 7, 81, 2, 14, 60, 3], [11, 4]]
    caches, solo, nxt = [], [], [12, 40]
    with torch.inference_mode():
        for ids, tok in zip(prompts, nxt, strict=True):
            cache = DynamicCache()
            n = len(ids)
            lm.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
            caches.append([(layer.keys, layer.values) for layer in cache.layers])
            out = lm.model(input_ids=torch.tensor([[tok]]), attention_mask=torch.ones(1, n + 1,
                           dtype=torch.long), position_ids=torch.tensor([[n]]), cache=cache,
                           use_cache=True)
            solo.append(out.logits[0, -1])
        width = max(len(p) for p in prompts)
        batch = DynamicCache()
        for i, layers in enumerate(zip(*caches, strict=True)):
            keys = torch.cat([_left_pad(k, width) for k, _ in layers])
            values = torch.cat([_left_pad(v, width) for _, v in layers])
            batch.update(keys, values, i)
        mask = torch.cat([_left_pad(torch.ones(1, len(p), dtype=torch.long), width)
                          for p in prompts])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = lm.model(input_ids=torch.tensor([[t] for t in nxt]), attention_mask=mask,
                       position_ids=torch.tensor([[len(p)] for p in prompts]), cache=batch,
                       use_cache=True)
    for i in range(2):
        assert torch.equal(out.logits[i, -1], solo[i]), i
