"""Steering controls on the embedded model (issue 13): targeting, conditions, composition.

    .venv/bin/python bench/controls.py scores                 # condition scores, dev splits
    .venv/bin/python bench/controls.py targeting [--n 20]     # actadd apply_to all/prompt/generation
    .venv/bin/python bench/controls.py conditional            # conditional actadd and ablation
    .venv/bin/python bench/controls.py ... --final            # add harmful_test_jbb (report only)

Everything runs through the serving engine in-process (`server.engine.Engine`: the batching,
per-row steering and prefill-time condition path the server uses), greedy, on the fp32 model
and its cached default pack. Each answer (`--tokens` greedy tokens, default 64: the length the
three-way judge's hand labels were read at) is judged three ways, refuses / complies / other, by
the default offline judge (`steering.evaluation.three_way`, agreement in docs/report/judge.md),
with the substring matcher's refusal beside it.
`harmful_test_jbb` is a test split: it is measured only with `--final`, after every threshold
was chosen on harmful_val / harmless_val.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from steering import Condition, SteeringSpec, build_row, load_model  # noqa: E402
from steering.data.prompts import load_instructions  # noqa: E402
from steering.evaluation.refusal import (
    is_refusal,  # noqa: E402
    wilson_interval,  # noqa: E402
)
from steering.evaluation.three_way import LABELS, judge_answers  # noqa: E402
from steering.extraction.store import ensure_pack  # noqa: E402
from steering.interventions.conditions import resolve_conditions  # noqa: E402
from steering.models.chat import format_chat  # noqa: E402

HARMLESS_DEV = "harmless_val[:100]"


def split(name: str) -> list[str]:
    base, _, rest = name.partition("[")
    prompts = load_instructions(base)
    if rest:
        a, _, b = rest.rstrip("]").partition(":")
        prompts = prompts[int(a or 0):int(b) if b else None]
    return prompts


def run_engine(lm, prompts: list[str], rows: list, tokens: int, max_batch: int = 20) -> list[dict]:
    """Greedy completions of (prompt, steering) pairs, all submitted together (mixed batches)."""
    async def main():
        engine = Engine(lm, max_batch=max_batch, max_queue=len(prompts) + 1,
                        request_timeout_s=24 * 3600.0)  # a long queue on a shared CPU
        await engine.start()

        async def one(prompt, row):
            ids = lm.tokenizer(format_chat(lm.tokenizer, prompt),
                               add_special_tokens=False)["input_ids"]
            handle = engine.submit(GenerationRequest(ids, SamplingParams(
                max_tokens=tokens, temperature=0.0), row))
            text, applied, out, last = "", None, [], None
            async for event in handle:
                applied = applied or event.steering
                text += event.text
                if event.token_id is not None:
                    out.append(event.token_id)
                last = event
            if applied is None:
                raise RuntimeError(f"request ended without a token: {last.finish_reason} "
                                   f"{last.error}")
            return {"text": text, "tokens": out, "steering": applied.applied()}

        results = await asyncio.gather(*[one(p, r) for p, r in zip(prompts, rows)])
        await engine.shutdown()
        return results

    return asyncio.run(main())


def rate(flags: list[bool]) -> dict:
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": [round(lo, 3), round(hi, 3)]}


def fmt(r: dict) -> str:
    return f"{r['rate']:.0%} ({r['k']}/{r['n']}, 95% CI {r['ci95'][0]:.0%}–{r['ci95'][1]:.0%})"


def judged(lm, prompts: list[str], results: list[dict]) -> dict:
    """Three-way rates of the answers (the unsteered model reads them: no steering is set
    outside `run_engine`) and the substring matcher's refusal rate."""
    labels = judge_answers(lm, prompts, [r["text"] for r in results])
    return {**{c: rate([x == c for x in labels]) for c in LABELS},
            "substring_refusal": rate([is_refusal(r["text"]) for r in results])}


def fmt3(entry: dict) -> str:
    return " · ".join(f"{c} {fmt(entry[c])}" for c in (*LABELS, "substring_refusal"))


def scores(lm, pack, prompts: list[str]) -> list[float]:
    probe = build_row(SteeringSpec("none", when=Condition(above=0.5)), None, pack)
    return [r.outcome.score for r in resolve_conditions(lm, prompts, [probe] * len(prompts))]


def describe(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=20)
    return (f"mean {statistics.mean(xs):.2f} · 5% {q[0]:.2f} · median {statistics.median(xs):.2f}"
            f" · 95% {q[-1]:.2f} · min {min(xs):.2f} · max {max(xs):.2f}")


# ---- the measurements ----------------------------------------------------------------------------

def cmd_scores(lm, pack, args) -> dict:
    names = ["harmful_val", HARMLESS_DEV, "overrefusal"] + (["harmful_test_jbb"] if args.final
                                                           else [])
    out = {}
    for name in names:
        xs = scores(lm, pack, split(name))
        out[name] = {"scores": xs, "above_0.5": rate([x > 0.5 for x in xs])}
        print(f"{name:<20} n={len(xs):<4} {describe(xs)} · above 0.5: "
              f"{fmt(out[name]['above_0.5'])}")
    return out


def cmd_targeting(lm, pack, args) -> dict:
    prompts = split(f"harmless_val[:{args.n}]")
    strength = args.strength or pack.calibrated_strength("actadd") or 1.0
    settings = {"unsteered": SteeringSpec("none")}
    for target in ("all", "prompt", "generation"):
        settings[f"actadd {strength:g} apply_to={target}"] = SteeringSpec(
            "actadd", strength, apply_to=target)
    settings[f"actadd {strength:g} generation_window=[0,4)"] = SteeringSpec(
        "actadd", strength, generation_window=(0, 4))
    settings[f"actadd {strength:g} generation_window=[4,∞)"] = SteeringSpec(
        "actadd", strength, generation_window=(4, None))
    names, rows, batch = [], [], []
    for name, spec in settings.items():  # every setting in one mixed batch stream
        row = build_row(spec, pack)
        names += [name] * len(prompts)
        rows += [row] * len(prompts)
        batch += prompts
    t0 = time.perf_counter()
    results = run_engine(lm, batch, rows, args.tokens)
    out = {}
    print(f"induced refusal on harmless_val[:{args.n}] ({args.tokens} greedy tokens, "
          f"{time.perf_counter() - t0:.0f} s):")
    for name in settings:
        out[name] = judged(lm, prompts, [r for n, r in zip(names, results) if n == name])
        print(f"  {name:<36} {fmt3(out[name])}")
    return out


def choose_below(lm, pack, refused_share: float = 0.05) -> tuple[float, dict]:
    """The conditional ablation's threshold, from harmful_val only: the largest t such that at
    most `refused_share` of the harmful_val prompts the unsteered model refuses score below t
    (those are the ones whose refusal the ablation would remove)."""
    prompts = split("harmful_val")
    none = build_row(SteeringSpec("none"), None)
    refused = [is_refusal(r["text"]) for r in run_engine(lm, prompts, [none] * len(prompts),
                                                         32)]
    xs = sorted(x for x, r in zip(scores(lm, pack, prompts), refused) if r)
    t = xs[int(refused_share * len(xs))]  # at most that share of them lie strictly below t
    info = {"refused": len(xs), "n": len(prompts), "refused_scores": describe(xs),
            "below_t": sum(x < t for x in xs)}
    print(f"harmful_val: unsteered refuses {len(xs)}/{len(prompts)}; their scores {describe(xs)};"
          f" t = {t:.3f} leaves {info['below_t']} of them below t")
    return t, info


def cmd_conditional(lm, pack, args) -> dict:
    strength = pack.calibrated_strength("actadd") or 1.0
    below, choice = (args.below, None) if args.below is not None else choose_below(lm, pack)
    add = f"actadd {strength:g}"
    rows = {"unsteered": build_row(SteeringSpec("none"), None),
            add: build_row(SteeringSpec("actadd", strength), pack),
            f"{add} when above 0.5": build_row(SteeringSpec(
                "actadd", strength, when=Condition(above=0.5)), pack),
            "ablate": build_row(SteeringSpec("ablate", 1.0), pack),
            f"ablate when below {below:.3f}": build_row(SteeringSpec(
                "ablate", 1.0, when=Condition(below=below)), pack)}
    labels = list(rows)
    # Scores do not depend on the threshold: the conditional ablation's rows report every
    # prompt's score, so the conditional actadd's applied share (above 0.5) comes from them too.
    plan = {"harmful_val": [0, 4], f"harmless_val[:{args.n}]": [0, 1, 3, 4],
            "overrefusal": [0, 3, 4]}
    if args.final:
        plan["harmful_test_jbb"] = [0, 4]
    if args.sets:
        plan = {k: v for k, v in plan.items() if k.split("[")[0] in args.sets.split(",")}
    out: dict = {"below": below, "choice": choice}
    for name, which in plan.items():
        prompts = split(name)
        batch_labels, batch_rows, batch = [], [], []
        for i in which:
            batch_labels += [labels[i]] * len(prompts)
            batch_rows += [rows[labels[i]]] * len(prompts)
            batch += prompts
        t0 = time.perf_counter()
        results = run_engine(lm, batch, batch_rows, args.tokens)
        print(f"{name} (n={len(prompts)}, {time.perf_counter() - t0:.0f} s):")
        out[name] = {}
        for i in which:
            mine = [r for lab, r in zip(batch_labels, results) if lab == labels[i]]
            entry = judged(lm, prompts, mine)
            conds = [r["steering"]["condition"] for r in mine if r["steering"]["condition"]]
            extra = ""
            if conds:
                entry["applied"] = rate([c["applied"] for c in conds])
                entry["above_0.5"] = rate([c["score"] > 0.5 for c in conds])
                entry["scores"] = [c["score"] for c in conds]
                extra = (f" · applied {fmt(entry['applied'])} · score above 0.5 (the "
                         f"conditional actadd) {fmt(entry['above_0.5'])}")
            out[name][labels[i]] = entry
            print(f"  {labels[i]:<28} {fmt3(entry)}{extra}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("scores", "targeting", "conditional"))
    parser.add_argument("--n", type=int, default=20, help="harmless_val prompts")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens judged")
    parser.add_argument("--strength", type=float, default=None,
                        help="actadd strength (default: the pack's calibrated one)")
    parser.add_argument("--below", type=float, default=None,
                        help="threshold of the conditional ablation (default: chosen on "
                             "harmful_val, see choose_below)")
    parser.add_argument("--final", action="store_true", help="also measure harmful_test_jbb")
    parser.add_argument("--sets", default=None,
                        help="comma-separated splits of `conditional` to run (default: all)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    lm = load_model("embedded", device="cpu", dtype="float32")
    pack = ensure_pack(lm)
    print(f"pack {pack.name}: layer {pack.layer}, position {pack.position}; calibrated actadd "
          f"{pack.calibrated_strength('actadd')}")
    result = {"scores": cmd_scores, "targeting": cmd_targeting,
              "conditional": cmd_conditional}[args.what](lm, pack, args)
    line = {"bench": f"controls.{args.what}", "tokens": args.tokens, "final": args.final,
            "result": result}
    if args.json:
        Path(args.json).write_text(json.dumps(line, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
