"""HumanEval pass@1 (greedy) per steering setting: capability under steering.

    .venv/bin/python bench/capability.py [--problems 164] [--settings none,ablate,...]

Settings: unsteered, every suppression method and preset (no-refusal = ablate; the INLP edits at
the pack's k; the project's raw-origin variants at k = 2), actadd at strength 1 and at the pack's
calibrated strength, ACE at 0, and the conditional settings of the README (ablation when the
prompt scores below 0.415; actadd at the calibrated strength on generated tokens when it scores
above 0.5). Generated code runs in `steering.evaluation.sandbox` (own process, time and memory
limits, no network, a throwaway directory). Prints a table and one JSON line; `--out` writes the
JSON (every task's status per setting). Timings are from a shared machine: compare rows of one
run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("none", "ablate", "inlp_flip", "inlp_null", "inlp_negate_positive k=2",
            "inlp_zero_positive k=2", "ace s=0", "actadd s=1", "actadd calibrated",
            "ablate below 0.415", "actadd calibrated above 0.5, generation")


def spec_of(name: str, pack):
    from steering.interventions.spec import Condition, SteeringSpec

    cal = pack.calibrated_strength("actadd") or 1.0
    table = {
        "none": SteeringSpec("none", 0.0),
        "ablate": SteeringSpec("ablate", 1.0),
        "inlp_flip": SteeringSpec("inlp_flip", 1.0),
        "inlp_null": SteeringSpec("inlp_null", 1.0),
        "inlp_negate_positive k=2": SteeringSpec("inlp_negate_positive", 1.0, 2),
        "inlp_zero_positive k=2": SteeringSpec("inlp_zero_positive", 1.0, 2),
        "ace s=0": SteeringSpec("ace", 0.0),
        "actadd s=1": SteeringSpec("actadd", 1.0),
        "actadd calibrated": SteeringSpec("actadd", cal),
        "ablate below 0.415": SteeringSpec("ablate", 1.0, when=Condition(below=0.415)),
        "actadd calibrated above 0.5, generation": SteeringSpec(
            "actadd", cal, apply_to="generation", when=Condition(above=0.5)),
    }
    return table[name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=164, help="first N HumanEval problems")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pack", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from steering import build_row, load_model
    from steering.evaluation.capability import humaneval_pass_at_1, humaneval_problems
    from steering.extraction.store import ensure_pack

    torch.set_grad_enabled(False)
    lm = load_model("embedded", "cpu", precision=args.precision)
    pack = ensure_pack(lm, args.pack)
    problems = humaneval_problems(args.problems)
    rows = []
    for name in args.settings.split(","):
        spec = spec_of(name, pack)
        row = None if spec.method == "none" else build_row(spec, pack)
        t0 = time.perf_counter()
        rec = humaneval_pass_at_1(lm, row, problems, args.max_new_tokens, args.batch_size,
                                  desc=name).record()
        rec["setting"], rec["seconds"] = name, round(time.perf_counter() - t0, 1)
        rows.append(rec)
        print(f"| {name} | {rec['passed']}/{rec['n']} | {rec['pass_at_1']:.1%} | "
              f"[{rec['ci'][0]:.0%}, {rec['ci'][1]:.0%}] | {rec['seconds']:.0f} s |", flush=True)
    summary = {"bench": "capability", "benchmark": "HumanEval", "problems": len(problems),
               "max_new_tokens": args.max_new_tokens, "precision": args.precision,
               "pack_created": pack.meta.get("created"), "isolation": rows[0]["isolation"],
               "pass_at_1": {r["setting"]: r["pass_at_1"] for r in rows},
               "seconds": {r["setting"]: r["seconds"] for r in rows}}
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "rows": rows}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
