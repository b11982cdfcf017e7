"""Serving benchmark on the embedded model (issue 11). One run prints a table and one JSON line.

(Why one ~420-line script: a benchmark that must be read and run as one file; its parts are the
llama.cpp reference, the paired overhead rounds and the concurrency sweep.)

    .venv/bin/python bench/serve.py [--tokens 64] [--concurrency 1,4,8,16,32] [--precision auto]
    .venv-vllm/bin/python bench/serve.py --engine vllm [...]   # vLLM beside the native engine:
                                                               # bench/serve_vllm.py

Side by side, on the same machine, one greedy stream of `--tokens` tokens each:
1. llama.cpp (llama-cpp-python 0.3.36, 2 threads) on the same GGUF the embedded model ships as,
   in a child process that stays loaded while the server runs: `--rounds` alternating rounds
   of one llama.cpp stream and one unsteered server stream, the ratio being the median of the
   rounds' ratios (a machine whose speed drifts between phases moved a sequential ratio from
   0.93 to 0.61 between two runs). The first run pip-installs it into
   <cache root>/bench-llamacpp-noamx (a native source build with Intel AMX off, ~10 min on 2
   cores); where that fails the bench says so and goes on.
2. plain transformers `generate` in fp32, no server: the old reference;
3. the real server process at `--precision` (default: the server's default, auto → int8 on
   CPU): unsteered, each method and issue 13's row kinds (a targeted edit, a list of two, a
   conditional one), with the steering overhead per decoded token: the median over `--pairs`
   back-to-back (unsteered, steered) request pairs, in alternating order, of the ratio of
   their median inter-token latencies (pairing cancels the shared machine's drift);
4. 1/4/8/16/32 concurrent streaming clients, methods mixed at random, a ~40-token prompt,
   each level `--repeats` times: the median run's aggregate output tokens/s, TTFT and
   inter-token latency p50/p99 over all runs;
5. the server's RSS: peak (VmHWM, includes loading the fp32 checkpoint before quantizing) and
   the largest RSS sampled while serving.

Targets (issue 11): one stream >= 0.7x llama.cpp; overhead <= 3% per token per method; 8 streams
>= 4x one; TTFT p50 <= 2 s at 8 streams; peak RSS <= 1.5 GB. The machine is shared: medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from steering.catalog import METHODS  # noqa: E402
from testkit.server import RssSampler, ServerProcess  # noqa: E402

# About 40 tokens each once chat-formatted (the template adds a system turn).
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, in detail, with an example of a collision.",
    "Describe the water cycle for a school class, step by step, with an experiment.",
    "Write a Python function that merges two sorted lists, and explain its complexity.",
]
LLAMA_CPP = "llama-cpp-python==0.3.36"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ---- llama.cpp ------------------------------------------------------------------------------

_LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_threads=2, n_ctx=1024, verbose=False, seed=0)
messages = [{"role": "user", "content": prompt}]
llm.create_chat_completion(messages=messages, max_tokens=4, temperature=0.0)  # warm-up
print("ready", flush=True)
for line in sys.stdin:  # one greedy stream per "run" line, its tokens/s on one line
    t0 = time.perf_counter()
    out = llm.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0.0)
    print(json.dumps(out["usage"]["completion_tokens"] / (time.perf_counter() - t0)), flush=True)
"""


class LlamaCpp:
    """llama.cpp on the embedded GGUF in a child process with its own site dir, kept alive so
    that its runs can alternate with the server's (`rate()`: one greedy stream's tokens/s).
    `error` says why it is not available (then `rate()` is never called)."""

    def __init__(self, tokens: int):
        self.tokens, self.proc, self.error = tokens, None, None
        try:
            self._start()
        except (OSError, RuntimeError) as exc:
            self.error = str(exc)[-300:]

    def _start(self) -> None:
        from steering.models import embedded

        site = embedded.cache_root() / "bench-llamacpp-noamx"
        if not (site / "llama_cpp").is_dir():
            print(f"installing {LLAMA_CPP} into {site} (first run; a source build, ~10 min)...",
                  flush=True)
            # Native build without Intel AMX: a VM may report AMX in CPUID without enabling
            # its tile state (seen here: SIGILL at `tilezero` in ggml's AMX matmul); AVX-512 and
            # VNNI stay. GGML_NATIVE's -march=native turns AMX back on, so the compiler is told
            # not to.
            no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            amx_off = f"-DCMAKE_C_FLAGS='{no_amx}' -DCMAKE_CXX_FLAGS='{no_amx}'"
            env = {**os.environ, "CMAKE_ARGS": f"{os.environ.get('CMAKE_ARGS', '')} {amx_off}"}
            done = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "pip", "install",
                                   "--quiet", "--no-cache-dir", "--target", str(site),
                                   LLAMA_CPP], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"pip install {LLAMA_CPP} failed: {done.stderr.strip()}")
        gguf = site / "embedded.gguf"
        if not gguf.is_file():
            embedded.assemble_gguf(gguf)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LLAMA_SCRIPT, str(gguf), PROMPTS[0], str(self.tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(site)})
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"llama.cpp did not start: {self.proc.stderr.read().strip()}")

    def rate(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp run failed: {self.proc.stderr.read().strip()[-300:]}")
        return float(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


async def side_by_side(url: str, llama: LlamaCpp, tokens: int, rounds: int) -> dict:
    """llama.cpp and the server's unsteered stream, alternating (which goes first alternates
    too), `rounds` times: each one's median tokens/s and the median of the per-round ratios —
    the two runs of a round see the same state of the shared machine."""
    ours, theirs = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, None, PROMPTS[0], tokens)  # warm-up (a fresh server)
        for i in range(rounds):
            if i % 2:
                theirs.append(llama.rate())
            r = await stream_one(client, url, None, PROMPTS[0], tokens)
            ours.append(r["tokens"] / r["seconds"])
            if not i % 2:
                theirs.append(llama.rate())
    return {"llama_cpp": statistics.median(theirs), "server": statistics.median(ours),
            "ratio": statistics.median(a / b for a, b in zip(ours, theirs)),
            "llama_cpp_runs": theirs, "server_runs": ours}


# ---- plain transformers -----------------------------------------------------------------------


def plain_generate(tokens: int, repeats: int) -> float:
    import torch

    from steering import load_model
    from steering.interventions.activations import encode_chats

    lm = load_model("embedded", device="cpu", precision="fp32")
    enc = encode_chats(lm, [PROMPTS[0]])
    enc.pop("position_ids")
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        n = out.shape[1] - enc["input_ids"].shape[1]
        rates.append(n / (time.perf_counter() - t0))
    del lm
    return statistics.median(rates)


def prompt_tokens() -> int:
    from transformers import AutoTokenizer

    from steering.models import embedded
    from steering.models.chat import format_chat

    tok = AutoTokenizer.from_pretrained(embedded.embedded_model_dir())
    return round(statistics.mean(len(tok(format_chat(tok, p), add_special_tokens=False)
                                         ["input_ids"]) for p in PROMPTS))


MODEL = {"id": "qwen2.5-coder-0.5b-instruct"}


def method_steering(method: str) -> dict | None:
    """The `steering` body of one plain method (None: unsteered)."""
    if method == "none":
        return None
    return {"method": method, "strength": 0.0 if method == "ace" else 1.0}


# Issue 13's row kinds, measured beside the plain methods: a targeted edit, a list of two
# edits, a conditional edit (its condition is scored on the prompt at prefill).
CONTROL_ROWS = {
    "actadd@generation": {"method": "actadd", "strength": 1.0, "apply_to": "generation"},
    "[ablate,actadd]": [{"method": "ablate"}, {"method": "actadd", "strength": 1.0}],
    "ablate when>0.4": {"method": "ablate", "when": {"pack": "refusal", "above": 0.4}},
}
ROWS = {**{m: method_steering(m) for m in METHODS}, **CONTROL_ROWS}


async def stream_one(client: httpx.AsyncClient, url: str, steering: dict | list | None,
                     prompt: str, tokens: int) -> dict:
    body = {"model": MODEL["id"], "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if steering is not None:
        body["steering"] = steering
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with aconnect_sse(client, "POST", f"{url}/v1/chat/completions", json=body) as source:
        source.response.raise_for_status()
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                continue
            chunk = json.loads(sse.data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    n_out = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": stamps[0] - t0 if stamps else end - t0,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": n_out, "seconds": end - t0}


async def single_streams(url: str, tokens: int, repeats: int,
                         pairs: int, pair_tokens: int) -> dict[str, dict]:
    """Tokens/s per row (`repeats` runs each, round-robin), and each row's overhead per decoded
    token from `pairs` *paired* runs: an unsteered request, then the row's, back to back, and the
    median over pairs of (row's median ITL / unsteered median ITL − 1). On a shared machine
    whose speed drifts by tens of percent within minutes, only pairing resolves a few percent."""
    out = {}
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, None, PROMPTS[0], 4)  # warm-up
        by_row: dict[str, list[dict]] = {name: [] for name in ROWS}
        for _ in range(repeats):
            for name, steering in ROWS.items():
                by_row[name].append(await stream_one(client, url, steering, PROMPTS[0], tokens))
        ratios: dict[str, list[float]] = {name: [] for name in ROWS if name != "none"}
        for i in range(pairs):
            for name in ratios:
                # Alternate which of the pair runs first: the second request of a pair was
                # measured a few percent slower whatever it was.
                order = [None, ROWS[name]] if i % 2 == 0 else [ROWS[name], None]
                first = await stream_one(client, url, order[0], PROMPTS[0], pair_tokens)
                second = await stream_one(client, url, order[1], PROMPTS[0], pair_tokens)
                base, run = (first, second) if i % 2 == 0 else (second, first)
                ratios[name].append(statistics.median(run["itl"])
                                    / statistics.median(base["itl"]) - 1)
        for name, runs in by_row.items():
            itl = [x for r in runs for x in r["itl"]]
            out[name] = {
                "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in runs),
                "itl_median_ms": 1000 * statistics.median(itl),
                "overhead": statistics.median(ratios[name]) if name in ratios else 0.0,
            }
    return out


async def concurrent(url: str, clients: int, tokens: int, rng: random.Random,
                     repeats: int, pick=None) -> dict:
    """`clients` streams at once, `repeats` times: the median run's aggregate tokens/s, and
    TTFT / ITL percentiles over all runs. `pick(i, rng)` gives client i's steering (default:
    a method at random)."""
    pick = pick or (lambda i, r: method_steering(r.choice(METHODS)))
    rounds = []
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=64)) as c:
        for _ in range(repeats):
            t0 = time.perf_counter()
            runs = await asyncio.gather(*[
                stream_one(c, url, pick(i, rng), PROMPTS[i % len(PROMPTS)], tokens)
                for i in range(clients)])
            rounds.append((sum(r["tokens"] for r in runs) / (time.perf_counter() - t0), runs))
    runs = [r for _, rs in rounds for r in rs]
    itl = [x for r in runs for x in r["itl"]]
    ttft = [r["ttft"] for r in runs]
    return {"clients": clients, "tokens_per_s": statistics.median(t for t, _ in rounds),
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99)}


def main() -> int:
    if "--engine" in sys.argv:  # --engine vllm: the vLLM comparison (bench/serve_vllm.py)
        at = sys.argv.index("--engine")
        engine = sys.argv[at + 1] if at + 1 < len(sys.argv) else ""
        if engine == "vllm":
            from bench.serve_vllm import main as vllm_main

            return vllm_main(sys.argv[1:])
        if engine != "native":
            sys.exit(f"--engine must be native or vllm, got {engine!r}")
        del sys.argv[at:at + 2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=12,
                    help="paired (unsteered, steered) runs per row for the overhead")
    ap.add_argument("--pair-tokens", type=int, default=24)
    ap.add_argument("--concurrency", default="1,4,8,16,32")
    ap.add_argument("--precision", default=None,
                    help="the server's precision (default: its own default, auto)")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--rounds", type=int, default=8,
                    help="alternating llama.cpp / server rounds for the one-stream ratio")
    ap.add_argument("--skip-plain", action="store_true",
                    help="skip the plain transformers fp32 reference (minutes on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    n_prompt = prompt_tokens()
    reference = None if args.skip_plain else plain_generate(args.tokens, args.repeats)
    if reference is not None:
        print(f"plain transformers generate fp32, 1 greedy stream: {reference:.2f} tokens/s")
    env = {"PYTHONPATH": str(ROOT)}  # this checkout's code, whatever the venv's editable install
    server_args = ["--precision", args.precision] if args.precision else []
    with ServerProcess(*server_args, env=env, log_path="/tmp/bench-serve.log") as server:
        server.wait_ready()
        MODEL["id"] = server.served_model()
        precision = _served_precision("/tmp/bench-serve.log")
        rss_ready = server.rss_kb()
        llama, paired = None, None
        if not args.skip_llama_cpp:
            llama = LlamaCpp(args.tokens)
            if llama.error is None:
                try:
                    paired = asyncio.run(side_by_side(server.url, llama, args.tokens,
                                                      args.rounds))
                except RuntimeError as exc:
                    llama.error = str(exc)
                finally:
                    llama.close()
            if paired is None:
                print(f"llama.cpp: not measured: {llama.error}")
        if paired is not None:
            print(f"llama.cpp, 2 threads, 1 greedy stream: {paired['llama_cpp']:.2f} tokens/s; "
                  f"the server unsteered in the same {args.rounds} alternating rounds: "
                  f"{paired['server']:.2f} (ratio {paired['ratio']:.3f})")
        with RssSampler(server) as sampler:
            singles = asyncio.run(single_streams(server.url, args.tokens, args.repeats,
                                                 args.pairs, args.pair_tokens))
            levels = [int(x) for x in args.concurrency.split(",")]
            conc = [asyncio.run(concurrent(server.url, n, args.tokens, rng, args.repeats))
                    for n in levels]
        peak_kb = server.rss_kb("VmHWM")
    print(f"\nserver ({precision}), one stream, {n_prompt}-token prompt")
    print(f"{'steering':<18} {'tokens/s':>9} {'ITL ms':>8} {'overhead (paired median)':>25}")
    for name, r in singles.items():
        print(f"{name:<18} {r['tokens_per_s']:>9.2f} {r['itl_median_ms']:>8.1f} "
              f"{100 * r['overhead']:>24.1f}%")
    print(f"\n{'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}   (ms)")
    for r in conc:
        print(f"{r['clients']:>7} {r['tokens_per_s']:>8.2f} {r['ttft_p50_ms']:>9.0f} "
              f"{r['ttft_p99_ms']:>9.0f} {r['itl_p50_ms']:>8.0f} {r['itl_p99_ms']:>8.0f}")
    one = next((r for r in conc if r["clients"] == 1), None)
    eight = next((r for r in conc if r["clients"] == 8), None)
    single = singles["none"]["tokens_per_s"]
    llama_tps = paired["llama_cpp"] if paired else None
    llama_error = "skipped (--skip-llama-cpp)" if llama is None else llama.error
    summary = {
        "bench": "serve", "tokens": args.tokens, "prompt_tokens": n_prompt,
        "precision": precision,
        "llama_cpp_tokens_per_s": round(llama_tps, 3) if llama_tps else None,
        "llama_cpp_error": None if paired else llama_error,
        "side_by_side": paired,
        "plain_generate_fp32_tokens_per_s": round(reference, 3) if reference else None,
        "server_single_stream_tokens_per_s": round(single, 3),
        "server_vs_llama_cpp": round(paired["ratio"], 3) if paired else None,
        "server_vs_plain": round(single / reference, 3) if reference else None,
        "overhead_by_method": {m: round(r["overhead"], 4) for m, r in singles.items()},
        "concurrency": conc,
        "eight_vs_one": round(eight["tokens_per_s"] / one["tokens_per_s"], 3)
        if one and eight else None,
        "rss_ready_mb": round(rss_ready / 1024, 1),
        "rss_serving_max_mb": round(sampler.peak_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }
    overheads = summary["overhead_by_method"]
    worst = max(v for m, v in overheads.items() if m in METHODS and m != "none")
    worst_rows = max(v for m, v in overheads.items() if m in CONTROL_ROWS)
    checks = [
        ("one stream >= 0.7x llama.cpp", summary["server_vs_llama_cpp"],
         summary["server_vs_llama_cpp"] is not None and summary["server_vs_llama_cpp"] >= 0.7),
        ("steering overhead <= 3% per token (worst method)", f"{100 * worst:+.1f}%",
         worst <= 0.03),
        ("the same for targeted / list / conditional rows (issue 13)", f"{100 * worst_rows:+.1f}%",
         worst_rows <= 0.03),
        ("8 streams >= 4x one", summary["eight_vs_one"],
         summary["eight_vs_one"] is not None and summary["eight_vs_one"] >= 4),
        ("TTFT p50 <= 2 s at 8 streams", f"{eight['ttft_p50_ms']:.0f} ms" if eight else None,
         eight is not None and eight["ttft_p50_ms"] <= 2000),
        ("peak RSS <= 1.5 GB (VmHWM)", f"{summary['peak_rss_mb']:.0f} MB",
         summary["peak_rss_mb"] <= 1536),
        ("RSS while serving <= 1.5 GB", f"{summary['rss_serving_max_mb']:.0f} MB",
         summary["rss_serving_max_mb"] <= 1536),
    ]
    print("\ntargets")
    for name, value, ok in checks:
        print(f"  [{'met' if ok else 'NOT met':>7}] {name}: {value}")
    summary["targets_met"] = {name: bool(ok) for name, _, ok in checks}
    print(json.dumps(summary))
    return 0


def _served_precision(log_path: str) -> str:
    """The precision the server logged at load ("... in int8")."""
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if "loading model" in line and " in " in line:
            return line.rsplit(" in ", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
