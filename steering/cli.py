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
    return parser


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
