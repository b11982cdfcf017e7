"""The `steer` command line: library commands (extract, generate, orthogonalize).

`server.cli` adds the serving commands to the same parser; this module never imports the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .methods import METHODS


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="'embedded' (default), a model folder, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")


def _steering_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="none", choices=METHODS)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--k", type=int, default=None, help="leading INLP directions to use")
    p.add_argument("--layers", type=lambda s: tuple(int(x) for x in s.split(",")),
                   default=None, help="comma-separated layer indices")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="extract DiM / ACE / INLP directions into a pack")
    _model_args(p)
    p.add_argument("--harmful", default="harmful_train", help="split name or JSON file")
    p.add_argument("--harmless", default="harmless_train", help="split name or JSON file")
    p.add_argument("--harmful-val", default="harmful_val")
    p.add_argument("--harmless-val", default="harmless_val")
    p.add_argument("--mode", default="fast", choices=("fast", "full"))
    p.add_argument("--name", default="refusal")
    p.add_argument("--out", default=None, help="pack path (default: the model's cached pack)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("generate", help="one steered completion")
    _model_args(p)
    _steering_args(p)
    p.add_argument("--pack", default=None, help="pack path (default: the model's cached pack)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("orthogonalize", help="export a model with the DiM direction ablated "
                                             "in its weights")
    _model_args(p)
    p.add_argument("--pack", default=None)
    p.add_argument("--out", required=True, help="output model folder")
    p.set_defaults(func=cmd_orthogonalize)

    p = sub.add_parser("eval", help="refusal, perplexity and KL over a grid of steering "
                                    "settings (JSON + Markdown table)")
    _model_args(p)
    _eval_args(p)
    p.add_argument("--methods", type=_csv(str), default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--strengths", type=_csv(float), default=None,
                   help="strengths for every steering method (default: 1, and 0,1 for ace)")
    p.add_argument("--ks", type=_csv(int), default=None,
                   help="INLP leading-k sweep (default 1,2,4; the pack's maximum is added)")
    p.add_argument("--json", default=None, help="write every number here (JSON)")
    p.add_argument("--markdown", default=None, help="write the table here (Markdown)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="the papers' comparison on one model: self-contained "
                                      "HTML + Markdown with plots")
    _model_args(p)
    _eval_args(p)
    p.add_argument("--ks", type=_csv(int), default=None,
                   help="INLP leading-k sweep (default 1,2,3; the pack's maximum is added)")
    p.add_argument("--n-geometry", type=int, default=None,
                   help="prompts per class for the geometry (default 24)")
    p.add_argument("--out", default="docs/report", help="output folder")
    p.set_defaults(func=cmd_report)
    return parser


def _csv(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    return parse


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pack", default=None, help="pack path (default: the model's cached pack)")
    p.add_argument("--harmful", default=None, help="split name or JSON file (harmful_val)")
    p.add_argument("--harmless", default=None, help="split name or JSON file (harmless_val)")
    p.add_argument("--n-harmful", type=int, default=None)
    p.add_argument("--n-harmless", type=int, default=None,
                   help="harmless prompts (KL, induced refusal, perplexity on completions)")
    p.add_argument("--completion-tokens", type=int, default=None,
                   help="length of the unsteered completions scored for perplexity")
    p.add_argument("--n-general", type=int, default=None, help="WikiText-2 paragraphs")
    p.add_argument("--general-tokens", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens per completion judged for refusal")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None,
                   help="where the unsteered completions are cached (default: cache root)")


def _eval_overrides(args) -> dict:
    names = ("harmful", "harmless", "n_harmful", "n_harmless",
             "completion_tokens", "n_general", "general_tokens", "max_new_tokens",
             "batch_size", "cache_dir")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_extract(args) -> int:
    from .extract import ExtractConfig, extract_pack
    from .models import load_model
    from .prompts import load_instructions
    from .store import default_pack_path

    lm = load_model(args.model, args.device, args.dtype)
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
    from .generate import generate
    from .methods import SteeringSpec, build_row
    from .models import load_model
    from .store import ensure_pack

    lm = load_model(args.model, args.device, args.dtype)
    spec = SteeringSpec(args.method, args.strength, args.k, args.layers)
    pack = ensure_pack(lm, args.pack) if args.method != "none" else None
    row = build_row(spec, pack)
    [text] = generate(lm, [args.prompt], [row], max_new_tokens=args.max_tokens,
                      temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def cmd_orthogonalize(args) -> int:
    from .models import load_model
    from .orthogonalize import export_orthogonalized
    from .store import ensure_pack

    lm = load_model(args.model, args.device, "float32" if args.dtype == "auto" else args.dtype)
    pack = ensure_pack(lm, args.pack)
    out = export_orthogonalized(lm, pack, args.out)
    print(json.dumps({"model": str(out), "layer": pack.layer}))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import EvalConfig, evaluate, markdown_table, write_outputs
    from .models import load_model
    from .store import ensure_pack

    config = EvalConfig(**_eval_overrides(args))
    if args.methods:
        config.methods = args.methods
    if args.strengths:
        config.strengths = {m: args.strengths for m in METHODS if m != "none"}
    if args.ks:
        config.ks = args.ks
    lm = load_model(args.model, args.device, args.dtype)
    needs_pack = any(m != "none" for m in config.methods)
    pack = ensure_pack(lm, args.pack) if needs_pack else None
    result = evaluate(lm, pack, config)
    write_outputs(result, args.json, args.markdown)
    print(markdown_table(result))
    return 0


def cmd_report(args) -> int:
    import shlex
    import time

    from .models import load_model
    from .report import ReportConfig, report_eval_config, run_report
    from .store import ensure_pack

    started = time.perf_counter()
    overrides = _eval_overrides(args)
    if args.ks:
        overrides["ks"] = args.ks
    config = ReportConfig(eval=report_eval_config(**overrides))
    if args.n_geometry:
        config.n_geometry = args.n_geometry
    config.command = shlex.join(["steer", *sys.argv[1:]]) if sys.argv[1:2] == ["report"] \
        else f"steer report --out {shlex.quote(args.out)}"
    lm = load_model(args.model, args.device, args.dtype)
    pack = ensure_pack(lm, args.pack)
    summary = run_report(lm, pack, args.out, config, started=started)
    for claim in summary["claims"]:
        verdict = {True: "yes", False: "no", None: "n/a"}[claim["reproduced"]]
        print(f"[{verdict:>3}] {claim['claim']} ({claim['measured']})")
    print(json.dumps({"out": args.out, "wall_seconds": summary["wall_seconds"]}))
    return 0


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"steer: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
