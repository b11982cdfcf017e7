"""Ablation's KL on harmless validation prompts per candidate layer, on more prompts than
selection judges. One run prints a table and one JSON line.

    .venv/bin/python bench/selection_kl.py [--n 64] [--layers 10-16]

Selection (Arditi et al.'s KL < 0.1 filter) judges each candidate on `harmless_val[:16]`; the
report measures the chosen one on a disjoint evaluation slice. This bench asks whether a
candidate passing on 16 prompts passes on more of the *validation* split (never the
evaluation slice or a test split): the mean KL(unsteered ‖ ablated) of the next-token
distribution at the first answer position, per slice of 16 prompts and overall, at fp32 (the
precision extraction runs at), with the cached pack's DiM direction of each layer at its
position.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KL_THRESHOLD = 0.1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="harmless_val[:n], judged in slices of 16")
    ap.add_argument("--layers", default="10-16", help="candidate layers, a-b")
    args = ap.parse_args(argv)

    import torch

    from steering import SteeringSpec, build_row, load_model
    from steering.data.prompts import load_instructions
    from steering.extraction.judge import judge
    from steering.extraction.store import ensure_pack

    started = time.perf_counter()
    lm = load_model("embedded", "cpu", "auto", precision="fp32")
    pack = ensure_pack(lm)
    prompts = load_instructions("harmless_val")[: args.n]
    lo, hi = (int(x) for x in args.layers.split("-"))
    base = torch.log_softmax(judge(lm, prompts, [None] * len(prompts), 1, 32)
                             .first_logits.double(), -1)
    slices = [(a, min(a + 16, len(prompts))) for a in range(0, len(prompts), 16)]
    rows = []
    for layer in range(lo, hi + 1):
        candidate = copy.copy(pack)
        candidate.layer = layer
        ablate = build_row(SteeringSpec("ablate", 1.0), candidate)
        steered = torch.log_softmax(judge(lm, prompts, [ablate] * len(prompts), 1, 32)
                                    .first_logits.double(), -1)
        kl = (base.exp() * (base - steered)).sum(-1)
        rows.append({"layer": layer, "kl_all": float(kl.mean()),
                     "kl_slices": {f"[{a}:{b}]": float(kl[a:b].mean()) for a, b in slices},
                     "kl_max": float(kl.max()),
                     "passes_all": float(kl.mean()) < KL_THRESHOLD})
    heads = list(rows[0]["kl_slices"])
    print(f"ablation KL on harmless_val[:{len(prompts)}], fp32, pack layer {pack.layer} "
          f"(selection judges [0:16])")
    print(f"{'layer':>5} " + " ".join(f"{h:>9}" for h in heads) + f" {'all':>7} {'max':>6}")
    for r in rows:
        print(f"{r['layer']:>5} " + " ".join(f"{r['kl_slices'][h]:>9.3f}" for h in heads)
              + f" {r['kl_all']:>7.3f} {r['kl_max']:>6.2f}")
    passing = [r["layer"] for r in rows if r["passes_all"]]
    print(f"candidates with KL < {KL_THRESHOLD} on all {len(prompts)}: {passing or 'none'}")
    print(json.dumps({"bench": "selection_kl", "n": len(prompts), "pack_layer": pack.layer,
                      "rows": rows, "passing": passing,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
