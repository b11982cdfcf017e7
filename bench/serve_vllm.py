"""`bench/serve.py --engine vllm`: the server over vLLM beside the native engine, in one run.

    .venv-vllm/bin/python bench/serve.py --engine vllm [--streams 1,8,32] [--tokens 64]
        [--repeats 3] [--vllm-precision bf16] [--native-precision auto] [--vllm-eager]
        [--skip-llama-cpp]

Run under vLLM's virtualenv (scripts/ensure-vllm.sh). One server process at a time on the
embedded model, each phase serving `--streams` concurrent streaming clients (a ~40-token prompt,
`--tokens` greedy tokens, ignore_eos):
1. the native engine (`--engine native`, `--native-precision`, default the server's own: int8 on
   CPU): unsteered, one actadd vector at every layer for all requests, 16 distinct configurations
   in the batch (request i gets configuration i mod 16: six methods × strengths);
2. vLLM without the plugin (`VLLM_PLUGINS` empty): unsteered — the reference row;
3. vLLM with the plugin: on and idle (unsteered), every layer, 16 configurations.
Rows are issue 27's (after the vLLM activation-steering RFC's matrix). Within a phase the rows
alternate round by round (`--repeats` rounds), so a drifting machine moves them alike; the cell
is the median round's aggregate output tokens/s, TTFT p50/p99 over all its requests. The vLLM rows
are given as % of plugin-off, the native rows as % of native unsteered, and native ÷ vLLM per
stream count. llama.cpp (one stream, the same GGUF; bench/serve.py's child process) is measured
between the phases. Phases run one after the other (two engines do not fit beside other work on a
24 GB machine), so cross-phase ratios carry the machine's drift: the table says which run it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from bench.serve import MODEL, PROMPTS, ROOT, LlamaCpp, pct, stream_one
from testkit.server import ServerProcess

METHODS16 = ["actadd", "ablate", "ace", "inlp_null", "inlp_flip", "inlp_reflect"]


def rows(n_layers: int) -> dict[str, list | None]:
    """Row name → one steering body per request slot (cycled), None: unsteered."""
    every = {"method": "actadd", "strength": 0.3, "layers": list(range(n_layers))}
    distinct = []
    for i in range(16):
        method = METHODS16[i % len(METHODS16)]
        strength = round(0.2 * i / 15, 3) if method == "ace" else round(0.5 + 0.1 * i, 2)
        distinct.append({"method": method, "strength": strength})
    return {"unsteered": None, "all_layers": [every], "distinct16": distinct}


async def level(url: str, clients: int, tokens: int, bodies: list | None) -> dict:
    """`clients` concurrent streams; request i steered by bodies[i % len(bodies)]."""
    async with httpx.AsyncClient(timeout=1800,
                                 limits=httpx.Limits(max_connections=clients + 4)) as c:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[
            stream_one(c, url, None if bodies is None else bodies[i % len(bodies)],
                       PROMPTS[i % len(PROMPTS)], tokens) for i in range(clients)])
        wall = time.perf_counter() - t0
    return {"tokens_per_s": sum(r["tokens"] for r in runs) / wall,
            "ttft": [r["ttft"] for r in runs]}


def phase(name: str, env: dict[str, str], row_bodies: dict[str, list | None],
          streams: list[int], tokens: int, repeats: int) -> dict:
    """One server: every (row, streams) cell, rows alternating round by round."""
    log = f"/tmp/bench-serve-{name}.log"
    started = time.perf_counter()
    with ServerProcess(env={"PYTHONPATH": str(ROOT), **env}, log_path=log) as server:
        server.wait_ready()
        load_s = time.perf_counter() - started
        MODEL["id"] = server.served_model()
        asyncio.run(level(server.url, 2, 8, None))  # warm-up
        cells: dict[tuple[str, int], list[dict]] = {}
        for _ in range(repeats):
            for n in streams:
                for row, bodies in row_bodies.items():
                    cells.setdefault((row, n), []).append(
                        asyncio.run(level(server.url, n, tokens, bodies)))
    out = {"load_s": round(load_s, 1), "cells": {}}
    for (row, n), runs in cells.items():
        ttft = [t for r in runs for t in r["ttft"]]
        out["cells"][f"{row}@{n}"] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "runs": [round(r["tokens_per_s"], 2) for r in runs]}
    print(f"  {name}: loaded in {load_s:.0f} s, {len(cells)} cells", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--native-precision", default=None)
    ap.add_argument("--vllm-eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--kv-gb", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args(argv)
    streams = [int(x) for x in args.streams.split(",")]
    from transformers import AutoConfig

    from steering.models.embedded import embedded_model_dir

    n_layers = AutoConfig.from_pretrained(embedded_model_dir()).num_hidden_layers
    all_rows = rows(n_layers)
    max_batch = str(max(streams))
    vllm_env = {"STEER_ENGINE": "vllm", "STEER_PRECISION": args.vllm_precision,
                "STEER_MAX_BATCH": max_batch, "STEER_MAX_QUEUE": max_batch,
                "STEER_VLLM_ENFORCE_EAGER": "1" if args.vllm_eager else "0",
                "VLLM_CPU_KVCACHE_SPACE": args.kv_gb}
    results: dict[str, dict] = {}
    if not args.skip_native:
        native_env = {"STEER_ENGINE": "native", "STEER_MAX_BATCH": max_batch,
                      "STEER_MAX_QUEUE": max_batch}
        if args.native_precision:
            native_env["STEER_PRECISION"] = args.native_precision
        results["native"] = phase("native", native_env, all_rows, streams, args.tokens,
                                  args.repeats)
    llama = None
    if not args.skip_llama_cpp:
        lc = LlamaCpp(args.tokens)
        if lc.error is None:
            try:
                llama = statistics.median(lc.rate() for _ in range(args.repeats))
            finally:
                lc.close()
        else:
            print(f"llama.cpp: not measured: {lc.error}")
    results["vllm_off"] = phase("vllm-plugin-off", {**vllm_env, "VLLM_PLUGINS": ""},
                                {"unsteered": None}, streams, args.tokens, args.repeats)
    results["vllm_on"] = phase("vllm-plugin-on", vllm_env, all_rows, streams, args.tokens,
                               args.repeats)
    report(args, streams, results, llama)
    return 0


def report(args, streams, results, llama) -> None:
    mode = "eager" if args.vllm_eager else "compiled"
    print(f"\nvLLM ({args.vllm_precision}, {mode}) vs the native engine "
          f"({args.native_precision or 'its default'}), embedded model, {args.tokens} tokens, "
          f"{args.repeats} rounds; output tokens/s (median round), TTFT ms p50/p99")
    head = "".join(f"{f'{n} streams':>30}" for n in streams)
    print(f"{'row':<30}{head}")
    off = results["vllm_off"]["cells"]
    table: dict[str, dict] = {}

    def line(label, cells, row, ref_row, ref_cells):
        parts, entry = [], {}
        for n in streams:
            c = cells[f"{row}@{n}"]
            ratio = c["tokens_per_s"] / ref_cells[f"{ref_row}@{n}"]["tokens_per_s"]
            parts.append(f"{c['tokens_per_s']:>8.1f} {100 * ratio:>5.0f}% "
                         f"{c['ttft_p50_ms']:>6.0f}/{c['ttft_p99_ms']:<6.0f}")
            entry[n] = {**{k: round(v, 2) for k, v in c.items() if k != "runs"},
                        "runs": c["runs"], "vs_reference": round(ratio, 3)}
        table[label] = entry
        print(f"{label:<30}" + "".join(f"{p:>30}" for p in parts))

    line("vllm plugin off", off, "unsteered", "unsteered", off)
    on = results["vllm_on"]["cells"]
    line("vllm plugin on, idle", on, "unsteered", "unsteered", off)
    line("vllm 1 vector, every layer", on, "all_layers", "unsteered", off)
    line("vllm 16 distinct configs", on, "distinct16", "unsteered", off)
    if "native" in results:
        nat = results["native"]["cells"]
        line("native unsteered", nat, "unsteered", "unsteered", nat)
        line("native 1 vector, every layer", nat, "all_layers", "unsteered", nat)
        line("native 16 distinct configs", nat, "distinct16", "unsteered", nat)
        ratios = {n: nat[f"unsteered@{n}"]["tokens_per_s"] / off[f"unsteered@{n}"]["tokens_per_s"]
                  for n in streams}
        print("native unsteered ÷ vLLM plugin off: "
              + ", ".join(f"{n} streams {r:.2f}×" for n, r in ratios.items()))
    if llama is not None:
        print(f"llama.cpp, 2 threads, 1 stream: {llama:.1f} tokens/s")
    print("(% columns: of vLLM plugin off for vLLM rows, of native unsteered for native rows; "
          "shared machine: phases ran one after the other)")
    print(json.dumps({"bench": "serve", "engine": "vllm", "vllm_precision": args.vllm_precision,
                      "vllm_mode": mode, "tokens": args.tokens, "repeats": args.repeats,
                      "load_s": {k: v["load_s"] for k, v in results.items()},
                      "llama_cpp_1_stream_tokens_per_s": llama, "table": table}))
