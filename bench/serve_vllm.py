"""`bench/serve.py --engine vllm`: the server over vLLM beside the native engine, in one run.

    .venv-vllm/bin/python bench/serve.py --engine vllm [--streams 1,8,32] [--tokens 64]
        [--repeats 4] [--vllm-precision bf16] [--native-precision auto] [--vllm-eager]
        [--skip-native] [--skip-llama-cpp]

Run under vLLM's virtualenv (scripts/ensure-vllm.sh). Three servers on the embedded model are
started and kept loaded together, each serving `--streams` concurrent streaming clients (a
~40-token prompt, `--tokens` greedy tokens, ignore_eos) while the others sit idle:
- vLLM without the plugin (`VLLM_PLUGINS` empty): unsteered, the reference row;
- vLLM with the plugin: on and idle (unsteered), one actadd vector at every layer for all
  requests, 16 distinct configurations in the batch (request i gets configuration i mod 16: six
  methods × strengths);
- the native engine (`--native-precision`, default the server's own: int8 on CPU): the same
  three rows.
Rows are issue 27's (after the vLLM activation-steering RFC's matrix). Every (server, row) cell
of a stream count runs once per round, in an order that reverses every other round (ABBA…), so
that a drift of the shared machine moves all rows alike and an order effect cancels over an
even number of rounds; the cell is the median round's aggregate output tokens/s, TTFT p50/p99
over all its requests. The table also gives each row's per-round ratio to the reference's run
of the same round (median, min–max), which is what the targets are read from. The CPU time the
idle servers used while another was measured is printed (it should be ~0: an idle server that
spins would bias the others). llama.cpp (one stream, the same GGUF; bench/serve.py's child
process) joins the 1-stream rotation when it is available.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

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


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU seconds of the server's whole process tree (vLLM runs an engine-core
    and worker processes beside the front end)."""
    import psutil

    total = 0.0
    root = psutil.Process(server.proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def start(name: str, env: dict[str, str], python: str | None = None
          ) -> tuple[ServerProcess, float]:
    started = time.perf_counter()
    server = ServerProcess(env={"PYTHONPATH": str(ROOT), **env},
                           log_path=f"/tmp/bench-serve-{name}.log", python=python)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    load_s = time.perf_counter() - started
    model = server.served_model()
    if MODEL.setdefault("id", model) != model:
        raise SystemExit(f"{name} serves {model!r}, the others {MODEL['id']!r}")
    asyncio.run(level(server.url, 2, 8, None))  # warm-up
    print(f"  {name}: ready in {load_s:.0f} s", flush=True)
    return server, load_s


def measure(servers: dict[str, ServerProcess], plan: dict[str, dict[str, list | None]],
            streams: list[int], tokens: int, repeats: int, llama=None) -> dict:
    """Every (server, row) cell at every stream count, once a round, the order of a round's
    cells reversed every other round. Returns cells["server/row@n"] = [run, ...] and the
    idle servers' CPU seconds during the runs."""
    cells: dict[str, list[dict]] = {}
    idle_cpu: list[float] = []
    order = [(name, row, bodies) for name, rows in plan.items() for row, bodies in rows.items()]
    for r in range(repeats):
        for n in streams:
            items = order if r % 2 == 0 else order[::-1]
            if llama is not None and n == 1:
                items = [*items, ("llama.cpp", "unsteered", None)]
            for name, row, bodies in items:
                others = [s for k, s in servers.items() if k != name]
                before = [cpu_seconds(s) for s in others]
                if name == "llama.cpp":
                    run = {"tokens_per_s": llama.rate(), "ttft": []}
                else:
                    run = asyncio.run(level(servers[name].url, n, tokens, bodies))
                idle_cpu.append(sum(cpu_seconds(s) - b for s, b in zip(others, before)))
                cells.setdefault(f"{name}/{row}@{n}", []).append(run)
            print(f"  round {r + 1}/{repeats}, {n} streams done", flush=True)
    return {"cells": cells, "idle_cpu_s": idle_cpu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4, help="rounds (even: ABBA balanced)")
    ap.add_argument("--vllm-precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--native-precision", default=None)
    ap.add_argument("--vllm-eager", action="store_true", help="enforce_eager (no torch.compile)")
    ap.add_argument("--kv-gb", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--reverse-start", action="store_true",
                    help="start the servers in the reverse order (a start-order effect shows as "
                         "a change between runs)")
    ap.add_argument("--native-python", default=str(ROOT / ".venv/bin/python"),
                    help="the interpreter that runs the native server (default: the project's "
                         ".venv, as `make serve` runs it: vLLM's virtualenv pins an older "
                         "transformers); '' for this one")
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
    envs: dict[str, dict[str, str]] = {"vllm_off": {**vllm_env, "VLLM_PLUGINS": ""},
                                       "vllm_on": vllm_env}
    plan: dict[str, dict[str, list | None]] = {"vllm_off": {"unsteered": None},
                                               "vllm_on": all_rows}
    if not args.skip_native:
        envs["native"] = {"STEER_ENGINE": "native", "STEER_MAX_BATCH": max_batch,
                          "STEER_MAX_QUEUE": max_batch}
        if args.native_precision:
            envs["native"]["STEER_PRECISION"] = args.native_precision
        plan["native"] = all_rows
    servers: dict[str, ServerProcess] = {}
    load_s: dict[str, float] = {}
    llama = None
    try:
        native_python = args.native_python if args.native_python and \
            Path(args.native_python).is_file() else None
        args.native_python_used = native_python or sys.executable
        order = list(envs)[::-1] if args.reverse_start else list(envs)
        for name in order:  # started one at a time: starts are CPU-heavy
            env = envs[name]
            servers[name], load_s[name] = start(
                name, env, native_python if name == "native" else None)
        if not args.skip_llama_cpp:
            llama = LlamaCpp(args.tokens)
            if llama.error is not None:
                print(f"llama.cpp: not measured: {llama.error}")
                llama = None
        result = measure(servers, plan, streams, args.tokens, args.repeats, llama)
    finally:
        for server in servers.values():
            server.stop()
        if llama is not None:
            llama.close()
    report(args, streams, result, load_s)
    return 0


def _ratios(cells: dict, row: str, ref: str) -> list[float]:
    """Per-round ratio of a cell's runs to the reference cell's runs of the same rounds."""
    return [a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(cells[row], cells[ref], strict=True)]


def report(args, streams, result, load_s) -> None:
    cells = result["cells"]
    mode = "eager" if args.vllm_eager else "compiled"
    print(f"\nvLLM ({args.vllm_precision}, {mode}) vs the native engine "
          f"({args.native_precision or 'its default'}), embedded model, {args.tokens} tokens, "
          f"{args.repeats} rounds, all servers loaded together; output tokens/s (median round), "
          f"% of the reference (median per-round ratio, min-max), TTFT ms p50/p99")
    head = "".join(f"{f'{n} streams':>36}" for n in streams)
    print(f"{'row':<30}{head}")
    table: dict[str, dict] = {}

    def line(label: str, row: str, ref: str) -> None:
        parts, entry = [], {}
        for n in streams:
            runs = cells[f"{row}@{n}"]
            rates = [r["tokens_per_s"] for r in runs]
            ratios = _ratios(cells, f"{row}@{n}", f"{ref}@{n}")
            ttft = [t for r in runs for t in r["ttft"]]
            p50, p99 = (1000 * pct(ttft, 50), 1000 * pct(ttft, 99)) if ttft else (0.0, 0.0)
            mid = statistics.median(ratios)
            parts.append(f"{statistics.median(rates):>7.1f} {100 * mid:>4.0f}% "
                         f"[{100 * min(ratios):.0f}-{100 * max(ratios):.0f}] "
                         f"{p50:>5.0f}/{p99:<5.0f}")
            entry[n] = {"tokens_per_s": round(statistics.median(rates), 2),
                        "runs": [round(x, 2) for x in rates],
                        "vs_reference": round(mid, 3),
                        "vs_reference_runs": [round(x, 3) for x in ratios],
                        "ttft_p50_ms": round(p50, 1), "ttft_p99_ms": round(p99, 1)}
        table[label] = entry
        print(f"{label:<30}" + "".join(f"{p:>36}" for p in parts))

    line("vllm plugin off", "vllm_off/unsteered", "vllm_off/unsteered")
    line("vllm plugin on, idle", "vllm_on/unsteered", "vllm_off/unsteered")
    line("vllm 1 vector, every layer", "vllm_on/all_layers", "vllm_off/unsteered")
    line("vllm 16 distinct configs", "vllm_on/distinct16", "vllm_off/unsteered")
    if f"native/unsteered@{streams[0]}" in cells:
        line("native unsteered", "native/unsteered", "native/unsteered")
        line("native 1 vector, every layer", "native/all_layers", "native/unsteered")
        line("native 16 distinct configs", "native/distinct16", "native/unsteered")
        line("native ÷ vllm plugin off", "native/unsteered", "vllm_off/unsteered")
    if "llama.cpp/unsteered@1" in cells:
        line_l = statistics.median(r["tokens_per_s"] for r in cells["llama.cpp/unsteered@1"])
        print(f"llama.cpp, 1 stream: {line_l:.1f} tokens/s (median round)")
        table["llama.cpp"] = {1: {"tokens_per_s": round(line_l, 2)}}
    idle = result["idle_cpu_s"]
    print(f"idle servers' CPU while another was measured: median {statistics.median(idle):.2f} s, "
          f"max {max(idle):.2f} s per cell")
    targets = []
    n = max(streams)
    idle_r = table["vllm plugin on, idle"][n]["vs_reference_runs"]
    idle_mid = statistics.median(idle_r)
    targets.append(("plugin on, idle within noise of off (rounds' ratios span 100%, or the "
                    "median within 3%)", min(idle_r) <= 1.0 <= max(idle_r)
                    or abs(idle_mid - 1.0) <= 0.03))
    targets.append((f"1 vector at every layer >= 90% of off at {n} streams",
                    table["vllm 1 vector, every layer"][n]["vs_reference"] >= 0.90))
    targets.append((f"16 distinct configs >= 80% of off at {n} streams",
                    table["vllm 16 distinct configs"][n]["vs_reference"] >= 0.80))
    for text, met in targets:
        print(f"target: {text}: {'met' if met else 'NOT met'}")
    print("(% columns: of vLLM plugin off for vLLM rows, of native unsteered for native rows; "
          "'native ÷ vllm': the native engine's unsteered throughput over vLLM's)")
    print(json.dumps({"bench": "serve", "engine": "vllm", "vllm_precision": args.vllm_precision,
                      "vllm_mode": mode, "tokens": args.tokens, "repeats": args.repeats,
                      "load_s": {k: round(v, 1) for k, v in load_s.items()},
                      "idle_cpu_s_max": round(max(idle), 2),
                      "native_python": getattr(args, "native_python_used", None), "table": table,
                      "targets": {t: m for t, m in targets}}))
