"""`steer report`: the papers' comparison on one command (issue 5, item 4; issue 29).

Runs the evaluation grid (`report_grid`: every method at the papers' strength and at the pack's
calibrated one, ACE at 0 and 1, the INLP leading-k sweep k = 1…4 for the null and the flip, this
project's raw-origin variants beside them) and the geometry on one model (default: the embedded
one), then writes

- `report.md`: the command that made it, what saw the test split and when, each paper claim and
  project target with its figures, intervals and criterion (`claims`), the full results table
  (three-way rates, substring rates, KL, perplexity, HumanEval pass@1), the k sweep, the
  geometry (`markdown`);
- `report.html`: the same, self-contained (markdown-it-py; plots inlined as PNG data URIs);
- `results.json`: every number (prompt hashes and settings included; no prompt texts);
- `ksweep.png`, `geometry.png`, `methods.png` (`plots`).

Harmful prompts never appear as text: only their counts and hashes. Example completions are
shown for a harmless prompt only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from steering.catalog import BUILTIN_PRESETS, CALIBRATED
from steering.data.prompts import load_instructions, prompts_hash
from steering.evaluation.evaluate import EvalConfig, evaluate
from steering.evaluation.geometry import geometry, plot_geometry, strip_points
from steering.interventions.methods import METHODS, SteeringSpec
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack
from steering.reports.claims import (  # noqa: F401 (re-exported)
    KL_LIMIT,
    PPL_TOLERANCE,
    assess_claims,
    dim_in_inlp_span,
    inlp_zero_position,
)
from steering.reports.markdown import build_markdown, markdown_to_html  # noqa: F401
from steering.reports.plots import plot_ksweep, plot_methods

log = logging.getLogger(__name__)

VARIANTS = ("inlp_zero_positive", "inlp_negate_positive")  # this project's, beside the papers'


def report_eval_config(**overrides) -> EvalConfig:
    """The report's default sizes: JailbreakBench's 100 harmful test prompts, 30 harmless
    prompts from a harmless_val slice extraction never sees, the 30 over-refusal prompts; 64
    greedy tokens judged three ways; HumanEval's 164 problems per setting."""
    base = dict(harmful="harmful_test_jbb", n_harmful=100, harmless="harmless_val[3000:3030]",
                n_harmless=30, overrefusal="overrefusal", n_overrefusal=30,
                completion_tokens=24, n_general=4, general_tokens=80, max_new_tokens=64,
                batch_size=32, methods=tuple(m for m in METHODS if m != "none"),
                ks=(1, 2, 3, 4), humaneval=164)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EvalConfig(**base)


@dataclass
class ReportConfig:
    eval: EvalConfig = field(default_factory=report_eval_config)
    n_geometry: int = 24  # harmful and harmless evaluation prompts each, for the geometry
    command: str = "steer report"
    # HumanEval pass@1 measured through the server (`bench/capability.py --url`'s JSON) instead
    # of in this run; None: the run measures it itself (`eval.humaneval` problems)
    capability_file: str | None = None


def report_grid(pack: SteeringPack, ks: tuple[int, ...] = (1, 2, 3, 4)) -> list[SteeringSpec]:
    """Ablation at its paper strength; actadd at 1 and at the pack's calibrated strength; ACE at
    0 (its suppression claim), 1 and calibrated; the INLP null and flip over the k sweep (the
    pack's maximum and the presets' k included); this project's raw-origin variants at k = 2
    and the maximum; the flip at every INLP layer of the pack. The two-sided reflection is in
    the geometry only (it is not a product setting)."""
    grid = [SteeringSpec("ablate", 1.0)]
    for method, fixed in (("actadd", (1.0,)), ("ace", (0.0, 1.0))):
        strengths = list(fixed)
        cal = pack.calibrated_strength(method)
        if cal is not None and cal not in strengths:
            strengths.append(cal)
        grid += [SteeringSpec(method, float(s)) for s in strengths]
    k_max = pack.max_k()
    if k_max:
        preset_ks = {e["k"] for e in BUILTIN_PRESETS.values() if e.get("k")}
        k_values = sorted({k for k in (*ks, *preset_ks) if 1 <= k <= k_max} | {k_max})
        for method in ("inlp_null", "inlp_flip"):
            grid += [SteeringSpec(method, 1.0, k) for k in k_values]
        grid += [SteeringSpec(m, 1.0, k) for m in VARIANTS
                 for k in sorted({min(2, k_max), k_max})]
        if len(pack.inlp_layers) > 1:  # the flip at every INLP layer of the pack (more sites)
            k_all = min(pack.inlp[layer].count for layer in pack.inlp_layers)
            grid.append(SteeringSpec("inlp_flip", 1.0, k_all, tuple(pack.inlp_layers)))
    return grid


def preset_labels(pack: SteeringPack) -> dict[str, list[str]]:
    """spec label → names of the built-in presets that resolve to it with this pack."""
    from steering.evaluation.evaluate import spec_label

    out: dict[str, list[str]] = {}
    for name, entry in BUILTIN_PRESETS.items():
        strength = entry.get("strength", 1.0)
        if strength == CALIBRATED:
            strength = pack.calibrated_strength(entry["method"]) or 1.0
        k = entry.get("k")
        if entry["method"].startswith("inlp") and k is None:
            k = pack.max_k()
        label = spec_label(SteeringSpec(entry["method"], float(strength), k))
        out.setdefault(label, []).append(name)
    return out


def attach_capability(results: list[dict], run: dict, pack: SteeringPack, source: str) -> dict:
    """Put a server HumanEval run's pass@1 (`bench/capability.py --url`) on the report rows
    (the unsteered baseline included) with the same steering: each of the run's settings is
    resolved against `pack` (the server's defaults: INLP k = the pack's maximum) to the report's
    label. Conditional settings (`when`) have no report row; they are returned with the rest of
    the run's provenance."""
    from steering.evaluation.evaluate import spec_label
    from steering.interventions.methods import check_spec
    from steering.interventions.schema import SteeringObject

    by_label = {"none" if r["label"] == "unsteered" else r["label"]: r for r in results}
    matched, unmatched = {}, []
    for row in run["rows"]:
        steering = row.get("steering")
        record = {k: row[k] for k in ("benchmark", "passed", "n", "pass_at_1", "ci")}
        record["source"] = "server"
        if steering is not None and steering.get("when"):
            unmatched.append({"setting": row["setting"], **record,
                              "condition_applied": row.get("condition_applied")})
            continue
        if steering is None:
            label = "none"
        else:  # the server's defaults: k the pack's maximum; the label keeps layers as given
            spec = SteeringObject.model_validate(steering).to_spec(pack.name)
            label = spec_label(replace(spec, k=check_spec(spec, pack).k))
        if label in by_label:
            by_label[label]["capability"] = record
            matched[row["setting"]] = label
        else:
            unmatched.append({"setting": row["setting"], **record})
    if run.get("pack_created") != (pack.meta or {}).get("created"):
        log.warning("the HumanEval run %s used a pack created %s; this report's: %s", source,
                    run.get("pack_created"), (pack.meta or {}).get("created"))
    return {"file": source, "precision": run.get("precision"), "mode": run.get("mode"),
            "max_new_tokens": run.get("max_new_tokens"), "pack_created": run.get("pack_created"),
            "matched": matched, "other_settings": unmatched}


# ---- the whole report -------------------------------------------------------------------------------

def run_report(lm: LoadedModel, pack: SteeringPack, out_dir: str | Path,
               config: ReportConfig | None = None, started: float | None = None) -> dict:
    """Evaluate, measure the geometry, judge the claims and write the report files."""
    config = config or ReportConfig()
    started = started if started is not None else time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(lm, pack, config.eval, grid=report_grid(pack, config.eval.ks))
    if config.eval.three_way:
        from steering.evaluation.three_way import default_params

        result["three_way_judge"] = default_params()
    # Every number on disk before the slower parts, so a failure later loses no measurement.
    (out / "results.json").write_text(json.dumps({"evaluation": result}, indent=2, default=str))
    presets = preset_labels(pack)
    for r in result["results"]:
        r["presets"] = presets.get(r["label"], [])
    if config.capability_file:
        result["capability_source"] = attach_capability(
            [result["baseline"], *result["results"]],
            json.loads(Path(config.capability_file).read_text()), pack, config.capability_file)
    meta = pack.meta or {}
    result["pack"] = {**(result["pack"] or {}), "dim_in_inlp_span": dim_in_inlp_span(pack),
                      "inlp_zero_position": inlp_zero_position(pack),
                      "selection_full": meta.get("selection"),
                      "calibration": meta.get("calibration"), "data": meta.get("data"),
                      "extract_seconds": meta.get("extract_seconds"),
                      "extract_version": meta.get("extract_version"),
                      "config": meta.get("config")}
    harmful = load_instructions(config.eval.harmful)[: config.n_geometry]
    harmless = load_instructions(config.eval.harmless)[: config.n_geometry]
    geo = geometry(lm, pack, harmful, harmless,
                   batch_size=min(32, max(config.eval.batch_size, config.n_geometry)))
    geo["prompts"] = {"harmful_sha256": prompts_hash(harmful),
                      "harmless_sha256": prompts_hash(harmless)}
    ref_path = out / "inlp_reference.json"
    if ref_path.is_file():
        result["inlp_reference"] = json.loads(ref_path.read_text())
    claims = assess_claims(result, geo, presets)

    pngs: dict[str, bytes] = {"methods.png": plot_methods(result),
                              "geometry.png": plot_geometry(geo)}
    ksweep = plot_ksweep(result)
    if ksweep:
        pngs["ksweep.png"] = ksweep
    for name, data in pngs.items():
        (out / name).write_bytes(data)
    example = load_instructions(config.eval.harmless)[0]
    wall = time.perf_counter() - started
    summary = {"command": config.command, "wall_seconds": round(wall, 1),
               "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "example_prompt": example, "claims": claims, "evaluation": result,
               "geometry": strip_points(geo)}
    _write_pages(out, summary, geo, pngs)
    return summary


def _write_pages(out: Path, summary: dict, geo: dict, pngs: dict[str, bytes]) -> None:
    """report.md, report.html and results.json from a run's summary (and its plots)."""
    images = {name.removesuffix(".png"): name for name in pngs}
    notes_path = out / "notes.md"
    notes = notes_path.read_text() if notes_path.is_file() else None
    md = build_markdown(summary["evaluation"], geo, summary["claims"], images,
                        summary["command"], summary["wall_seconds"],
                        summary.get("example_prompt"), summary.get("generated"),
                        summary.get("loadavg_end"), notes)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(markdown_to_html(md, pngs, "Steering methods compared"))
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))


def render_again(out_dir: str | Path, capability_file: str | None = None,
                 pack: SteeringPack | None = None) -> dict:
    """Write the pages again from a finished run's `results.json` and plots, without measuring:
    the claims are judged again (the same rules on the same numbers) and `notes.md` and
    `inlp_reference.json` in the folder are read again. `capability_file`: a server HumanEval
    run attached again (`attach_capability`, replacing the column) with `pack`, which must be
    the pack the run was made with (its creation time is checked)."""
    out = Path(out_dir)
    summary = json.loads((out / "results.json").read_text())
    if "claims" not in summary:
        raise ValueError(f"{out / 'results.json'} is not a finished report run")
    result, geo = summary["evaluation"], summary["geometry"]
    if capability_file is not None:
        if pack is None:
            raise ValueError("attaching a HumanEval run needs the report's pack")
        made = (result.get("pack") or {}).get("created")
        if made != (pack.meta or {}).get("created"):
            raise ValueError(f"the pack given was created {(pack.meta or {}).get('created')}; "
                             f"the report in {out} was made with one created {made}")
        rows = [result["baseline"], *result["results"]]
        for r in rows:
            r.pop("capability", None)
        result["capability_source"] = attach_capability(
            rows, json.loads(Path(capability_file).read_text()), pack, capability_file)
    ref_path = out / "inlp_reference.json"
    if ref_path.is_file():
        result["inlp_reference"] = json.loads(ref_path.read_text())
    presets: dict[str, list[str]] = {r["label"]: r["presets"] for r in result["results"]
                                     if r.get("presets")}
    summary["claims"] = assess_claims(result, geo, presets)
    summary.setdefault("generated", datetime.fromtimestamp(
        (out / "results.json").stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC"))
    summary.setdefault("example_prompt",
                       load_instructions(result["prompts"]["harmless"]["source"])[0])
    pngs = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
    _write_pages(out, summary, geo, pngs)
    return summary
