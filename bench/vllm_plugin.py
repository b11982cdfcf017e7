"""The steering plugin's cost inside vLLM's CPU build. One run prints a table and one JSON line.

    .venv-vllm/bin/python bench/vllm_plugin.py [--streams 8] [--tokens 64] [--rounds 3]
                                               [--modes eager,compiled] [--dtype bfloat16]

For each mode (`enforce_eager`, and vLLM's default torch.compile), one engine after the other on
the embedded model:
1. vLLM without the plugin (`VLLM_PLUGINS` empty): its load time, then `--rounds` batches of
   `--streams` greedy requests × `--tokens` tokens (ignore_eos), unsteered;
2. vLLM with the plugin: its load time, then `--rounds` rounds, each running in turn: unsteered
   (plugin on and idle), one actadd vector at every layer for every request (24 sites), ablation
   for every request (49 sites), and 16 distinct configurations in the batch (methods and
   strengths mixed; with 8 streams, 8 of them).

Throughput is output tokens over the batch's wall time (prefill included), the median over the
rounds; the rows are also given as a fraction of the plugin-off median. Plugin-off and plugin-on
run in different engines one after the other (two fp32 engines do not fit beside the other work on
this machine), so their ratio carries the machine's drift between the phases; the steered rows are
measured against the idle row of the same engine, round by round. The compiled load time depends
on vLLM's compile cache (~/.cache/vllm): the JSON says whether an artifact existed before the run
(`--cold` disables the cache: a full compile). The machine is shared: read medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash map works.",
    "Give me three tips for learning Rust.",
    "What causes the seasons on Earth?",
    "Summarise the plot of Hamlet in a paragraph.",
    "How do I reverse a linked list in Python?",
    "Describe the water cycle for a child.",
    "What is the difference between TCP and UDP?",
]


def _rows(pack, n_layers: int):
    from steering.interventions.methods import SteeringSpec, build_row

    every = tuple(range(n_layers))
    distinct = []
    methods = ["actadd", "ablate", "ace", "inlp_null", "inlp_flip", "inlp_reflect"]
    for i in range(16):
        method = methods[i % len(methods)]
        distinct.append(build_row(SteeringSpec(method=method, strength=0.5 + 0.1 * i), pack))
    return {
        "all_layers": build_row(SteeringSpec(method="actadd", strength=0.3, layers=every), pack),
        "ablate": build_row(SteeringSpec(method="ablate"), pack),
        "distinct16": distinct,
    }


def _batch(llm, ids, rows, tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from steering.vllm import wire

    inputs, params = [], []
    for i, p in enumerate(ids):
        row = rows[i % len(rows)] if rows else None
        prompt = TokensPrompt(prompt_token_ids=list(p))
        if (salt := wire.cache_salt(row)) is not None:
            prompt["cache_salt"] = salt
        inputs.append(prompt)
        params.append(SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                     extra_args=wire.extra_args(row) or None))
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    wall = time.perf_counter() - t
    return sum(len(o.outputs[0].token_ids) for o in outs) / wall


def _aot_artifacts() -> int:
    root = Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm"))
    return len(list((root / "torch_compile_cache").glob("torch_aot_compile/*/rank_*/model")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cold", action="store_true", help="disable vLLM's compile cache")
    args = ap.parse_args()
    if args.cold:
        os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"

    from transformers import AutoTokenizer

    from steering.models.embedded import embedded_model_dir
    from steering.packs.format import load_pack
    from steering.vllm.packs import pack_paths
    from testkit.vllm_engine import chat_ids, engine

    folder = str(embedded_model_dir())
    paths = pack_paths()
    if not paths:
        sys.exit("set STEERING_VLLM_PACKS to the embedded model's refusal pack "
                 "(steering.extraction.store.default_pack_path)")
    pack = load_pack(next(iter(paths.values())), name="refusal")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [chat_ids(tok, PROMPTS[i % len(PROMPTS)] + f" ({i})") for i in range(args.streams)]
    rows = _rows(pack, pack.n_layers)
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        eager = mode == "eager"
        res: dict = {"aot_artifacts_before": None if eager else _aot_artifacts()}
        t = time.perf_counter()
        with engine(folder, plugin=False, dtype=args.dtype, enforce_eager=eager) as llm:
            res["load_off_s"] = time.perf_counter() - t
            _batch(llm, ids, None, 8)  # warm-up
            off = [_batch(llm, ids, None, args.tokens) for _ in range(args.rounds)]
        t = time.perf_counter()
        with engine(folder, pack_paths={"refusal": next(iter(paths.values()))},
                    dtype=args.dtype, enforce_eager=eager) as llm:
            res["load_on_s"] = time.perf_counter() - t
            _batch(llm, ids, [rows["ablate"]], 8)  # warm-up (and the plan's first build)
            on: dict[str, list[float]] = {"idle": [], "all_layers": [], "ablate": [],
                                          "distinct16": []}
            for _ in range(args.rounds):
                on["idle"].append(_batch(llm, ids, None, args.tokens))
                on["all_layers"].append(_batch(llm, ids, [rows["all_layers"]], args.tokens))
                on["ablate"].append(_batch(llm, ids, [rows["ablate"]], args.tokens))
                on["distinct16"].append(_batch(llm, ids, rows["distinct16"], args.tokens))
        med_off = statistics.median(off)
        res["tok_s"] = {"off": med_off, **{k: statistics.median(v) for k, v in on.items()}}
        res["of_off"] = {k: v / med_off for k, v in res["tok_s"].items()}
        res["of_idle"] = {k: statistics.median(s / i for s, i in zip(v, on["idle"]))
                          for k, v in on.items()}
        results[mode] = res

    print(f"\nvLLM CPU ({args.dtype}), {args.streams} streams × {args.tokens} tokens, "
          f"{args.rounds} rounds (medians)")
    print(f"{'mode':>9} {'row':>11} {'tok/s':>8} {'of off':>7} {'of idle':>8}")
    for mode, res in results.items():
        for row, v in res["tok_s"].items():
            idle = res["of_idle"].get(row)
            print(f"{mode:>9} {row:>11} {v:>8.1f} {res['of_off'][row]:>7.3f} "
                  f"{'' if idle is None else f'{idle:.3f}':>8}")
        print(f"{mode:>9} load: plugin off {res['load_off_s']:.0f} s, on {res['load_on_s']:.0f} s")
    print(json.dumps({"bench": "vllm_plugin", "dtype": args.dtype, "streams": args.streams,
                      "tokens": args.tokens, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
