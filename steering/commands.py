"""What the library's `steer` verbs do (extract, generate, orthogonalize, eval, report).

The parser is `server.cli` (one parser for every verb, built without importing torch); each
handler here imports what it needs when it runs.
"""

from __future__ import annotations

import json
import sys

from steering.interventions.catalog import METHODS


def _eval_overrides(args) -> dict:
    names = ("harmful", "harmless", "n_harmful", "n_harmless",
             "completion_tokens", "n_general", "general_tokens", "max_new_tokens",
             "batch_size", "cache_dir", "judge_url", "judge_model", "judge_api_key")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_extract(args) -> int:
    from steering.data.prompts import load_instructions
    from steering.models.loading import load_model
    from steering.packs.extract import ExtractConfig, extract_pack
    from steering.packs.store import default_pack_path

    lm = load_model(args.model, args.device, args.dtype,
                    precision=args.precision)
    pack = extract_pack(
        lm, load_instructions(args.harmful), load_instructions(args.harmless),
        load_instructions(args.harmful_val), load_instructions(args.harmless_val),
        ExtractConfig.preset(args.mode), name=args.name)
    out = pack.save(args.out or default_pack_path(lm, args.name))
    chosen = pack.meta["selection"]["chosen"]
    print(json.dumps({"pack": str(out), "layer": pack.layer, "position": pack.position,
                      "inlp_directions": pack.max_k(), "selection": chosen,
                      "seconds": pack.meta["extract_seconds"]}))
    return 0


def cmd_generate(args) -> int:
    from steering.interventions.generate import generate
    from steering.interventions.methods import SteeringSpec, build_row
    from steering.models.loading import load_model
    from steering.packs.store import ensure_pack

    lm = load_model(args.model, args.device, args.dtype,
                    precision=args.precision)
    spec = SteeringSpec(args.method, args.strength, args.k, args.layers)
    pack = ensure_pack(lm, args.pack) if args.method != "none" else None
    row = build_row(spec, pack)
    [text] = generate(lm, [args.prompt], [row], max_new_tokens=args.max_tokens,
                      temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def cmd_orthogonalize(args) -> int:
    from steering.interventions.orthogonalize import export_orthogonalized
    from steering.models.loading import load_model
    from steering.packs.store import ensure_pack

    lm = load_model(args.model, args.device, "float32" if args.dtype == "auto" else args.dtype)
    pack = ensure_pack(lm, args.pack)
    out = export_orthogonalized(lm, pack, args.out)
    print(json.dumps({"model": str(out), "layer": pack.layer}))
    return 0


def cmd_eval(args) -> int:
    from steering.evaluation.evaluate import (
        EvalConfig,
        evaluate,
        judge_table,
        markdown_table,
        write_outputs,
    )
    from steering.models.loading import load_model
    from steering.packs.store import ensure_pack

    config = EvalConfig(**_eval_overrides(args))
    if args.methods:
        config.methods = args.methods
    if args.strengths:
        config.strengths = {m: args.strengths for m in METHODS if m != "none"}
    if args.ks:
        config.ks = args.ks
    lm = load_model(args.model, args.device, args.dtype,
                    precision=args.precision)
    needs_pack = any(m != "none" for m in config.methods)
    pack = ensure_pack(lm, args.pack) if needs_pack else None
    result = evaluate(lm, pack, config)
    write_outputs(result, args.json, args.markdown)
    print(markdown_table(result))
    if result.get("judge"):
        print(judge_table(result))
    return 0


def cmd_report(args) -> int:
    import shlex
    import time

    from steering.evaluation.report import (
        ReportConfig,
        render_again,
        report_eval_config,
        run_report,
    )
    from steering.models.loading import load_model
    from steering.packs.store import ensure_pack

    if args.render_only:
        summary = render_again(args.out)
        _print_claims(summary)
        return 0
    started = time.perf_counter()
    overrides = _eval_overrides(args)
    if args.ks:
        overrides["ks"] = args.ks
    config = ReportConfig(eval=report_eval_config(**overrides))
    if args.n_geometry:
        config.n_geometry = args.n_geometry
    config.command = shlex.join(["steer", *sys.argv[1:]]) if sys.argv[1:2] == ["report"] \
        else f"steer report --out {shlex.quote(args.out)}"
    # The papers' claims are judged at full precision (the precision the pack was extracted
    # and calibrated at); `auto` would pick int8 on a CPU. `steer precision-gate` compares.
    precision = None if args.precision == "auto" else args.precision
    lm = load_model(args.model, args.device, args.dtype, precision=precision)
    pack = ensure_pack(lm, args.pack)
    summary = run_report(lm, pack, args.out, config, started=started)
    _print_claims(summary)
    print(json.dumps({"out": args.out, "wall_seconds": summary["wall_seconds"]}))
    return 0


def _print_claims(summary: dict) -> None:
    for claim in summary["claims"]:
        verdict = {True: "yes", False: "no", None: "n/a"}[claim["reproduced"]]
        print(f"[{verdict:>3}] {claim['claim']} ({claim['measured']})")
