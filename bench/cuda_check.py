"""CUDA path check on tiny random models (no download): run on a GPU machine.

    python bench/cuda_check.py

Builds a tiny Qwen2 in bfloat16 and float32 on the GPU, extracts a pack, and checks that
(1) every method changes the logits and a mixed batch equals its rows alone (within dtype
tolerance), (2) the batching engine's greedy outputs in a mixed batch equal solo runs.
Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from steering import METHODS, SteeringSpec, build_row  # noqa: E402
from steering.extraction.extract import ExtractConfig, extract_pack  # noqa: E402
from steering.extraction.inlp import InlpConfig  # noqa: E402
from steering.interventions.activations import last_logits  # noqa: E402
from steering.interventions.hooks import hooks_of  # noqa: E402
from steering.models.chat import format_chat  # noqa: E402
from testkit.tiny import make_tiny  # noqa: E402

PROMPTS = ["hello there", "write a poem about the sea", "hi", "how do I bake bread?",
           "tell me a story", "what is a list?"]


async def engine_isolation(lm, rows) -> bool:
    engine = Engine(lm, max_batch=8)
    await engine.start()

    def req(i):
        ids = lm.tokenizer(format_chat(lm.tokenizer, PROMPTS[i]),
                           add_special_tokens=False)["input_ids"]
        return GenerationRequest(ids, SamplingParams(max_tokens=12, temperature=0), rows[i])

    async def collect(h):
        return [e.token_id async for e in h if e.token_id is not None]

    solo = [await collect(engine.submit(req(i))) for i in range(len(rows))]
    mixed = await asyncio.gather(*[collect(engine.submit(req(i))) for i in range(len(rows))])
    await engine.shutdown()
    return solo == list(mixed)


def check(dtype: torch.dtype) -> dict:
    lm = make_tiny("qwen2")
    lm.model.to("cuda", dtype)
    lm.__dict__.pop("hooks", None)
    config = ExtractConfig(n_train=24, n_train_harmless=None, n_val_harmless=6, n_val_harmful=6, min_layer_fraction=0.0,
                           calibrate_strengths=(1.0, 2.0),
                           inlp=InlpConfig(max_directions=4, chance_margin=0.0, p_value=1.0))
    t0 = time.perf_counter()
    pack = extract_pack(lm, config=config)
    rows = [build_row(SteeringSpec(m, 1.0), pack) for m in METHODS]
    base = last_logits(lm, PROMPTS[:1])
    changed = {m: float((last_logits(lm, PROMPTS[:1], hooks_of(lm), r) - base).abs().max())
               for m, r in zip(METHODS, rows, strict=True)}
    hooks_of(lm).set_rows(rows)
    from steering.interventions.activations import encode_chats
    with torch.inference_mode():
        mixed = lm.model(**encode_chats(lm, PROMPTS), logits_to_keep=1).logits[:, -1].float()
    hooks_of(lm).set_rows(None)
    solo = torch.cat([last_logits(lm, [p], hooks_of(lm), r) for p, r in zip(PROMPTS, rows,
                                                                          strict=True)])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(),
        "max_logit_change_by_method": changed,
        "mixed_vs_solo_max_abs": float((mixed.cpu() - solo).abs().max()),
        "mixed_equals_solo": bool((mixed.cpu() - solo).abs().max() < tol),
        "engine_greedy_isolation": asyncio.run(engine_isolation(lm, rows)),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    results = [check(torch.float32), check(torch.bfloat16)]
    for r in results:
        print(r)
    print(json.dumps({"bench": "cuda_check", "results": results}))
    return 0 if all(r["mixed_equals_solo"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
