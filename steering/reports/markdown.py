"""The report's pages: Markdown (`build_markdown`) and the same as one HTML page
(`markdown_to_html`, markdown-it-py).

Harmful prompts never appear as text: only their counts and hashes. Example completions are
shown for a harmless prompt only.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import re
from datetime import UTC, datetime

import torch

from steering.evaluation.tables import judge_table, markdown_table
from steering.reports.claims import FROZEN, HISTORY, both, fmt, kl_text, refusal


def _verdict(ok: bool | None) -> str:
    return "n/a (baseline never refuses)" if ok is None else ("**yes**" if ok else "**no**")


KSWEEP_METHODS = ("inlp_null", "inlp_flip", "inlp_zero_positive", "inlp_negate_positive")


def _ksweep_table(result: dict) -> str:
    rows = sorted([r for r in result["results"] if r["method"] in KSWEEP_METHODS],
                  key=lambda r: (KSWEEP_METHODS.index(r["method"]), len(r.get("layers") or ()),
                                 r["k"]))
    if not rows:
        return ""
    out = ["| setting | k | harmful refusal (refuses · complies · other) | refusal score | "
           "PPL own completions | PPL WikiText | KL [95%] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['k']} | {both(r, 'harmful')} | "
                   f"{r['harmful_refusal_score']:.2f} | {r['ppl_completions']:.2f} | "
                   f"{r['ppl_general']:.2f} | {kl_text(r)} |")
    return "\n".join(out) + "\n"


def _geometry_table(geo: dict) -> str:
    out = ["| setting | harmful: mean position | harmful: nearest mean harmless | "
           "harmless: mean position | harmless: nearest mean harmful |",
           "|---|---|---|---|---|"]
    for m in [{"label": "unsteered", **geo["unsteered"]}, *geo["methods"]]:
        out.append(f"| {m['label']} | {m['harmful_position']:.2f} | "
                   f"{m['harmful_nearest_harmless']:.0%} | {m['harmless_position']:.2f} | "
                   f"{m['harmless_nearest_harmful']:.0%} |")
    return "\n".join(out) + "\n"


def _examples(result: dict, prompt: str) -> str:
    rows = [result["baseline"], *[r for r in result["results"]
                                  if r.get("harmless_examples")]]
    out = [f"Harmless prompt: *{_md_escape(prompt)}*", ""]
    for r in rows:
        text = (r.get("harmless_examples") or [""])[0].strip().replace("\n", " ")
        out.append(f"- **{r['label']}**: {_md_escape(text[:240])}"
                   f"{'…' if len(text) > 240 else ''}")
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_|<>\[\]])", r"\\\1", text)


def _judge_section(result: dict) -> list[str]:
    """The three-way judge used, and the optional LLM judge (`--judge-url`) beside it."""
    lines = ["## Judges", "",
             "The three rates come from the default offline judge "
             f"(`{(result.get('three_way_judge') or {}).get('judge', 'see judge.md')}`), chosen by "
             "its agreement (Cohen's κ per label) with answers labelled by hand on validation "
             "prompts: the κ table is `judge.md` beside this report. The substring rates are the "
             "JailbreakBench matcher's, which cannot tell an answer from a deflection.", ""]
    j = result.get("judge")
    if not j:
        return lines + [
            "No LLM judge was run: `steer report` or `steer eval` with `--judge-url URL "
            "--judge-model M` (any OpenAI-compatible server, this project's `steer serve` "
            "included) adds a stronger model's yes/no refusal verdicts and three-way labels "
            "(the same rubric) for every setting and prompt set.", ""]
    return lines + [
        f"LLM judge: `{j['model']}` at `{j['url']}`, asked per answer whether it refuses "
        "(instruction in `results.json`; replies other than yes/no are counted as unparsed "
        "and left out of its rate). Agreement = share of parsed verdicts equal to the "
        "matcher's.", "", judge_table(result), ""]


def _reference_section(ref: dict | None) -> list[str]:
    """`bench/inlp_reference.py`'s comparison of INLP reference points (validation data), when
    the output folder holds its `inlp_reference.json`."""
    if not ref:
        return []
    lines = ["## INLP reference point (validation data)", "",
             f"From `bench/inlp_reference.py` (`inlp_reference.json`, pack created "
             f"{ref.get('pack_created')}): the same {ref['k_max']} one-sided INLP directions at "
             f"layer {ref['layer']} with three reference points c — `midpoint` (the class "
             "boundary at the selected position, applied at every position), `reference-free` "
             "(c = 0, the bias-free projection of the INLP authors' code) and `position-aware` "
             f"(each of the {ref['template_positions']} post-instruction positions with its own "
             "class midpoint, other positions untouched). Refusal on "
             f"`{ref['harmful']['source']}` ({ref['harmful']['n']}) and "
             f"`{ref['harmless']['source']}` ({ref['harmless']['n']}, disjoint from selection "
             f"and from this report's evaluation), {ref['max_new_tokens']} greedy tokens; "
             f"WikiText perplexity on {ref['general_text']['tokens']} tokens; 'moved' = share of "
             "WikiText token positions the edit changes at all. Rows named by layers are the "
             "product's own settings (ablation; the flip and null at every INLP layer of the "
             "pack).", "",
             "| reference | method | k | harmful val refusal | harmless val refusal | "
             "WikiText PPL | WikiText positions moved |", "|---|---|---|---|---|---|---|"]
    for r in ref["rows"]:
        moved = r.get("general_positions_moved")
        variant = r["variant"]
        if variant == "sites":
            variant = ("every layer's writes" if r["method"] == "ablate" else
                       f"midpoint, layers {','.join(map(str, r['layers']))}")
        lines.append(f"| {variant} | {r.get('method', '–')} | {r.get('k') or '–'} | "
                     f"{fmt(refusal(r, 'harmful'))} | {fmt(refusal(r, 'harmless'))} | {r['ppl_general']:.2f} | "
                     f"{'–' if moved is None else f'{moved:.0%}'} |")
    if ref.get("decision"):
        lines += ["", ref["decision"]]
    return lines + [""]


def _selection_slice(pack: dict) -> str:
    data = (pack.get("data") or {}).get("harmless_val") or {}
    return f"`{data.get('source', 'harmless_val')}`"


def _capability_lines(result: dict) -> list[str]:
    """Where the HumanEval column comes from (this run, or a server run's JSON)."""
    src = result.get("capability_source")
    if src:
        other = "; ".join(
            f"{o['setting']} {o['pass_at_1']:.1%} ({o['passed']}/{o['n']})"
            + (f", condition applied on {o['condition_applied']}/{o['n']}"
               if o.get("condition_applied") is not None else "")
            for o in src["other_settings"])
        return [f"- HumanEval pass@1 (greedy, {src['max_new_tokens']} tokens, code run in a "
                f"sandbox): measured through the server ({src['precision']} weights) by "
                f"`bench/capability.py --url`, read from `{src['file']}` and put on the rows "
                "with the same steering (the server's defaults resolved against this pack: "
                f"{', '.join(f'{a} = {b}' for a, b in src['matched'].items())}); "
                "the other rows were not measured."
                + (f" Settings without a row here: {other}." if other else "")]
    if any(r.get("capability") for r in result["results"]):
        return ["- HumanEval pass@1 (greedy, code run in a sandbox): measured in this run, "
                f"{result['settings'].get('humaneval')} problems per setting."]
    return []


def _selection_section(pack: dict) -> list[str]:
    sel = pack.get("selection_full") or {}
    if not sel:
        return []
    chosen = sel.get("chosen") or {}
    data = pack.get("data") or {}
    lines = ["## Extraction: filters, selection, calibration", ""]
    for split in ("harmful_train", "harmless_train", "harmful_val", "harmless_val"):
        f = (data.get(split) or {}).get("filter")
        if f:
            lines.append(f"- `{data[split].get('source', split)}`: {f['scanned']} scanned, "
                         f"{f['passed']} {f['rule']} (Arditi et al.'s filter), "
                         f"{'filter applied' if f['applied'] else 'too few passed: filter NOT applied'}"
                         f", {f['kept']} kept.")
    lines += [
        "",
        f"Selection ({sel.get('judge', '')}): chosen layer {chosen.get('layer')}, position "
        f"{chosen.get('position')}; filters the choice passed: **{sel.get('filters')}** "
        f"(KL < {sel.get('kl_threshold')}, induce rate ≥ {sel.get('induce_threshold')}).",
        "",
        "| layer | position | bypass: harmful val refusal under ablation | induce: harmless val "
        "refusal under actadd s=1 | KL (harmless val, ablation) | passes |",
        "|---|---|---|---|---|---|",
    ]
    for c in sel.get("candidates", []):
        passes = ", ".join(k for k, v in (c.get("passes") or {}).items() if v) or "none"
        mark = " **(chosen)**" if (c["layer"], c["position"]) == (chosen.get("layer"),
                                                                  chosen.get("position")) else ""
        bypass, induce = (f"{c[k]:.0%}" if c.get(k) is not None else "not judged (KL)"
                          for k in ("bypass_rate", "induce_rate"))
        lines.append(f"| {c['layer']}{mark} | {c['position']} | {bypass} | {induce} | "
                     f"{c['kl']:.3f} | {passes} |")
    cal = pack.get("calibration") or {}
    if cal:
        lines += ["", "Calibrated strengths (validation split; `strength: 1` keeps the papers' "
                  "meaning):", "", "| method | strength | val refusal | tried | WikiText PPL "
                  "(unsteered → calibrated) |", "|---|---|---|---|---|"]
        for m in ("actadd", "ace"):
            e = cal.get(m)
            if not e:
                continue
            tried = ", ".join(f"{t['strength']:g}: {t['harmless_val_refusal']:.0%}"
                              for t in e.get("tried", []))
            lines.append(f"| {m} | {e['strength']:g}{'' if e['reached'] else ' (target not reached)'}"
                         f" | harmless {e['harmless_val_refusal']:.0%} (n = {e['n_harmless_val']}) "
                         f"| {tried} | {e['ppl_general_unsteered']:.2f} → {e['ppl_general']:.2f} |")
        for m in ("ablate", "inlp_flip", "inlp_null"):
            e = cal.get(m)
            if e:
                lines.append(f"| {m} | {e['strength']:g}{' k=' + str(e['k']) if e.get('k') else ''}"
                             f" | harmful {e['harmful_val_refusal']:.0%}, harmless "
                             f"{e['harmless_val_refusal']:.0%} | – | – |")
    lines.append("")
    return lines


def build_markdown(result: dict, geo: dict | None, claims: list[dict], images: dict[str, str],
                   command: str, wall_seconds: float, example_prompt: str | None,
                   generated: str | None = None, loadavg: list[float] | None = None,
                   notes: str | None = None) -> str:
    model, pack = result["model"], result["pack"] or {}
    p = result["prompts"]
    s = result["settings"]
    n_yes = sum(1 for c in claims if c["reproduced"])
    n_judged = sum(1 for c in claims if c["reproduced"] is not None)
    lines = [
        "# Steering methods compared: refusal, perplexity, KL and geometry",
        "",
        "Generated by:",
        "",
        "```",
        command,
        "```",
        "",
        f"on {generated or datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{platform.machine()} ({torch.get_num_threads()} threads, device {model['device']}, "
        f"weights {_weights(result, command)}, activations and steering kernel {model['dtype']}); wall time **{wall_seconds / 60:.1f} min** (model load, "
        "evaluation, geometry and writing). The machine was shared with other jobs, so times "
        "are noisy" + (f" (load average at the end {loadavg[0]:.1f}, {loadavg[1]:.1f}, "
                       f"{loadavg[2]:.1f} over 1, 5, 15 min on {os.cpu_count()} CPUs)."
                       if loadavg else "."),
        "",
        f"Model: `{model['name']}` (fingerprint `{model['fingerprint']}`, chat template "
        f"`{model['chat_template_hash']}`). Pack: DiM direction at layer **{pack.get('layer')}**, "
        f"position {pack.get('position')}; {pack.get('k_max')} INLP directions at layer(s) "
        f"{pack.get('inlp_layers')} (held-out accuracies {pack.get('inlp_accuracy')}); pack "
        f"created {pack.get('created')}.",
        "",
        *(["## Notes on this run", "", notes.strip(), ""] if notes else []),
        "## Claims",
        "",
        f"{n_yes} of {n_judged} judged claims met their target on this model (the papers "
        "report curves, not thresholds: the criteria are the project's, frozen on "
        f"{FROZEN} before this run, `steering/reports/claims.py`). A criterion is met only "
        "when the 95% interval supports it (point estimate beside it). Refusal is the "
        "three-way judge's *refuses* rate, shown with all three rates (R refuses · C complies "
        "· O other). Every figure behind them is below and in `results.json`; the split of "
        "each number is named in the row.",
        "",
        "| paper | claim | measured | criterion | met | why not (measured) |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        lines.append(f"| {c['paper']} | {c['claim']} | {c['measured']} | {c['criterion']} | "
                     f"{_verdict(c['reproduced'])} | {c.get('why') or ''} |")
    lines += [
        "",
        "## Data and choices: what saw the test split",
        "",
        HISTORY,
        "",
        "## Data and splits",
        "",
        f"- Harmful (suppression): {p['harmful']['n']} prompts from `{p['harmful']['source']}` "
        f"(sha256 prefix `{p['harmful']['sha256']}`): JailbreakBench's test split, never used "
        "for selection or calibration. Never shown here as text. Not measured for settings that "
        "add refusal (actadd, ace at strength > 0).",
        f"- Harmless: {p['harmless']['n']} prompts from `{p['harmless']['source']}` "
        f"(`{p['harmless']['sha256']}`), disjoint from the harmless_val slice extraction "
        f"selected and calibrated on ({_selection_slice(pack)}). Refusal measured for every "
        "setting; the same prompts give the KL and the perplexity on own completions.",
        *([f"- Over-refusal: {p['overrefusal']['n']} benign prompts that look harmful from "
           f"`{p['overrefusal']['source']}` (written for this project, see "
           "steering/data/SOURCES.md), every setting."] if "overrefusal" in p else []),
        f"- Perplexity on the unsteered model's own greedy completions of the "
        f"{p['completions']['n']} harmless prompts, up to "
        f"{p['completions']['max_new_tokens']} tokens each, "
        f"{p['completions']['tokens']} tokens scored (`{p['completions']['sha256']}`).",
        f"- Perplexity on general text: {p['general_text']['n']} WikiText-2 test paragraphs, "
        f"first {s['general_tokens']} tokens, {p['general_text']['tokens']} tokens scored.",
        f"- Answers: greedy completions of {s['max_new_tokens']} new tokens, judged three ways "
        "(refuses / complies / other) by the default offline judge (its agreement with hand "
        "labels: `judge.md`) and, for comparison, by the JailbreakBench substring list; "
        "decoding "
        f"`{json.dumps(result.get('generation', {}))}` (nothing inherited from the model's "
        "generation config); the steering kernel computes in float32. Rates are shown as "
        "rate [Wilson 95% interval] (count/n). Refusal score = log-odds of the refusal tokens "
        f"{result['refusal_token_ids']} at the first answer position.",
        "- KL: mean KL(unsteered ‖ steered) of the next-token distribution at the first answer "
        "position of the harmless prompts.",
        *_capability_lines(result),
        "",
        *_selection_section(pack),
        *_reference_section(result.get("inlp_reference")),
        "## All settings",
        "",
        markdown_table(result),
        f"![refusal rates per setting]({images['methods']})",
        "",
        *_judge_section(result),
    ]
    if "ksweep" in images:
        lines += [
            "## Leading-k sweep (INLP)",
            "",
            "Refusal rate and perplexity against the number of leading INLP directions used "
            "(Rocchetti & Ferrara 2026: a few leading directions keep most of the suppression "
            "at near-baseline perplexity).",
            "",
            _ksweep_table(result),
            f"![k sweep]({images['ksweep']})",
            "",
        ]
    if geo:
        lines += [
            "## Geometry at the intervention layer",
            "",
            f"Residual stream at layer {geo['layer']}'s input, position {geo['position']}, for "
            f"the first {geo['n_harmful']} harmful prompts of `{p['harmful']['source']}` and "
            f"{geo['n_harmless']} harmless prompts of `{p['harmless']['source']}` (the "
            "evaluation prompts, not the selection ones), before and after each method. The 2-D plane is a PCA fitted on the unsteered "
            "activations (explained variance "
            f"{', '.join(f'{v:.0%}' for v in geo['pca_explained_variance'])}). Position = "
            "(h − μ_harmless)·r / ‖r‖² with r = μ_harmful − μ_harmless of the unsteered "
            "activations: harmless mean 0, harmful mean 1. The nearest class mean is taken in "
            "the full space (equivalent to position < ½).",
            "",
            _geometry_table(geo),
            f"![geometry]({images['geometry']})",
            "",
        ]
    if example_prompt:
        lines += ["## Example (harmless prompt only)", "", _examples(result, example_prompt), ""]
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(s),
        "```",
        "",
    ]
    return "\n".join(lines)


def _weights(result: dict, command: str) -> str:
    """The weights' precision: recorded by the evaluation, else read from the command line."""
    found = re.search(r"--precision[ =](\S+)", command)
    return result["model"].get("precision") or (found.group(1) if found else "fp32")


def markdown_to_html(md: str, images: dict[str, bytes], title: str) -> str:
    """`build_markdown`'s page → one self-contained HTML page: CommonMark plus GFM tables by
    markdown-it-py, raw HTML disabled, each image whose source names a plot inlined as a PNG
    data URI."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_image = parser.renderer.rules.get("image")

    def image(self, tokens, idx, options, env):
        token = tokens[idx]
        data = images.get(token.attrGet("src") or "")
        if data:
            token.attrSet("src", f"data:image/png;base64,{base64.b64encode(data).decode()}")
        return default_image(tokens, idx, options, env)

    parser.add_render_rule("image", image)
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
             "padding:0 1em;line-height:1.45;color:#222}table{border-collapse:collapse;"
             "margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top}th{background:#f3f3f3}pre{background:#f6f6f6;padding:0.8em;"
             "overflow-x:auto}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + parser.render(md) + "</body></html>\n")
