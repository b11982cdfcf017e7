"""`steer`: the one command line. Library verbs, the server, and HTTP client verbs.

The parser is built here and only here, without importing torch: `steer --help` answers at once.
Each verb names its handler as "module:function"; the module is imported when the verb runs.

    library   extract, generate, orthogonalize, eval, report,
              export, import                                   (steering.commands),
              precision-gate                                   (steering.evaluation)
    server    serve, hash-key                                  (server.app, server.security.auth)
    client    chat, compare                                    (clients.cli, over HTTP)
              inspect, extract --remote                        (clients.readout_cli)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from server.settings import add_cli_options, cli_overrides
from steering.catalog import METHODS, VARIANT_SYNTAX
from steering.models import PRECISIONS


def _handler(args: argparse.Namespace):
    module, _, name = args.handler.partition(":")
    return getattr(importlib.import_module(module), name)


def _csv(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded",
                   help="'embedded' (default), a model folder, a .gguf file or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    p.add_argument("--precision", default=os.environ.get("STEER_PRECISION", "auto"),
                   choices=PRECISIONS, help="weights: auto (int8 on CPU, bf16 on CUDA), fp32, "
                                            "bf16, fp16, int8, int4 (default: $STEER_PRECISION "
                                            "or auto; see docs/precision.md)")
    p.add_argument("--dtype", default="auto",
                   help="older spelling of a float precision (float32, bfloat16, float16)")


def _steering_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="none", choices=METHODS)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--k", type=int, default=None, help="leading INLP directions to use")
    p.add_argument("--layers", type=_csv(int), default=None, help="comma-separated layer indices")


def _grid_parser(sub, name: str, help: str, ks_default: str) -> argparse.ArgumentParser:
    """A command that measures a grid of steering settings (eval, report)."""
    p = sub.add_parser(name, help=help)
    _model_args(p)
    _eval_args(p)
    p.add_argument("--ks", type=_csv(int), default=None,
                   help=f"INLP leading-k sweep (default {ks_default}; the pack's maximum is added)")
    return p


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pack", default=None, help="pack path (default: the model's cached pack)")
    p.add_argument("--harmful", default=None,
                   help="split name (may be sliced: name[a:b]) or JSON file (default: "
                        "harmful_val for eval, the test split harmful_test_jbb for report)")
    p.add_argument("--harmless", default=None,
                   help="split name or JSON file (default harmless_val[3000:3030], disjoint "
                        "from selection)")
    p.add_argument("--n-harmful", type=int, default=None)
    p.add_argument("--n-harmless", type=int, default=None,
                   help="harmless prompts (KL, induced refusal, perplexity on completions)")
    p.add_argument("--completion-tokens", type=int, default=None,
                   help="length of the unsteered completions scored for perplexity")
    p.add_argument("--n-general", type=int, default=None, help="WikiText-2 paragraphs")
    p.add_argument("--general-tokens", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy tokens per completion judged for refusal (default 64, the "
                        "length the three-way judge was labelled at)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cache-dir", default=None,
                   help="where the unsteered completions are cached (default: cache root)")
    p.add_argument("--judge-url", default=None,
                   help="optional LLM judge: an OpenAI-compatible server (this one included) "
                        "asked whether each answer refuses; shown next to the substring matcher")
    p.add_argument("--judge-model", default=None, help="the judge server's model name")
    p.add_argument("--humaneval", type=int, default=None, metavar="N",
                   help="capability column: greedy HumanEval pass@1 on the first N of its 164 "
                        "problems per setting, code run in a sandbox (default 0: off)")
    p.add_argument("--humaneval-tokens", type=int, default=None,
                   help="greedy tokens per HumanEval reply (default 384)")
    p.add_argument("--judge-api-key", default=os.environ.get("STEER_JUDGE_API_KEY"),
                   help="the judge server's API key (default: $STEER_JUDGE_API_KEY)")


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("STEER_URL", "http://127.0.0.1:8000"),
                   help="server address (default: $STEER_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                   help="API key (default: $STEER_API_KEY)")
    p.add_argument("--model", default=None, help="served model id (default: the server's)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens to generate (default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")


def _library_verbs(sub) -> None:
    p = sub.add_parser("extract", help="extract DiM / ACE / INLP directions into a pack")
    _model_args(p)
    p.add_argument("--harmful", default="harmful_train", help="split name or JSON file")
    p.add_argument("--harmless", default="harmless_train", help="split name or JSON file")
    p.add_argument("--harmful-val", default="harmful_val")
    p.add_argument("--harmless-val", default="harmless_val")
    p.add_argument("--mode", default="fast", choices=("fast", "full"))
    p.add_argument("--name", default="refusal")
    p.add_argument("--out", default=None, help="pack path (default: the model's cached pack)")
    g = p.add_argument_group("any concept (instead of refusal; docs/packs.md)")
    g.add_argument("--positive", default=None,
                   help="examples of the concept: JSON, JSONL or CSV of prompts or "
                        "prompt/completion pairs (or package:NAME)")
    g.add_argument("--negative", default=None, help="contrasting examples, same formats")
    g.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of each class held out for selection (default 0.25)")
    g.add_argument("--positions", type=int, default=1,
                   help="last post-instruction positions to try (prompt-only data)")
    g.add_argument("--max-layer-fraction", type=float, default=0.75,
                   help="layer cap: candidates below this fraction of the depth")
    r = p.add_argument_group("on a running server (an extraction job; needs the pack-admin "
                             "grant; the pack is served when done)")
    r.add_argument("--remote", default=None, metavar="URL",
                   help="submit --positive/--negative (read here) or --dataset to this server")
    r.add_argument("--api-key", default=os.environ.get("STEER_API_KEY"),
                   help="API key (default: $STEER_API_KEY)")
    r.add_argument("--dataset", default=None, help="'refusal' or a shipped concept, instead "
                                                    "of the files")
    r.add_argument("--n", type=int, default=None, help="examples per class of --dataset")
    r.add_argument("--replace", action="store_true", help="replace a served pack of the name")
    r.add_argument("--poll", type=float, default=1.0, help="seconds between progress checks")
    p.set_defaults(handler="steering.commands:cmd_extract")

    p = sub.add_parser("export", help="write a pack for another tool: a llama.cpp control "
                                      "vector (actadd) or a PEFT LoRA adapter (ablate)")
    _model_args(p)
    p.add_argument("--pack", default=None,
                   help="pack path, or a name of the model's cached packs (default: refusal)")
    p.add_argument("--format", required=True, choices=("llamacpp", "peft-lora"))
    p.add_argument("--out", required=True, help=".gguf file (llamacpp) or adapter folder")
    p.add_argument("--layers", type=_csv(int), default=None,
                   help="llamacpp: layers to write (default: the pack's layer)")
    p.add_argument("--strength", type=float, default=None,
                   help="llamacpp: scale of the written vectors (default: the pack's "
                        "calibrated actadd strength, else 1)")
    p.set_defaults(handler="steering.commands:cmd_export")

    p = sub.add_parser("import", help="read a llama.cpp / repeng control-vector GGUF as an "
                                      "actadd pack for the model")
    _model_args(p)
    p.add_argument("file", help="control-vector .gguf")
    p.add_argument("--name", required=True, help="the pack's name")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the file's vectors (llama.cpp's --control-vector-scaled)")
    p.add_argument("--out", default=None, help="pack path (default: the model's cached packs)")
    p.set_defaults(handler="steering.commands:cmd_import")

    p = sub.add_parser("generate", help="one steered completion")
    _model_args(p)
    _steering_args(p)
    p.add_argument("--pack", default=None, help="pack path (default: the model's cached pack)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("prompt")
    p.set_defaults(handler="steering.commands:cmd_generate")

    p = sub.add_parser("orthogonalize",
                       help="export a model with the DiM direction ablated in its weights")
    _model_args(p)
    p.add_argument("--pack", default=None)
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--gguf", default=None,
                   help="also write the orthogonalized model as this .gguf (llama.cpp, Ollama)")
    p.add_argument("--gguf-base", default=None,
                   help="the model's own .gguf to edit (default: the one --model names, if any)")
    p.set_defaults(handler="steering.commands:cmd_orthogonalize")

    p = _grid_parser(sub, "eval", "refusal, perplexity and KL over a grid of steering settings "
                                  "(JSON + Markdown table)", ks_default="1,2,4")
    p.add_argument("--methods", type=_csv(str), default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    p.add_argument("--strengths", type=_csv(float), default=None,
                   help="strengths for every steering method (default: 1, and 0,1 for ace)")
    p.add_argument("--json", default=None, help="write every number here (JSON)")
    p.add_argument("--markdown", default=None, help="write the table here (Markdown)")
    p.set_defaults(handler="steering.commands:cmd_eval")

    p = _grid_parser(sub, "report", "the papers' comparison on one model: self-contained HTML + "
                                    "Markdown with plots", ks_default="1,2,3,4")
    p.add_argument("--n-geometry", type=int, default=None,
                   help="prompts per class for the geometry (default 24)")
    p.add_argument("--out", default="docs/report", help="output folder")
    p.add_argument("--capability", default=None, metavar="JSON",
                   help="HumanEval pass@1 per setting from a `bench/capability.py --url` run "
                        "through the server (its --out JSON) instead of measuring it here; "
                        "matched to the report's settings by their resolved steering")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: write the pages again from the folder's results.json "
                        "(claims judged again; notes.md and inlp_reference.json read again; "
                        "with --capability, that HumanEval run is attached again)")
    p.set_defaults(handler="steering.commands:cmd_report")

    p = sub.add_parser("precision-gate", help="does a reduced precision keep the steering "
                                              "results? refusal per method, perplexity, KL vs "
                                              "fp32 (docs/precision.md)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--pack", default=None, help="pack path (default: the model's cached pack)")
    p.add_argument("--precision", default="int8",
                   help="comma-separated precisions to compare with fp32 (default int8)")
    p.add_argument("--harmful", default=None,
                   help="harmful prompts: a split name or JSON file (default: harmful_val, then "
                        "harmful_train; never the test split)")
    p.add_argument("--n-harmful", type=int, default=None)
    p.add_argument("--n-harmless", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--n-general", type=int, default=None, help="WikiText-2 paragraphs")
    p.add_argument("--general-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", default=None, help="Markdown file (a .json sibling gets the numbers)")
    p.set_defaults(handler="steering.reports.precision_gate:cmd_precision_gate")


def _server_verbs(sub) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible steering server (every "
                                     "setting is a flag and a STEER_* variable)")
    add_cli_options(p)
    p.set_defaults(handler="server.cli:cmd_serve")

    p = sub.add_parser("hash-key", help="print the SHA-256 of an API key read from stdin "
                                        "(for the keys file)")
    p.set_defaults(handler="server.cli:cmd_hash_key")


def _client_verbs(sub) -> None:
    c = sub.add_parser("chat", help="chat with a running server (streamed; reads stdin lines "
                                    "when piped)", epilog=VARIANT_SYNTAX,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(c)
    c.add_argument("--steer", default=None, metavar="VARIANT",
                   help="steering in the variant syntax below: lists (a+b), targeting "
                        "(generation, window=0-8), conditions (above=0.5); replaces --method…")
    c.add_argument("--method", choices=METHODS, default=None, help="steering method")
    c.add_argument("--strength", type=float, default=None)
    c.add_argument("--k", type=int, default=None, help="INLP directions (INLP methods)")
    c.add_argument("--layers", default=None, help="comma-separated layers")
    c.add_argument("--preset", default=None, help="preset name (model '<model>+<preset>')")
    c.add_argument("--no-history", action="store_true",
                   help="send each line on its own (no conversation memory)")
    c.add_argument("--no-stream", action="store_true", help="print whole answers")
    c.set_defaults(handler="clients.cli:cmd_chat")

    m = sub.add_parser("compare", help="run one prompt under several steering variants on a "
                                       "running server and print the answers side by side",
                       epilog=VARIANT_SYNTAX, formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_args(m)
    m.add_argument("prompt", nargs="?", default="-", help="the prompt ('-' or none: stdin)")
    m.add_argument("--variant", "-v", action="append", default=None,
                   help="a preset, method[:strength[:k]][,options], or a list a+b (syntax "
                        "below; repeat; default: none and every preset)")
    m.add_argument("--json", action="store_true", help="print the raw JSON response")
    m.add_argument("--width", type=int, default=None, help="table width (default: terminal)")
    m.set_defaults(handler="clients.cli:cmd_compare")

    i = sub.add_parser("inspect", help="a pack's direction on one prompt, on a running server: "
                                       "layer × token scores, logit lens, cosines")
    _connection_args(i)
    i.add_argument("prompt", nargs="?", default="-", help="the prompt ('-' or none: stdin)")
    i.add_argument("--completion", default=None, help="an answer scored after the prompt")
    i.add_argument("--pack", default=None, help="pack (default: the server's)")
    i.add_argument("--layer", type=int, default=None,
                   help="the direction the lens and cosines use (default: the pack's layer)")
    i.add_argument("--top-k", type=int, default=8, help="tokens per side of the logit lens")
    i.add_argument("--tokens", type=int, default=24, help="last tokens shown in the table")
    i.add_argument("--json", action="store_true", help="print the raw JSON response")
    i.set_defaults(handler="clients.readout_cli:cmd_inspect")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _library_verbs(sub)
    _server_verbs(sub)
    _client_verbs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "remote", None):  # `steer extract --remote URL`: a job on that server
        args.handler = "clients.readout_cli:cmd_extract_remote"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _handler(args)(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"steer: error: {exc}", file=sys.stderr)
        return 2


def cmd_serve(args) -> int:
    from server.app import serve

    serve(**cli_overrides(args))
    return 0


def cmd_hash_key(args) -> int:
    from server.security.auth import hash_key

    print(hash_key(sys.stdin.readline().rstrip("\r\n")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
