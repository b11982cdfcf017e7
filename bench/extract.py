"""Extraction benchmark on the embedded model (issue 2). One run prints a table and one JSON line.

    .venv/bin/python bench/extract.py [--mode fast] [--n 8] [--device cpu] [--model embedded]

1. loads the embedded model (from its safetensors cache; converted from the GGUF wheels once);
2. runs pack extraction (DiM + selection, ACE means, INLP) on the packaged train/val splits into
   a temporary folder — never the user's pack cache — and reloads the pack with its checks;
3. for each method, the change of the mean refusal score (log-odds of the refusal tokens at the
   first answer position, Arditi et al. 2024 App. B) against the unsteered model on the first
   `--n` prompts of a validation split: `actadd` on harmless_val (should rise), `ablate`,
   `ace` at strength 0, `inlp_null` and `inlp_flip` on harmful_val (should fall).

Target: fast-mode extraction under 5 minutes on a 2-core CPU. The machine's load average
(1, 5, 15 min) before and after the extraction is printed with the time: on a shared machine the
time says little without it, so the process's CPU time is printed too: on an idle machine the
extraction's wall time is about CPU time / torch threads (both threads busy in the matmuls).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from steering.interventions.hooks import hooks_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SECONDS = 300.0
# (method, strength, split the change is measured on, expected sign of the change)
SETTINGS = [
    ("actadd", 1.0, "harmless_val", +1),
    ("ablate", 1.0, "harmful_val", -1),
    ("ace", 0.0, "harmful_val", -1),
    ("inlp_null", 1.0, "harmful_val", -1),
    ("inlp_flip", 1.0, "harmful_val", -1),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="fast", choices=("fast", "full"))
    parser.add_argument("--n", type=int, default=8, help="val prompts per split for the scores")
    parser.add_argument("--model", default="embedded", help="'embedded' (default) or a folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    import torch

    from steering import SteeringSpec, build_row, load_model, load_pack
    from steering.data.prompts import load_instructions
    from steering.evaluation.refusal import refusal_score, refusal_token_ids
    from steering.extraction.extract import ExtractConfig, extract_pack
    from steering.interventions.activations import last_logits

    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - t0
    print(f"model: {lm.name}, {lm.n_layers} layers, d={lm.d_model}, {lm.device}, {lm.dtype}, "
          f"torch threads {torch.get_num_threads()}; loaded in {load_seconds:.1f} s", flush=True)

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        pack = extract_pack(lm, config=ExtractConfig.preset(args.mode), name="refusal")
        extract_seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        path = pack.save(Path(tmp) / "refusal")
        pack = load_pack(path, model=lm.model)  # the saved pack passes its own checks
    load_after = [round(x, 2) for x in os.getloadavg()]

    selection = pack.meta["selection"]
    chosen = selection["chosen"]
    print(f"\nextraction ({args.mode}): {extract_seconds:.1f} s "
          f"(target < {TARGET_SECONDS:.0f} s: {'met' if extract_seconds < TARGET_SECONDS else 'MISSED'}); "
          f"load average (1/5/15 min) {load_before} before, {load_after} after on "
          f"{os.cpu_count()} CPUs; CPU time {cpu_seconds:.0f} s, so about "
          f"{cpu_seconds / torch.get_num_threads():.0f} s on an idle machine with "
          f"{torch.get_num_threads()} threads")
    print(f"phases (s): {pack.meta.get('timings')}")
    for split, d in pack.meta["data"].items():
        f = d.get("filter") or {}
        print(f"  {split:<15} scanned {f.get('scanned')}, passed {f.get('passed')} "
              f"({f.get('rule')}), filter {'applied' if f.get('applied') else 'NOT applied'}, "
              f"kept {d['n']}")
    print(f"selected layer {pack.layer}, position {pack.position} "
          f"(filters passed: {selection.get('filters')}; bypass rate {chosen['bypass_rate']:.2f}, "
          f"induce rate {chosen['induce_rate']:.2f}, KL {chosen['kl']:.3f}); INLP directions: "
          f"{pack.max_k()} at layers {pack.inlp_layers}, held-out accuracy "
          f"{pack.describe()['inlp_accuracy']}", flush=True)
    for method, entry in pack.meta.get("calibration", {}).items():
        print(f"  calibration {method}: {entry}")

    token_ids = refusal_token_ids(lm.tokenizer)
    prompts = {split: load_instructions(split)[: args.n] for split in ("harmful_val", "harmless_val")}

    def scores(split: str, spec=None) -> torch.Tensor:
        row = build_row(spec, pack) if spec is not None else None
        logits = last_logits(lm, prompts[split], hooks_of(lm), row, batch_size=args.n)
        return refusal_score(logits, token_ids)

    t0 = time.perf_counter()
    base = {split: scores(split) for split in prompts}
    results = []
    for method, strength, split, sign in SETTINGS:
        steered = scores(split, SteeringSpec(method, strength))
        delta = steered - base[split]
        results.append({
            "method": method, "strength": strength, "split": split,
            "baseline": round(float(base[split].mean()), 4),
            "steered": round(float(steered.mean()), 4),
            "change": round(float(delta.mean()), 4),
            "moved_as_expected": int((torch.sign(delta) == sign).sum()),
            "expected": "up" if sign > 0 else "down",
        })
    score_seconds = time.perf_counter() - t0

    print(f"\nmean refusal score (log-odds) on the first {args.n} prompts of each val split:")
    header = (f"{'method':<10} {'strength':>8}  {'split':<13} {'unsteered':>9} {'steered':>8} "
              f"{'change':>8}  {'expected':>8}  {'prompts moved so':>16}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['method']:<10} {r['strength']:>8g}  {r['split']:<13} {r['baseline']:>9.3f} "
              f"{r['steered']:>8.3f} {r['change']:>+8.3f}  {r['expected']:>8}  "
              f"{r['moved_as_expected']:>10}/{args.n}")
    print(f"(scoring took {score_seconds:.1f} s)\n")

    print(json.dumps({
        "bench": "extract", "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype),
        "mode": args.mode, "load_seconds": round(load_seconds, 1),
        "extract_seconds": round(extract_seconds, 1), "target_seconds": TARGET_SECONDS,
        "within_target": extract_seconds < TARGET_SECONDS,
        "cpu_seconds": round(cpu_seconds, 1),
        "idle_estimate_seconds": round(cpu_seconds / torch.get_num_threads(), 1),
        "loadavg_before": load_before, "loadavg_after": load_after, "cpus": os.cpu_count(),
        "layer": pack.layer, "position": pack.position, "k_max": pack.max_k(),
        "filters": selection.get("filters"), "n_prompts": args.n,
        "timings": pack.meta.get("timings"),
        "calibrated": {m: pack.calibrated_strength(m) for m in ("actadd", "ace")},
        "refusal_score_change": {r["method"]: r["change"] for r in results},
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
