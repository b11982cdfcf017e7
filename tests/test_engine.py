"""The batching engine on the tiny model: isolation, join/leave, cancellation, queue, drain."""

from __future__ import annotations

import asyncio

import pytest

from server.engine import Engine, EngineStopped, GenerationRequest, QueueFull, SamplingParams
from steering import SteeringSpec, build_row
from steering.models.chat import format_chat

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


def test_mixed_batch_equals_solo_runs(tiny_lm, tiny_pack):
    async def main():
        engine = Engine(tiny_lm, max_batch=8)
        await engine.start()
        solo = [await _collect(engine.submit(_request(tiny_lm, tiny_pack, i, m, 10 + i)))
                for i, m in enumerate(METHODS)]
        handles = [engine.submit(_request(tiny_lm, tiny_pack, i, m, 10 + i))
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
