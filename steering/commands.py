"""What the library's `steer` verbs do (extract, generate, orthogonalize, eval, report, export,
import).

The parser is `server.cli` (one parser for every verb, built without importing torch); each
handler here imports what it needs when it runs.
"""

from __future__ import annotations

import json
import sys

from steering.catalog import METHODS


def _eval_overrides(args) -> dict:
    names = ("harmful", "harmless", "n_harmful", "n_harmless",
             "completion_tokens", "n_general", "general_tokens", "max_new_tokens",
             "batch_size", "cache_dir", "judge_url", "judge_model", "judge_api_key",
             "humaneval", "humaneval_tokens")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_extract(args) -> int:
    from steering.data.prompts import load_instructions
    from steering.extraction.extract import ExtractConfig, extract_pack
    from steering.extraction.store import default_pack_path
    from steering.models.loading import load_model
    from steering.packs.identity import hook_layout

    if getattr(args, "positive", None) or getattr(args, "negative", None):
        return _extract_concept(args)
    lm = load_model(args.model, args.device, args.dtype,
                    precision=args.precision)
    pack = extract_pack(
        lm, load_instructions(args.harmful), load_instructions(args.harmless),
        load_instructions(args.harmful_val), load_instructions(args.harmless_val),
        ExtractConfig.preset(args.mode), name=args.name)
    pack.meta.setdefault("hook", hook_layout(lm.model))
    out = pack.save(args.out or default_pack_path(lm, args.name))
    chosen = pack.meta["selection"]["chosen"]
    print(json.dumps({"pack": str(out), "layer": pack.layer, "position": pack.position,
                      "inlp_directions": pack.max_k(), "selection": chosen,
                      "seconds": pack.meta["extract_seconds"]}))
    return 0


def _extract_concept(args) -> int:
    from steering.data.contrastive import load_examples, shipped_behaviour
    from steering.extraction.concept import ConceptConfig, extract_concept, summary
    from steering.extraction.store import default_pack_path
    from steering.models.loading import load_model

    if not (args.positive and args.negative):
        raise ValueError("--positive and --negative go together")
    if args.name == "refusal":
        raise ValueError("name the concept with --name (refusal is the refusal pack's name)")
    positive, negative = load_examples(args.positive), load_examples(args.negative)
    lm = load_model(args.model, args.device, args.dtype, precision=args.precision)
    config = ConceptConfig(val_fraction=args.val_fraction, positions=args.positions,
                           max_layer_fraction=args.max_layer_fraction)
    pack = extract_concept(lm, positive, negative, args.name, config,
                           sources=(str(args.positive), str(args.negative)),
                           behaviour=shipped_behaviour(args.positive, args.negative))
    out = pack.save(args.out or default_pack_path(lm, args.name))
    print(summary(pack), file=sys.stderr)
    print(json.dumps({"pack": str(out), "concept": pack.concept, "layer": pack.layer,
                      "position": pack.position, "methods": pack.methods,
                      "inlp_directions": pack.max_k(),
                      "selection": pack.meta["selection"]["chosen"],
                      "seconds": pack.meta["extract_seconds"]}))
    return 0


def _pack_for(args, lm=None):
    """--pack as a file, else as a name of the model's cached packs (loads the model if needed)."""
    from pathlib import Path

    from steering.extraction.store import default_pack_path
    from steering.packs.format import load_pack, pack_paths

    given = args.pack
    if given and pack_paths(Path(given))[0].is_file():
        return load_pack(given, model=lm.model if lm is not None else None)
    if lm is None:
        from steering.models.loading import load_model

        lm = load_model(args.model, args.device, args.dtype, precision=args.precision)
    return load_pack(default_pack_path(lm, given or "refusal"), model=lm.model)


def cmd_export(args) -> int:
    if args.format == "llamacpp":
        from steering.interop.llamacpp import export_control_vector

        pack = _pack_for(args)
        strength = args.strength if args.strength is not None else (
            pack.calibrated_strength("actadd") or 1.0)
        layers = list(args.layers) if args.layers else None
        out = export_control_vector(pack, args.out, layers, strength)
        print(json.dumps({"gguf": str(out), "pack": pack.name, "concept": pack.concept,
                          "layers": layers or [pack.layer], "strength": strength,
                          "llamacpp": f"--control-vector {out}"}))
        return 0
    from steering.interop.peft_lora import export_ablation_lora
    from steering.models.loading import load_model

    lm = load_model(args.model, args.device, "float32" if args.dtype == "auto" else args.dtype)
    pack = _pack_for(args, lm)
    out = export_ablation_lora(lm, pack, args.out)
    print(json.dumps({"adapter": str(out), "pack": pack.name, "concept": pack.concept,
                      "method": "ablate", "layer": pack.layer}))
    return 0


def cmd_import(args) -> int:
    from steering.extraction.store import default_pack_path
    from steering.interop.llamacpp import import_control_vector
    from steering.models.loading import load_model

    lm = load_model(args.model, args.device, args.dtype, precision=args.precision)
    pack = import_control_vector(args.file, lm.model, args.name, args.scale)
    out = pack.save(args.out or default_pack_path(lm, args.name))
    print(json.dumps({"pack": str(out), "methods": pack.methods,
                      "layers": pack.meta["concept"]["layers"],
                      "dropped_llamacpp_layers": pack.meta["concept"]["dropped_llamacpp_layers"],
                      "serve": "upload it (POST /v1/steering/packs) or put it in STEER_PACKS_DIR; "
                               "apply with steering.layers = those layers"}))
    return 0


def cmd_generate(args) -> int:
    from steering.extraction.store import ensure_pack
    from steering.interventions.generate import generate
    from steering.interventions.methods import SteeringSpec, build_row
    from steering.models.loading import load_model

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
    from steering.extraction.store import ensure_pack
    from steering.interventions.orthogonalize import export_orthogonalized
    from steering.models.loading import load_model

    gguf_base = getattr(args, "gguf_base", None) or (
        args.model if str(args.model).endswith(".gguf") else None)
    if getattr(args, "gguf", None) and not gguf_base:
        raise ValueError("--gguf needs the model's own GGUF to edit: pass --gguf-base FILE "
                         "(llama.cpp's convert_hf_to_gguf.py makes one from a model folder)")
    lm = load_model(args.model, args.device, "float32" if args.dtype == "auto" else args.dtype)
    pack = ensure_pack(lm, args.pack)
    direction = pack.dim().clone()
    out = export_orthogonalized(lm, pack, args.out)
    report = {"model": str(out), "layer": pack.layer}
    if getattr(args, "gguf", None):
        from steering.interop.gguf_model import orthogonalize_gguf

        report["gguf"] = str(orthogonalize_gguf(gguf_base, direction, args.gguf))
    print(json.dumps(report))
    return 0


def cmd_eval(args) -> int:
    from steering.evaluation.evaluate import EvalConfig, evaluate
    from steering.evaluation.tables import judge_table, markdown_table, write_outputs
    from steering.extraction.store import ensure_pack
    from steering.models.loading import load_model

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

    from steering.extraction.store import ensure_pack
    from steering.models.loading import load_model
    from steering.reports.report import (
        ReportConfig,
        render_again,
        report_eval_config,
        run_report,
    )

    if args.render_only:
        pack = None
        if args.capability:  # the pack resolves the run's settings to the report's labels
            from steering.extraction.store import pack_cached

            lm = load_model(args.model, args.device, args.dtype)
            if not pack_cached(lm, args.pack):
                raise SystemExit("steer report --render-only --capability: no pack to resolve "
                                 "the run's settings with (give the report's --pack)")
            pack = ensure_pack(lm, args.pack)
        summary = render_again(args.out, args.capability, pack)
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
    if args.capability:
        config.capability_file = args.capability
        config.eval.humaneval = 0
    summary = run_report(lm, pack, args.out, config, started=started)
    _print_claims(summary)
    print(json.dumps({"out": args.out, "wall_seconds": summary["wall_seconds"]}))
    return 0


def _print_claims(summary: dict) -> None:
    for claim in summary["claims"]:
        verdict = {True: "yes", False: "no", None: "n/a"}[claim["reproduced"]]
        print(f"[{verdict:>3}] {claim['claim']} ({claim['measured']})")
