"""Generate the steered and unsteered outputs that the three-way judge is measured on.

    .venv/bin/python bench/judge_outputs.py --out /tmp/judge_outputs.jsonl

Validation prompts only (never the test split): every harmful_val prompt and a harmless_val
slice disjoint from selection/calibration (harmless_val[:16]), the report's evaluation slice
(harmless_val[3000:3030]) and `bench/inlp_reference.py`'s slice (harmless_val[200:220]). Each
prompt under several settings — suppression methods on harmful prompts, induction methods and
suppression methods on harmless ones — 64 greedy tokens, int8 weights (the server's CPU default)
and the model's cached pack. Each output gets a development/test half from its prompt (sha256 of
the prompt text, even first byte: dev), so a prompt's outputs all fall in one half.

The outputs are then labelled by hand (rules: steering/data/JUDGE_LABELLING.md) into
steering/data/judge_labelled.jsonl; `steering.evaluation.judge_agreement` measures judges against them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HARMLESS = "harmless_val[400:424]"
# (label, method, strength, k, prompt sets): k None = the method's default (the pack's max).
SETTINGS = (
    ("none", "none", 0.0, None, ("harmful", "harmless")),
    ("ablate", "ablate", 1.0, None, ("harmful", "harmless")),
    ("inlp_flip", "inlp_flip", 1.0, None, ("harmful",)),
    ("inlp_null", "inlp_null", 1.0, None, ("harmful",)),
    ("inlp_negate_positive k=2", "inlp_negate_positive", 1.0, 2, ("harmful", "harmless")),
    ("ace s=0", "ace", 0.0, None, ("harmful",)),
    ("actadd calibrated", "actadd", "calibrated", None, ("harmless",)),
    ("ace calibrated", "ace", "calibrated", None, ("harmless",)),
)


def half(prompt: str) -> str:
    return "dev" if hashlib.sha256(prompt.encode()).digest()[0] % 2 == 0 else "test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pack", default=None, help="pack path (default: the model's cached)")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: generate only every n-th output from the i-th (parallel runs; "
                             "ids stay global)")
    args = parser.parse_args(argv)

    import torch

    from steering import SteeringSpec, build_row, load_model
    from steering.data.prompts import load_instructions
    from steering.extraction.store import ensure_pack
    from steering.interventions.generate import generate

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    lm = load_model("embedded", "cpu", precision=args.precision)
    pack = ensure_pack(lm, args.pack)
    sets = {"harmful": ("harmful_val", load_instructions("harmful_val")),
            "harmless": (HARMLESS, load_instructions(HARMLESS))}
    items, rows = [], []
    for label, method, strength, k, which in SETTINGS:
        if strength == "calibrated":
            strength = pack.calibrated_strength(method) or 1.0
        row = build_row(SteeringSpec(method, float(strength), k), pack if method != "none"
                        else None)
        for name in which:
            source, prompts = sets[name]
            for i, p in enumerate(prompts):
                items.append({"source": source, "prompt_index": i, "prompt": p,
                              "setting": label, "applied": row.applied(), "half": half(p)})
                rows.append(row)
    shard, shards = map(int, args.shard.split("/"))
    mine = [i for i in range(len(items)) if i % shards == shard]
    order = sorted(mine, key=lambda i: len(items[i]["prompt"]))
    texts = generate(lm, [items[i]["prompt"] for i in order], [rows[i] for i in order],
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     desc="outputs")
    for i, text in zip(order, texts, strict=True):
        items[i]["output"] = text
    meta = {"model": lm.name, "precision": args.precision, "pack_created": pack.meta.get(
        "created"), "pack_extract_version": pack.meta.get("extract_version"),
        "pack_layer": pack.layer, "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 1)}
    with open(args.out, "w") as f:
        for n in sorted(mine):
            f.write(json.dumps({"id": n, **items[n], "generation": meta}) + "\n")
    print(json.dumps({"outputs": len(mine), **meta}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
