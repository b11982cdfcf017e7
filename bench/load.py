"""Load, soak and fault runs on loopback: many concurrent clients, mixed methods, streamed and
not, some disconnecting early, some refused by policy or rate limit.

    python bench/load.py                      # 64 clients, 180 s, embedded model
    python bench/load.py --soak               # 64 clients, 10 minutes
    python bench/load.py --clients 8 --duration 20 --max-requests 200   # a quick smoke run
    python bench/load.py --fault              # SIGKILL mid-load, restart, check audit + restart

Starts `steer serve` on a free loopback port with three API keys: `load` (every method, may lower
refusal, no rate limit), `limited` (2 requests per minute: its 429s are intended) and `denied`
(the default policy: its requests that lower refusal get intended 403s). Before the load, each
(prompt, method) pair is run alone, greedily; under load every completed greedy response is
compared with its solo run. Prints requests by outcome, unintended errors (must be 0), responses
that differ from their solo run (must be 0), p50/p99 latency, and the server's RSS after warm-up
and at the end (growth under 10%), then one JSON line. Exit status 1 when a check fails.

`--fault`: the same load with an audit log; after `--kill-after` seconds the server gets SIGKILL,
is started again on the same model cache, and the run reports the seconds until `/readyz` is 200
(goal ≤ 15) and whether every audit line parses as one JSON object (no torn lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.security.auth import hash_key  # noqa: E402
from server.security.policy import LOWERING_METHODS as LOWERING  # noqa: E402
from steering.catalog import METHODS  # noqa: E402
from testkit.server import RssSampler, ServerProcess  # noqa: E402

PROMPTS = ["Write a haiku about the sea.", "How do I bake bread?", "Tell me a short story.",
           "Explain what a prime number is.", "Give me three tips for sleeping well."]
KEYS = {"keys": [{"id": "load", "sha256": hash_key("load-key"), "methods": "*",
                  "lower_refusal": True},
                 {"id": "limited", "sha256": hash_key("limited-key"), "methods": "*",
                  "lower_refusal": True, "requests_per_minute": 2},
                 {"id": "denied", "sha256": hash_key("denied-key")}]}


def _body(model: str, prompt: str, method: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "steering": {"method": method, "strength": 1.0}}


def _error_kind(r: httpx.Response) -> str:
    """"http_429" plus the error's code when the body names one ("http_429:queue_full")."""
    try:
        code = r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return f"http_{r.status_code}" + (f":{code}" if code else "")


async def _once(client: httpx.AsyncClient, url: str, key: str, body: dict,
                disconnect: bool) -> tuple[str, str | None]:
    """(outcome, text): outcome "ok", "disconnected", or an error kind like "http_429"."""
    headers = {"Authorization": f"Bearer {key}"}
    if not body["stream"]:
        r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        if r.status_code != 200:
            return _error_kind(r), None
        return "ok", r.json()["choices"][0]["message"]["content"]
    parts: list[str] = []
    async with aconnect_sse(client, "POST", f"{url}/v1/chat/completions", json=body,
                            headers=headers) as source:
        r = source.response
        if r.status_code != 200:
            await r.aread()
            return _error_kind(r), None
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                return "ok", "".join(parts)
            event = json.loads(sse.data)
            if "error" in event:
                return "stream_error", None
            for choice in event.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
            if disconnect and parts:
                return "disconnected", None  # leaving the block closes the connection
    return "stream_truncated", None


async def _run(url: str, model: str, args, loaded: asyncio.Event | None = None) -> dict:
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
                       "outcomes": Counter()}
        if loaded is not None:
            loaded.set()  # the solo runs are done: the load starts now
        stats["load_start"] = time.monotonic()
        deadline = time.monotonic() + args.duration
        budget = [args.max_requests]
        rng = random.Random(args.seed)

        async def worker(w: int) -> None:
            while time.monotonic() < deadline and budget[0] > 0:
                budget[0] -= 1
                prompt, method = rng.choice(PROMPTS), rng.choice(METHODS)
                stream = rng.random() < 0.5
                disconnect = stream and rng.random() < args.disconnect_fraction
                kind = rng.random()
                limited, denied = kind < 0.02, 0.02 <= kind < 0.04
                if denied:
                    method = rng.choice(LOWERING)
                key = "limited-key" if limited else "denied-key" if denied else "load-key"
                start = time.perf_counter()
                try:
                    outcome, text = await _once(client, url, key, _body(
                        model, prompt, method, args.max_tokens, stream), disconnect)
                except httpx.HTTPError as exc:
                    outcome, text = f"transport_{type(exc).__name__}", None
                stats["done"] += 1
                if outcome == "ok" and not denied:
                    stats["latency"].append(time.perf_counter() - start)
                    if text != solo[(prompt, method)]:
                        stats["mismatch"] += 1
                    stats["outcomes"]["ok"] += 1
                elif outcome == "disconnected":
                    stats["outcomes"]["disconnected"] += 1
                elif outcome.startswith("http_429") and limited:
                    stats["outcomes"]["rate_limited (intended 429)"] += 1
                elif outcome == "ok" and limited:
                    stats["outcomes"]["ok"] += 1
                elif outcome.startswith("http_403") and denied:
                    stats["outcomes"]["policy_denied (intended 403)"] += 1
                else:
                    stats["outcomes"][f"unintended {outcome}"] += 1
                    stats["errors"][outcome] += 1

        await asyncio.gather(*[worker(w) for w in range(args.clients)])
        return stats


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=180.0, help="seconds of load (bound)")
    ap.add_argument("--soak", action="store_true", help="10 minutes (--duration 600)")
    ap.add_argument("--fault", action="store_true", help="SIGKILL mid-load, restart, check")
    ap.add_argument("--kill-after", type=float, default=30.0, help="--fault: seconds of load")
    ap.add_argument("--max-requests", type=int, default=5000, help="request count (bound)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--disconnect-fraction", type=float, default=0.2)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of load before the RSS baseline (at most half the run)")
    ap.add_argument("--model", default=None, help="passed to steer serve (default: embedded)")
    args = ap.parse_args()
    if args.soak:
        args.duration, args.max_requests = max(args.duration, 600.0), max(args.max_requests,
                                                                           1_000_000)
    return args


def _server(tmp: Path, args, name: str = "server") -> ServerProcess:
    keys = tmp / "keys.json"
    keys.write_text(json.dumps(KEYS))
    extra = ["--model", args.model] if args.model else []
    env = {"STEER_KEYS_FILE": str(keys), "STEER_ACCESS_LOG": "0",
           "STEER_AUDIT_LOG": str(tmp / "audit.jsonl"),
           "STEER_MAX_QUEUE": str(max(64, args.clients * 2)),
           # one tenant drives the load: its waiting generations may fill the whole queue (the
           # per-key share, default half, is for fairness between keys: tests/server/test_admission.py)
           "STEER_MAX_QUEUE_PER_KEY": str(max(64, args.clients * 2))}
    return ServerProcess(*extra, env=env, log_path=str(tmp / f"{name}.log"))


def _warm_up(srv: ServerProcess, args) -> str:
    model = httpx.get(f"{srv.url}/v1/models", timeout=10,
                      headers={"Authorization": "Bearer load-key"}).json()["data"][0]["id"]
    # Weights are memory-mapped and fault in on first use, and every method's tensors get built:
    # warm up first, so the RSS baseline measures growth under load, not loading.
    for method in METHODS:
        body = {"model": model, "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[0]}],
                "steering": {"method": method}}
        httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=args.request_timeout,
                   headers={"Authorization": "Bearer load-key"}).raise_for_status()
    return model


def _audit_lines(path: Path) -> tuple[int, int]:
    """(lines, lines that are not one whole JSON object)."""
    if not path.exists():
        return 0, 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = 1 if lines and lines[-1] else 0  # no newline at the end: a torn last line
    bad = torn
    for line in lines[:-1]:
        try:
            if not isinstance(json.loads(line), dict):
                bad += 1
        except ValueError:
            bad += 1
    return len(lines) - 1 + torn, bad


def fault_run(args) -> int:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        srv = _server(tmp, args)
        try:
            srv.wait_ready()
            model = _warm_up(srv, args)

            async def load_then_kill() -> dict:
                loaded = asyncio.Event()
                task = asyncio.create_task(_run(srv.url, model, args, loaded))
                await loaded.wait()
                await asyncio.sleep(args.kill_after)
                os.kill(srv.proc.pid, signal.SIGKILL)
                try:
                    return await asyncio.wait_for(task, 120)
                except Exception as exc:  # the clients see the connection drop
                    return {"error": type(exc).__name__}

            args.duration = args.kill_after + 60
            stats = asyncio.run(load_then_kill())
            srv.proc.wait(30)
        finally:
            srv.stop()
        lines_before, bad_before = _audit_lines(tmp / "audit.jsonl")
        t0 = time.monotonic()
        again = _server(tmp, args, "restart")
        try:
            again.wait_ready()
            ready_s = time.monotonic() - t0
            r = httpx.post(f"{again.url}/v1/chat/completions", timeout=args.request_timeout,
                           headers={"Authorization": "Bearer load-key"},
                           json={"model": model, "max_tokens": 2, "temperature": 0,
                                 "messages": [{"role": "user", "content": PROMPTS[0]}]})
            serves = r.status_code == 200
        finally:
            again.stop()
        lines, bad = _audit_lines(tmp / "audit.jsonl")
    done = stats.get("done", 0) if isinstance(stats, dict) else 0
    print(f"load before the kill:   {done} requests in {args.kill_after:.0f} s "
          f"({args.clients} clients)")
    print(f"audit lines at the kill: {lines_before} ({bad_before} torn or unparsable)")
    print(f"audit lines in the end:  {lines} ({bad} torn or unparsable)")
    print(f"ready again after:      {ready_s:.1f} s (goal ≤ 15 s); serves: {serves}")
    ok = bad == 0 and bad_before == 0 and lines_before > 0 and ready_s <= 15 and serves
    print("PASS" if ok else "FAIL")
    print(json.dumps({"bench": "load_fault", "requests_before_kill": done,
                      "audit_lines": lines, "audit_bad_lines": bad, "ready_s": round(ready_s, 2),
                      "serves_after_restart": serves, "pass": ok}))
    return 0 if ok else 1


def main() -> int:
    args = _args()
    if args.fault:
        return fault_run(args)
    with tempfile.TemporaryDirectory() as tmp:
        with _server(Path(tmp), args) as srv:
            srv.wait_ready()
            model = _warm_up(srv, args)
            rss_idle = srv.rss_kb()
            t0 = time.monotonic()
            with RssSampler(srv, every_s=5.0) as series:
                stats = asyncio.run(_run(srv.url, model, args))
            elapsed = time.monotonic() - t0
            rss_end = srv.rss_kb()
            audit_lines, audit_bad = _audit_lines(Path(tmp) / "audit.jsonl")
    lat = stats["latency"]
    # "After warm-up": the RSS once the load has run `--warmup` seconds (the batch has reached
    # its full width and its prefill chunks their full length, so the working set is there);
    # growth from there to the end is what a leak would show.
    warm_at = stats["load_start"] + min(args.warmup, args.duration / 2)
    rss_start = next((kb for t, kb in series.samples if t >= warm_at), rss_idle)
    growth = (rss_end - rss_start) / max(rss_start, 1)
    print(f"requests done:        {stats['done']} in {elapsed:.1f} s "
          f"({args.clients} clients)")
    print("requests by outcome:")
    for outcome, count in sorted(stats["outcomes"].items()):
        print(f"  {outcome:<30} {count}")
    print(f"unintended errors:    {sum(stats['errors'].values())}")
    print(f"differ from solo run: {stats['mismatch']}")
    print(f"latency p50 / p99:    {_pct(lat, 0.5):.3f} s / {_pct(lat, 0.99):.3f} s"
          + (f" (mean {statistics.mean(lat):.3f} s)" if lat else ""))
    print(f"server RSS:           {rss_idle / 1024:.0f} MiB idle after the warm-up requests; "
          f"under load {rss_start / 1024:.0f} MiB after {args.warmup:.0f} s → "
          f"{rss_end / 1024:.0f} MiB at the end ({growth:+.1%})")
    minutes = {}
    for t, kb in series.samples:
        if t >= stats["load_start"]:
            minutes.setdefault(int((t - stats["load_start"]) // 60), kb)
    print("RSS by minute of load: " + "  ".join(f"{m}: {kb / 1024:.0f}"
                                                 for m, kb in sorted(minutes.items())))
    print(f"audit lines:          {audit_lines} ({audit_bad} unparsable)")
    ok = not stats["errors"] and stats["mismatch"] == 0 and growth < 0.10 and audit_bad == 0
    print("PASS" if ok else "FAIL")
    print(json.dumps({"bench": "load", "clients": args.clients,
                      "duration_s": round(elapsed, 1), "requests": stats["done"],
                      "outcomes": dict(stats["outcomes"]),
                      "unintended_errors": sum(stats["errors"].values()),
                      "mismatch": stats["mismatch"], "p50_s": round(_pct(lat, 0.5), 3),
                      "p99_s": round(_pct(lat, 0.99), 3), "rss_idle_mib": rss_idle // 1024,
                      "rss_start_mib": rss_start // 1024,
                      "rss_by_minute_mib": {m: kb // 1024 for m, kb in sorted(minutes.items())},
                      "rss_end_mib": rss_end // 1024, "rss_growth": round(growth, 4),
                      "audit_lines": audit_lines, "audit_bad_lines": audit_bad, "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
