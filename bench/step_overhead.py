"""Steering overhead of one decode step, in process (issue 11's per-token target, without the
server's noise). One run prints a table and one JSON line.

    .venv/bin/python bench/step_overhead.py [--batch 1] [--steps 200] [--precision auto]

The embedded model (its default pack) runs one decode step (T = 1, a ~40-token KV cache, cropped
back after each step) for each row below, round-robin in a rotating order, `--steps` times; the
table gives each row's median step time and its ratio to the unsteered step. Round-robin
interleaving spreads the shared machine's drift over every row alike; the server-level figure
(`bench/serve.py`) adds the engine's per-token work, which is the same steered or not. Target (issue 11): ≤ 3% per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from steering.interventions.hooks import hooks_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 0.03


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)

    from bench.decode_step import prefilled, round_robin
    from steering import SteeringSpec, build_row, compose, load_model
    from steering.extraction.store import ensure_pack

    lm = load_model("embedded", "cpu", "auto", precision=args.precision)
    pack = ensure_pack(lm)

    def row(method: str, **kw):
        return build_row(SteeringSpec(method, 1.0, **kw), pack)

    rows = {"none": None, "actadd": row("actadd"), "ablate": row("ablate"), "ace": row("ace"),
            "inlp_null": row("inlp_null"), "inlp_flip": row("inlp_flip"),
            "inlp_reflect": row("inlp_reflect"),
            "[ablate,actadd]": compose([row("ablate"), row("actadd")])}
    b = args.batch
    cache, token, positions, mask = prefilled(lm, b)

    def step(steering) -> float:
        hooks_of(lm).set_rows(None if steering is None else [steering] * b)
        t0 = time.perf_counter()
        lm.model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True)
        seconds = time.perf_counter() - t0
        cache.crop(-1)  # back to the prompt: every step sees the same cache
        return seconds

    times = round_robin(rows, step, args.steps)
    hooks_of(lm).set_rows(None)
    base = statistics.median(times["none"])
    result = {name: {"ms": 1000 * statistics.median(v),
                     "overhead": statistics.median(v) / base - 1} for name, v in times.items()}
    print(f"decode step, batch {b}, {lm.precision}, {args.steps} round-robin steps per row")
    print(f"{'steering':<18} {'ms/step':>8} {'overhead':>9}")
    for name, r in result.items():
        print(f"{name:<18} {r['ms']:>8.2f} {100 * r['overhead']:>+8.1f}%")
    worst = max((r["overhead"], n) for n, r in result.items() if n != "none")
    print(f"worst: {worst[1]} {100 * worst[0]:+.1f}% (target <= {100 * TARGET:.0f}%: "
          f"{'met' if worst[0] <= TARGET else 'NOT met'})")
    print(json.dumps({"bench": "step_overhead", "batch": b, "precision": lm.precision,
                      "steps": args.steps, "rows": result, "worst": worst[1],
                      "worst_overhead": round(worst[0], 4), "target": TARGET,
                      "met": worst[0] <= TARGET}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
