"""Run chat requests through an `Engine` and collect what each one streamed (tests, benches)."""

from __future__ import annotations

import asyncio

from server.engine import Engine, GenerationRequest, SamplingParams
from steering.models.chat import format_chat


def chat_ids(lm, prompt) -> list[int]:
    """The prompt's token ids under the model's chat template."""
    return lm.tokenizer(format_chat(lm.tokenizer, prompt), add_special_tokens=False)["input_ids"]


async def collect(handle):
    """(tokens, top logprobs per token, finish reason, the steering as applied)."""
    tokens, logprobs, last, first = [], [], None, None
    async for event in handle:
        first = first or event
        if event.token_id is not None:
            tokens.append(event.token_id)
            logprobs.append(event.top_logprobs)
        last = event
    return tokens, logprobs, last.finish_reason, first.steering


def run_jobs(engine: Engine, lm, jobs, together: bool = False, max_tokens: int = 8) -> list:
    """jobs: [(prompt, steering)], greedy with the top 3 logprobs, one after another or all at
    once, on `engine` (started here, shut down after) → one `collect` tuple per job."""
    async def main():
        await engine.start()
        requests = [GenerationRequest(chat_ids(lm, p), SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True,
            top_logprobs=3), row) for p, row in jobs]
        if together:
            out = await asyncio.gather(*[collect(engine.submit(r)) for r in requests])
        else:
            out = [await collect(engine.submit(r)) for r in requests]
        await engine.shutdown()
        return out

    return asyncio.run(main())
