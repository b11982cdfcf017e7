"""guidellm against the real server, beside bench/serve.py's concurrent figures for the same load
(issue 31, item 1). Prints a table and one JSON line.

    .venv/bin/python bench/guidellm.py [--streams 1,4,8] [--tokens 64] [--max-seconds 40]
                                       [--scenarios none,preset,mix] [--preset no-refusal]
                                       [--sweep] [--precision auto]

1. `guidellm==0.8.1` in its own virtual environment (testkit/venvs.py, under the cache root;
   `torch==2.13.0` is pinned beside it so pip takes the machine's CPU build, not a CUDA one);
2. the embedded model's tokenizer saved to a folder, given to guidellm as `--processor`
   (offline: no hub), and guidellm's synthetic text data: prompts of as many tokens as
   bench/serve.py's prompts have (their user message, before the chat template), `--tokens`
   output tokens (guidellm then sends `ignore_eos`, as bench/serve.py does);
3. the real server (`steer serve`, default precision: int8 on CPU);
4. per scenario — `none` (the base model name), `preset` (`<id>+<preset>`), `mix` (two guidellm
   processes at once, half the streams each, one per model name) — guidellm's `concurrent`
   profile at each stream count (`--max-seconds` each), then bench/serve.py's `concurrent()`
   (imported) at the same counts with the same steering: `--repeats` bursts of N streams;
5. with `--sweep`, guidellm's own sweep (synchronous, throughput, and constant rates between)
   on the base model, its table as guidellm prints it.

The two tools measure differently (docs/engine.md, "guidellm beside bench/serve.py"): guidellm
keeps N requests in flight for a fixed time (a new one starts when one ends), reports per-request
ITL = (last token − first token) / (tokens − 1) and output tokens/s over the whole benchmark, and
runs its own worker processes on the same cores; bench/serve.py starts N streams at the same
instant and waits for all, and its ITL percentiles are over every gap between streamed chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import serve  # noqa: E402
from steering.catalog import BUILTIN_PRESETS  # noqa: E402
from testkit.server import ServerProcess  # noqa: E402
from testkit.venvs import ensure_venv  # noqa: E402

GUIDELLM = ["guidellm==0.8.1", "torch==2.13.0"]


def guidellm_venv() -> tuple[Path, float | None]:
    """guidellm's venv: its bin folder, and its install's seconds when it was installed now."""
    return ensure_venv("guidellm", GUIDELLM)


def tokenizer_of(model: str | None):
    """The served model's tokenizer: a model folder's own, else the embedded model's."""
    from transformers import AutoTokenizer

    if model and Path(model).is_dir():
        return AutoTokenizer.from_pretrained(model)
    from steering.models import embedded

    return AutoTokenizer.from_pretrained(embedded.embedded_model_dir())


def save_tokenizer(tok, folder: Path) -> Path:
    """The tokenizer's files in `folder` (guidellm's processor: offline, no hub)."""
    tok.save_pretrained(folder)
    return folder


def user_prompt_tokens(tok) -> int:
    """Mean token count of bench/serve.py's prompts as user text (the chat template comes on
    top, on the server, for both tools)."""
    return round(statistics.mean(len(tok(p, add_special_tokens=False)["input_ids"])
                                 for p in serve.PROMPTS))


def scenario(url: str, model: str, processor: Path, prompt_tokens: int, tokens: int,
             profile: dict, seconds: float, out: Path) -> dict:
    """A guidellm scenario file's content (its `spec`: backend, profile, data, limits)."""
    return {"metadata": {"name": f"steer-{model}"}, "spec": {
        "backend": {"kind": "openai_http", "target": url, "model": model,
                    "request_format": "/v1/chat/completions", "timeout": 900},
        "tokenizer": {"kind": "huggingface_auto", "model": str(processor)},
        "profile": profile,
        "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens,
                  "output_tokens": tokens}],
        "constraints": [{"kind": "max_duration", "seconds": seconds}],
        "outputs": [{"kind": "json", "path": str(out)}],
    }}


def start_guidellm(bin_dir: Path, spec: dict, work: Path, name: str) -> subprocess.Popen:
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    log = open(work / f"{name}.log", "w")
    return subprocess.Popen([str(bin_dir / "guidellm"), "run", "--scenario",
                             str(path), "--disable-console-interactive"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=work,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home()),
                                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                 "TRANSFORMERS_OFFLINE": "1"})


def wait(procs: list[subprocess.Popen], work: Path, names: list[str]) -> float:
    """Wait for guidellm processes; their CPU seconds (user + system, children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, name in zip(procs, names):
        if p.wait() != 0:
            raise RuntimeError(f"guidellm {name} failed:\n"
                               + (work / f"{name}.log").read_text()[-3000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _stat(metrics: dict, name: str, field: str, status: str = "successful") -> float | None:
    value = metrics.get(name, {}).get(status, {})
    return value.get(field) if value else None


def read_benchmarks(path: Path) -> list[dict]:
    """One row per benchmark of a guidellm JSON report: streams, completed requests, TTFT /
    ITL median and p99 (ms, completed requests), and output tokens/s over all requests — those
    still running when the benchmark's time ran out included, as guidellm's own throughput
    table counts them."""
    report = json.loads(path.read_text())
    rows = []
    for b in report["benchmarks"]:
        m = b["metrics"]
        strategy = b.get("config", {}).get("strategy", {})
        totals = m.get("request_totals", {})
        rows.append({
            "strategy": strategy.get("type_"),
            "streams": strategy.get("streams"),
            "rate": strategy.get("rate"),
            "requests": totals.get("successful"),
            "incomplete": totals.get("incomplete"),
            "ttft_p50_ms": _stat(m, "time_to_first_token_ms", "median"),
            "ttft_p99_ms": (_stat(m, "time_to_first_token_ms", "percentiles") or {}).get("p99"),
            "itl_p50_ms": _stat(m, "inter_token_latency_ms", "median"),
            "itl_p99_ms": (_stat(m, "inter_token_latency_ms", "percentiles") or {}).get("p99"),
            "tokens_per_s": _stat(m, "output_tokens_per_second", "mean", "total"),
            "tokens_per_s_completed": _stat(m, "output_tokens_per_second", "mean"),
            "output_tokens_mean": _stat(m, "output_token_count", "mean"),
            "prompt_tokens_mean": _stat(m, "prompt_token_count", "mean"),
            "duration_s": b.get("duration"),
        })
    return rows


def steering_of(name: str) -> dict | None:
    """The `steering` body a preset stands for (bench/serve.py sends steering in the body)."""
    if name == "none":
        return None
    p = dict(BUILTIN_PRESETS[name])
    p.pop("description", None)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=40.0,
                    help="guidellm's duration per benchmark (per stream count)")
    ap.add_argument("--repeats", type=int, default=2, help="bench/serve.py bursts per level")
    ap.add_argument("--scenarios", default="none,preset,mix")
    ap.add_argument("--preset", default="no-refusal")
    ap.add_argument("--sweep", action="store_true", help="also guidellm's sweep profile")
    ap.add_argument("--sweep-size", type=int, default=4)
    ap.add_argument("--model", default=None, help="the server's model (default: embedded)")
    ap.add_argument("--precision", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    scenarios = args.scenarios.split(",")

    bin_dir, install_s = guidellm_venv()
    work = Path(tempfile.mkdtemp(prefix="guidellm-"))
    tok = tokenizer_of(args.model)
    processor = save_tokenizer(tok, work / "tokenizer")
    n_prompt = user_prompt_tokens(tok)
    server_args = ["--precision", args.precision] if args.precision else []
    if args.model:
        server_args += ["--model", args.model]
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    with ServerProcess(*server_args, env={"PYTHONPATH": str(ROOT)},
                       log_path=str(work / "server.log")) as server:
        server.wait_ready()
        base = server.served_model()
        serve.MODEL["id"] = base
        names = {"none": [base], "preset": [f"{base}+{args.preset}"],
                 "mix": [base, f"{base}+{args.preset}"]}
        bodies = {"none": [None], "preset": [steering_of(args.preset)],
                  "mix": [None, steering_of(args.preset)]}
        asyncio.run(_warm(server.url))  # a fresh server's first request is slow
        for sc in scenarios:
            models = names[sc]
            # guidellm: one process per model name, the streams split between them
            procs, tags = [], []
            for j, model in enumerate(models):
                streams = [max(1, s // len(models)) for s in levels]
                tag = f"{sc}-{j}"
                spec = scenario(server.url, model, processor, n_prompt, args.tokens,
                                {"kind": "concurrent", "streams": streams},
                                args.max_seconds, work / f"{tag}-report.json")
                procs.append(start_guidellm(bin_dir, spec, work, tag))
                tags.append(tag)
            t0 = time.perf_counter()
            cpu = wait(procs, work, tags)
            wall = time.perf_counter() - t0
            reports = [read_benchmarks(work / f"{t}-report.json") for t in tags]
            # bench/serve.py: the same stream counts, bursts, the same steering per stream
            def pick(i: int, _rng, b=bodies[sc]) -> dict | None:
                return b[i % len(b)]

            for k, level in enumerate(levels):
                ours = asyncio.run(serve.concurrent(server.url, level, args.tokens,
                                                    random.Random(0), args.repeats, pick))
                parts = [rep[k] for rep in reports]
                theirs = {
                    "requests": sum(p["requests"] or 0 for p in parts),
                    "ttft_p50_ms": statistics.mean(p["ttft_p50_ms"] for p in parts),
                    "itl_p50_ms": statistics.mean(p["itl_p50_ms"] for p in parts),
                    "tokens_per_s": sum(p["tokens_per_s"] for p in parts),
                    "output_tokens_mean": statistics.mean(p["output_tokens_mean"]
                                                          for p in parts),
                    "prompt_tokens_mean": statistics.mean(p["prompt_tokens_mean"]
                                                          for p in parts),
                }
                rows.append({"scenario": sc, "streams": level, "guidellm": theirs,
                             "serve_py": ours, "guidellm_cpu_s": round(cpu, 1),
                             "guidellm_wall_s": round(wall, 1)})
                print(f"{sc} x{level}: guidellm {theirs['tokens_per_s']:.1f} tok/s, "
                      f"serve.py {ours['tokens_per_s']:.1f} tok/s", flush=True)
        if args.sweep:
            spec = scenario(server.url, base, processor, n_prompt, args.tokens,
                            {"kind": "sweep", "sweep_size": args.sweep_size},
                            args.max_seconds, work / "sweep-report.json")
            wait([start_guidellm(bin_dir, spec, work, "sweep")], work, ["sweep"])
            sweep_rows = read_benchmarks(work / "sweep-report.json")
            print((work / "sweep.log").read_text()[-6000:])

    print(f"\nguidellm {GUIDELLM[0].split('==')[1]} beside bench/serve.py: {n_prompt}-token user "
          f"prompt, {args.tokens} output tokens (ignore_eos), preset {args.preset}; "
          f"{args.max_seconds:g} s per guidellm level, {args.repeats} serve.py bursts")
    head = (f"{'scenario':<8} {'N':>3} | {'gl tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8} "
            f"{'reqs':>5} | {'sp tok/s':>8} {'TTFT p50':>9} {'ITL p50':>8}   (ms)")
    print(head)
    for r in rows:
        g, s = r["guidellm"], r["serve_py"]
        print(f"{r['scenario']:<8} {r['streams']:>3} | {g['tokens_per_s']:>8.1f} "
              f"{g['ttft_p50_ms']:>9.0f} {g['itl_p50_ms']:>8.1f} {g['requests']:>5} | "
              f"{s['tokens_per_s']:>8.1f} {s['ttft_p50_ms']:>9.0f} {s['itl_p50_ms']:>8.1f}")
    print(json.dumps({"bench": "guidellm", "guidellm": GUIDELLM[0], "venv_install_s": install_s,
                      "prompt_tokens_user": n_prompt, "tokens": args.tokens,
                      "precision": args.precision or "auto", "rows": rows,
                      "sweep": sweep_rows, "work": str(work)}))
    return 0


async def _warm(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await serve.stream_one(client, url, None, serve.PROMPTS[0], 4)


if __name__ == "__main__":
    raise SystemExit(main())
