"""Serving benchmark on the embedded model (issue 4). One run prints a table and one JSON line.

    .venv/bin/python bench/serve.py [--tokens 64] [--concurrency 1,4,8,16]

1. plain transformers `generate`, one greedy stream, no server: the reference tokens/s;
2. the real server process, one stream: unsteered and each method, with the steering overhead
   per decoded token (median inter-token latency vs unsteered);
3. 1, 4, 8, 16 concurrent streaming clients with methods mixed at random: aggregate output
   tokens/s, p50/p99 time to first token and inter-token latency;
4. the server's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testkit.server import ServerProcess  # noqa: E402

METHODS = ["none", "actadd", "ablate", "ace", "inlp_null", "inlp_flip"]
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash map works, in detail.",
    "Describe the water cycle for a school class.",
    "Write a Python function that merges two sorted lists, and explain it.",
]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def plain_generate(tokens: int, repeats: int) -> float:
    import torch

    from steering import load_model
    from steering.interventions.activations import encode_chats

    lm = load_model("embedded", device="cpu")
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


MODEL = {"id": "qwen2.5-coder-0.5b-instruct"}


async def stream_one(client: httpx.AsyncClient, url: str, method: str, prompt: str,
                     tokens: int) -> dict:
    body = {"model": MODEL["id"], "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if method != "none":
        body["steering"] = {"method": method, "strength": 0.0 if method == "ace" else 1.0}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    n_out = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": stamps[0] - t0 if stamps else end - t0,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": n_out, "seconds": end - t0}


async def single_streams(url: str, tokens: int, repeats: int) -> dict[str, dict]:
    out = {}
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_one(client, url, "none", PROMPTS[0], 4)  # warm-up
        for method in METHODS:
            runs = [await stream_one(client, url, method, PROMPTS[0], tokens)
                    for _ in range(repeats)]
            itl = [x for r in runs for x in r["itl"]]
            out[method] = {
                "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in runs),
                "itl_median_ms": 1000 * statistics.median(itl),
            }
    return out


async def concurrent(url: str, clients: int, tokens: int, rng: random.Random) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*[
            stream_one(c, url, rng.choice(METHODS), PROMPTS[i % len(PROMPTS)], tokens)
            for i in range(clients)])
        wall = time.perf_counter() - t0
    itl = [x for r in runs for x in r["itl"]]
    ttft = [r["ttft"] for r in runs]
    return {"clients": clients, "tokens_per_s": sum(r["tokens"] for r in runs) / wall,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    reference = plain_generate(args.tokens, args.repeats)
    print(f"plain transformers generate, 1 greedy stream: {reference:.2f} tokens/s")
    with ServerProcess(log_path="/tmp/bench-serve.log") as server:
        server.wait_ready()
        MODEL["id"] = server.served_model()
        rss_start = server.rss_kb()
        singles = asyncio.run(single_streams(server.url, args.tokens, args.repeats))
        base = singles["none"]["itl_median_ms"]
        print(f"\n{'method':<10} {'tokens/s':>9} {'ITL ms':>8} {'overhead':>9}")
        for method, r in singles.items():
            r["overhead"] = r["itl_median_ms"] / base - 1
            print(f"{method:<10} {r['tokens_per_s']:>9.2f} {r['itl_median_ms']:>8.1f} "
                  f"{100 * r['overhead']:>8.1f}%")
        levels = [int(x) for x in args.concurrency.split(",")]
        conc = [asyncio.run(concurrent(server.url, n, args.tokens, rng)) for n in levels]
        print(f"\n{'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8}   (ms)")
        for r in conc:
            print(f"{r['clients']:>7} {r['tokens_per_s']:>8.2f} {r['ttft_p50_ms']:>9.0f} "
                  f"{r['ttft_p99_ms']:>9.0f} {r['itl_p50_ms']:>8.0f} {r['itl_p99_ms']:>8.0f}")
        peak_kb = server.rss_kb("VmHWM")
    one = next((r for r in conc if r["clients"] == 1), None)
    eight = next((r for r in conc if r["clients"] == 8), None)
    summary = {
        "bench": "serve", "tokens": args.tokens,
        "plain_generate_tokens_per_s": round(reference, 3),
        "server_single_stream_tokens_per_s": round(singles["none"]["tokens_per_s"], 3),
        "server_vs_plain": round(singles["none"]["tokens_per_s"] / reference, 3),
        "overhead_by_method": {m: round(r["overhead"], 4) for m, r in singles.items()},
        "concurrency": conc,
        "eight_vs_one": round(eight["tokens_per_s"] / one["tokens_per_s"], 3)
        if one and eight else None,
        "rss_start_mb": round(rss_start / 1024, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
    }
    print(f"\nserver one stream vs plain generate: {summary['server_vs_plain']:.2f}x; "
          f"8 clients vs 1: {summary['eight_vs_one']}x; peak RSS {summary['peak_rss_mb']} MB")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
