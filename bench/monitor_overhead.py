"""Overhead of per-token monitors on one decode step, in process (issue 30's target: ≤ 1% per
decoded token for two monitors). One run prints a table and one JSON line.

    .venv/bin/python bench/monitor_overhead.py [--batch 1] [--steps 300] [--precision auto]

The embedded model runs one decode step (T = 1, a ~40-token KV cache cropped back after each
step) for each row below, round-robin in a rotating order, `--steps` times. A monitored step is
what the engine does per decoded token for a monitored batch (server/engine/core.py): set the
rows' monitors, the forward with the read-only hooks, and `take()` (each row's scores as Python
floats). Rows: no monitor; one monitor (refusal at its layer); two monitors at two layers
(refusal, and casual when that pack is cached, else refusal two layers up); two monitors on a
row steered by ablation (against the same steering without monitors). The table gives each row's
median step time and its ratio to its baseline.

On a loaded machine the step ratio's noise (a few percent) exceeds the target, so the run also
times what a monitored step adds, directly: `set_rows` of the same rows (the decode loop's case),
each monitored layer's hook on a [B, 1, d] input, and `take()` — `--direct` repetitions, median
each — and divides their sum by the median unmonitored step ("direct" in the table and the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 0.01


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--direct", type=int, default=2000, help="repetitions of the direct timing")
    args = ap.parse_args(argv)

    from bench.decode_step import prefilled, round_robin
    from steering import SteeringSpec, build_row, load_model
    from steering.extraction.store import default_pack_path, ensure_pack
    from steering.interventions.hooks import hooks_of
    from steering.interventions.monitors import monitor_of, monitors_of
    from steering.packs.format import load_pack, pack_paths

    lm = load_model("embedded", "cpu", "auto", precision=args.precision)
    pack = ensure_pack(lm)
    casual_path = default_pack_path(lm, "casual")
    if pack_paths(casual_path)[0].is_file():
        second = monitor_of(load_pack(casual_path, model=lm.model, name="casual"))
    else:
        second = monitor_of(pack, layer=(pack.layer + 2) % pack.n_layers)
    first = monitor_of(pack)
    ablate = build_row(SteeringSpec("ablate", 1.0), pack)
    b = args.batch
    rows = {  # name: (steering, monitors per row, baseline row)
        "none": (None, None, "none"),
        "1 monitor": (None, (first,), "none"),
        "2 monitors": (None, (first, second), "none"),
        "ablate": (ablate, None, "ablate"),
        "ablate + 2 monitors": (ablate, (first, second), "ablate"),
    }
    cache, token, positions, mask = prefilled(lm, b)
    watch = monitors_of(lm)
    scores: list = []

    def step(row) -> float:
        steering, monitors, _ = row
        t0 = time.perf_counter()
        hooks_of(lm).set_rows(None if steering is None else [steering] * b)
        watch.set_rows(None if monitors is None else [monitors] * b)
        lm.model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True)
        if monitors is not None:
            scores.append(watch.take())
        seconds = time.perf_counter() - t0
        cache.crop(-1)  # back to the prompt: every step sees the same cache
        return seconds

    times = round_robin(rows, step, args.steps)
    hooks_of(lm).set_rows(None)
    watch.set_rows(None)
    assert scores and all(len(s) == b for s in scores)
    direct = _direct_cost(watch, [(first, second)] * b, lm.d_model, b, args.direct)
    watch.set_rows(None)
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {}
    for name in rows:  # per-round paired ratios: the same round's baseline step
        paired = sorted(a / b - 1 for a, b in zip(times[name], times[rows[name][2]]))
        q1, q3 = paired[len(paired) // 4], paired[(3 * len(paired)) // 4]
        result[name] = {"ms": round(1000 * med[name], 3),
                        "overhead": round(statistics.median(paired), 4),
                        "iqr": [round(q1, 4), round(q3, 4)]}
    print(f"decode step, batch {b}, {lm.precision}, {args.steps} round-robin steps per row; "
          f"monitors: {first.name} (layer {first.layer}), {second.name} (layer {second.layer})")
    print(f"{'row':<22} {'ms/step':>8} {'vs':>7} {'overhead':>9} {'paired IQR':>18}")
    for name, r in result.items():
        iqr = f"[{100 * r['iqr'][0]:+.1f}%, {100 * r['iqr'][1]:+.1f}%]"
        print(f"{name:<22} {r['ms']:>8.2f} {rows[name][2]:>7} {100 * r['overhead']:>+8.2f}% "
              f"{iqr:>18}")
    two = max(result["2 monitors"]["overhead"], result["ablate + 2 monitors"]["overhead"])
    direct_share = direct["total_us"] / (1e6 * med["none"])
    print(f"direct: set_rows {direct['set_rows_us']:.1f} µs + hooks {direct['hooks_us']:.1f} µs"
          f" + take {direct['take_us']:.1f} µs = {direct['total_us']:.1f} µs per decoded token "
          f"= {100 * direct_share:.3f}% of the unmonitored step")
    print(f"two monitors: direct {100 * direct_share:.3f}% per decoded token (target <= "
          f"{100 * TARGET:.0f}%: {'met' if direct_share <= TARGET else 'NOT met'}); step ratio "
          f"{100 * two:+.2f}% (median of paired rounds; its IQR shows the machine's noise)")
    print(json.dumps({"bench": "monitor_overhead", "batch": b, "precision": lm.precision,
                      "steps": args.steps, "monitors": [first.describe(), second.describe()],
                      "rows": result, "two_monitors_overhead": two, "direct": direct,
                      "direct_share": round(direct_share, 6), "target": TARGET,
                      "met": direct_share <= TARGET}))
    return 0


def _direct_cost(watch, rows, d: int, b: int, reps: int) -> dict:
    """Median µs of what a monitored decode step adds: set_rows (same rows), the hooks of the
    monitored layers on a [B, 1, d] input, take()."""
    import torch

    watch.set_rows(rows)
    layers = sorted(watch._plans)
    hooks = [watch._hook(layer) for layer in layers]
    h = torch.randn(b, 1, d)
    samples: dict[str, list[float]] = {"set_rows_us": [], "hooks_us": [], "take_us": []}
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            watch.set_rows(rows)
            t1 = time.perf_counter()
            for hook in hooks:
                hook(None, (h,), {})
            t2 = time.perf_counter()
            watch.take()
            t3 = time.perf_counter()
            samples["set_rows_us"].append(1e6 * (t1 - t0))
            samples["hooks_us"].append(1e6 * (t2 - t1))
            samples["take_us"].append(1e6 * (t3 - t2))
    out: dict = {k: round(statistics.median(v), 2) for k, v in samples.items()}
    out["total_us"] = round(sum(out.values()), 2)
    out["layers"] = layers
    return out


if __name__ == "__main__":
    raise SystemExit(main())
