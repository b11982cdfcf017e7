"""Load and soak test on loopback (issue 7 item 5): many concurrent clients, mixed methods,
streamed and not, some disconnecting early, bounded in time and in request count.

    python -m bench.load                      # 64 clients, 180 s, embedded model
    python -m bench.load --clients 8 --duration 20 --max-requests 200   # a quick smoke run

Starts `steer serve` on a free loopback port with two API keys: `load` (every method, no rate
limit) and `limited` (2 requests per minute: its 429s are the only intended errors). Before the
load, each (prompt, method) pair is run alone, greedily; under load every completed greedy
response is compared with its solo run. Prints requests done, errors by kind, responses that
differ from their solo run (must be 0), p50/p99 latency, and the server's RSS at start and end
(growth under 10%). Exit status 1 when any of those checks fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.security.auth import hash_key  # noqa: E402
from testkit.server import ServerProcess  # noqa: E402

METHODS = ["none", "actadd", "ace", "ablate", "inlp_null", "inlp_flip"]
PROMPTS = ["Write a haiku about the sea.", "How do I bake bread?", "Tell me a short story.",
           "Explain what a prime number is.", "Give me three tips for sleeping well."]
KEYS = {"keys": [{"id": "load", "sha256": hash_key("load-key"), "methods": "*"},
                 {"id": "limited", "sha256": hash_key("limited-key"), "methods": "*",
                  "requests_per_minute": 2}]}


def _body(model: str, prompt: str, method: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "steering": {"method": method, "strength": 1.0}}


async def _once(client: httpx.AsyncClient, url: str, key: str, body: dict,
                disconnect: bool) -> tuple[str, str | None]:
    """(outcome, text): outcome "ok", "disconnected", or an error kind like "http_429"."""
    headers = {"Authorization": f"Bearer {key}"}
    if not body["stream"]:
        r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        if r.status_code != 200:
            return f"http_{r.status_code}", None
        return "ok", r.json()["choices"][0]["message"]["content"]
    parts: list[str] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                             headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return f"http_{r.status_code}", None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return "ok", "".join(parts)
            event = json.loads(data)
            if "error" in event:
                return "stream_error", None
            for choice in event.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
            if disconnect and parts:
                return "disconnected", None  # leaving the block closes the connection
    return "stream_truncated", None


async def _run(url: str, model: str, args) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 8)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        solo: dict[tuple[str, str], str] = {}
        for prompt in PROMPTS:
            for method in METHODS:
                outcome, text = await _once(client, url, "load-key",
                                            _body(model, prompt, method, args.max_tokens,
                                                  False), False)
                if outcome != "ok":
                    raise RuntimeError(f"solo run failed: {outcome}")
                solo[(prompt, method)] = text or ""
        stats: dict = {"done": 0, "errors": Counter(), "mismatch": 0, "latency": [],
                       "intended_429": 0, "disconnected": 0}
        deadline = time.monotonic() + args.duration
        budget = [args.max_requests]
        rng = random.Random(args.seed)

        async def worker(w: int) -> None:
            while time.monotonic() < deadline and budget[0] > 0:
                budget[0] -= 1
                prompt, method = rng.choice(PROMPTS), rng.choice(METHODS)
                stream = rng.random() < 0.5
                disconnect = stream and rng.random() < args.disconnect_fraction
                limited = rng.random() < 0.02
                key = "limited-key" if limited else "load-key"
                start = time.perf_counter()
                try:
                    outcome, text = await _once(client, url, key, _body(
                        model, prompt, method, args.max_tokens, stream), disconnect)
                except httpx.HTTPError as exc:
                    outcome, text = f"transport_{type(exc).__name__}", None
                stats["done"] += 1
                if outcome == "ok":
                    stats["latency"].append(time.perf_counter() - start)
                    if text != solo[(prompt, method)]:
                        stats["mismatch"] += 1
                elif outcome == "disconnected":
                    stats["disconnected"] += 1
                elif outcome == "http_429" and limited:
                    stats["intended_429"] += 1
                else:
                    stats["errors"][outcome] += 1

        await asyncio.gather(*[worker(w) for w in range(args.clients)])
        return stats


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (bound)")
    ap.add_argument("--max-requests", type=int, default=5000, help="request count (bound)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--disconnect-fraction", type=float, default=0.2)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="passed to steer serve (default: embedded)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps(KEYS))
        extra = ["--model", args.model] if args.model else []
        env = {"STEER_KEYS_FILE": str(keys), "STEER_ACCESS_LOG": "0",
               "STEER_MAX_QUEUE": str(max(64, args.clients * 2))}
        with ServerProcess(*extra, env=env, log_path=str(Path(tmp) / "server.log")) as srv:
            srv.wait_ready()
            model = httpx.get(f"{srv.url}/v1/models", timeout=10,
                              headers={"Authorization": "Bearer load-key"}).json()["data"][0]["id"]
            # Warm up first (weights are memory-mapped and fault in on first use; every method's
            # tensors get built), so the RSS baseline measures growth under load, not loading.
            for method in METHODS:
                body = {"model": model, "max_tokens": 2, "temperature": 0,
                        "messages": [{"role": "user", "content": PROMPTS[0]}],
                        "steering": {"method": method}}
                httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=args.request_timeout,
                           headers={"Authorization": "Bearer load-key"}).raise_for_status()
            rss_start = srv.rss_kb()
            t0 = time.monotonic()
            stats = asyncio.run(_run(srv.url, model, args))
            elapsed = time.monotonic() - t0
            rss_end = srv.rss_kb()
    lat = stats["latency"]
    growth = (rss_end - rss_start) / max(rss_start, 1)
    print(f"requests done:        {stats['done']} in {elapsed:.1f} s "
          f"({args.clients} clients)")
    print(f"completed ok:         {len(lat)}; disconnected early: {stats['disconnected']}; "
          f"intended 429s: {stats['intended_429']}")
    print(f"errors by kind:       {dict(stats['errors']) or 'none'}")
    print(f"differ from solo run: {stats['mismatch']}")
    print(f"latency p50 / p99:    {_pct(lat, 0.5):.3f} s / {_pct(lat, 0.99):.3f} s"
          + (f" (mean {statistics.mean(lat):.3f} s)" if lat else ""))
    print(f"server RSS:           {rss_start / 1024:.0f} MiB → {rss_end / 1024:.0f} MiB "
          f"({growth:+.1%})")
    ok = not stats["errors"] and stats["mismatch"] == 0 and growth < 0.10
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
