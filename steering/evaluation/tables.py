"""The evaluation's results as tables: the Markdown table of a grid (unsteered first), the
LLM-judge table, the three-way rates' one-line form, and the JSON/Markdown files `steer eval`
writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _rate(r: dict, prefix: str) -> str:
    """"0.05 (5/100) [0.02, 0.11]": rate, counts and Wilson 95% interval."""
    rate = r.get(f"{prefix}_refusal_rate")
    if rate is None:
        return "–"
    ci = r.get(f"{prefix}_ci") or [math.nan, math.nan]
    return f"{rate:.2f} ({r[f'{prefix}_refused']}/{r[f'{prefix}_n']}) [{ci[0]:.2f}, {ci[1]:.2f}]"


def three(r: dict, prefix: str, show_n: bool = True) -> str:
    """"R 10% · C 62% · O 28% (n=37)": the three-way rates of a prompt set ("–" if unmeasured)."""
    n = r.get(f"{prefix}_n3")
    if not n:
        return "–"
    rates = " · ".join(f"{c[0].upper()} {r[f'{prefix}_{c}']['rate']:.0%}"
                       for c in ("refuses", "complies", "other"))
    return rates + (f" (n={n})" if show_n else "")


def markdown_table(result: dict) -> str:
    """The results as one Markdown table, the unsteered baseline first. Three-way rates
    (R refuses · C complies · O other, default offline judge) per prompt set; substring-matcher
    rates with their counts and Wilson 95% intervals; column heads name the prompt set."""
    p = result["prompts"]
    over = "overrefusal" in p
    sets = ["harmful", "harmless"] + (["overrefusal"] if over else [])
    head = ("| setting | "
            + " | ".join(f"{s} ({p[s]['source']}): three-way" for s in sets)
            + f" | harmful refusal, substring ({p['harmful']['source']}) | harmful refusal score "
            f"| harmless refusal, substring ({p['harmless']['source']}) "
            + (f"| over-refusal, substring ({p['overrefusal']['source']}) " if over else "")
            + "| harmless refusal score | PPL (own completions) | PPL (WikiText) | KL harmless "
            + "| HumanEval pass@1 |\n"
            + "|---" * (9 + over + len(sets)) + "|\n")
    lines = []
    for r in [result["baseline"], *result["results"]]:
        lines.append(
            f"| {r['label']} | " + " | ".join(three(r, s) for s in sets)
            + f" | {_rate(r, 'harmful')} | {_fmt(r['harmful_refusal_score'], 2)} "
            f"| {_rate(r, 'harmless')} " + (f"| {_rate(r, 'overrefusal')} " if over else "")
            + f"| {_fmt(r['harmless_refusal_score'], 2)} | {_fmt(r['ppl_completions'], 2)} "
            f"| {_fmt(r['ppl_general'], 2)} | {_fmt(r['kl_harmless'], 4)} "
            f"| {_pass_at_1(r)} |")
    return head + "\n".join(lines) + "\n"


def _pass_at_1(r: dict) -> str:
    c = r.get("capability")
    if not c:
        return "–"
    lo, hi = c["ci"]
    return f"{c['pass_at_1']:.1%} ({c['passed']}/{c['n']}) [{lo:.0%}, {hi:.0%}]"


def judge_table(result: dict) -> str:
    """Substring matcher and LLM judge side by side, with their agreement ("" without a judge)."""
    if not result.get("judge"):
        return ""
    p = result["prompts"]
    sets = [s for s in ("harmful", "harmless", "overrefusal") if s in p]
    head = "| setting | " + " | ".join(
        f"{s} ({p[s]['source']}): substring | judge | agreement" for s in sets) + " |\n"
    head += "|---" * (1 + 3 * len(sets)) + "|\n"
    lines = []
    for r in [result["baseline"], *result["results"]]:
        cells = [r["label"]]
        for s in sets:
            if r.get(f"{s}_judge_n") is None:
                cells += ["–", "–", "–"]
                continue
            agree = r[f"{s}_judge_agreement"]
            cells += [_rate(r, s), _judge_rate(r, s),
                      "nan" if math.isnan(agree) else f"{agree:.0%}"
                      + (f" ({r[f'{s}_judge_unparsed']} unparsed)"
                         if r[f"{s}_judge_unparsed"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _judge_rate(r: dict, prefix: str) -> str:
    rate = r[f"{prefix}_judge_refusal_rate"]
    if rate is None or math.isnan(rate):
        return "–"
    ci = r[f"{prefix}_judge_ci"]
    return (f"{rate:.2f} ({r[f'{prefix}_judge_refused']}/{r[f'{prefix}_judge_n']}) "
            f"[{ci[0]:.2f}, {ci[1]:.2f}]")


def write_outputs(result: dict, json_path: str | Path | None = None,
                  markdown_path: str | Path | None = None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=_json_default))
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown_table(result) + "\n" + judge_table(result))


def _json_default(x):
    if isinstance(x, float | int):
        return x
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)
