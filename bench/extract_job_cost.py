"""What an extraction job costs the serving streams (issue 30): one stream's decode speed on the
real server before, during and after an extraction job. One run prints a table and one JSON line.

    .venv/bin/python bench/extract_job_cost.py [--share 0.5] [--n 32] [--tokens 32]

A `steer serve` process (the embedded model at the CPU default precision, its extraction jobs
on a full-precision copy) answers streamed greedy chats of `--tokens` tokens (ignore_eos)
back to back; decode speed = (tokens − 1) / (last token − first token). Phase "before": `--rounds`
chats; then an extraction job (`--dataset`, `--n` prompts per class, `STEER_EXTRACT_SHARE =
--share`) is submitted and chats run until it has finished ("during"); then `--rounds` chats
again ("after"). The table gives each phase's median tokens/s and the during/idle ratio (idle:
before and after together), and the job's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stream_speed(url: str, headers: dict, tokens: int) -> float:
    import httpx

    body = {"messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    stamps = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--dataset", default="casual")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import httpx

    from testkit.server import ServerProcess

    env = {"STEER_DEVICE": "cpu", "STEER_EXTRACT_SHARE": str(args.share)}
    speeds: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    with ServerProcess(env=env) as server:
        server.wait_ready()
        headers: dict = {}
        _stream_speed(server.url, headers, 4)  # warm-up
        for _ in range(args.rounds):
            speeds["before"].append(_stream_speed(server.url, headers, args.tokens))
        r = httpx.post(f"{server.url}/v1/steering/packs/extract", timeout=60, json={
            "name": "bench-job", "dataset": args.dataset, "n": args.n})
        r.raise_for_status()
        job_id, started = r.json()["id"], time.monotonic()
        while True:
            speeds["during"].append(_stream_speed(server.url, headers, args.tokens))
            job = httpx.get(f"{server.url}/v1/steering/packs/extract/{job_id}",
                            timeout=60).json()
            if job["status"] not in ("queued", "running"):
                break
        job_s = time.monotonic() - started
        for _ in range(args.rounds):
            speeds["after"].append(_stream_speed(server.url, headers, args.tokens))
    idle = statistics.median(speeds["before"] + speeds["after"])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = med["during"] / idle if idle else float("nan")
    print(f"one stream, {args.tokens} tokens per chat; job: {args.dataset}, {args.n} per class, "
          f"share {args.share}: {job['status']} in {job_s:.0f} s")
    print(f"{'phase':<8} {'chats':>5} {'tok/s':>8}")
    for k, v in speeds.items():
        print(f"{k:<8} {len(v):>5} {med[k]:>8.2f}")
    print(f"during / idle: {ratio:.3f} (the job costs the stream {100 * (1 - ratio):.1f}% of its "
          "speed while it runs)")
    print(json.dumps({"bench": "extract_job_cost", "share": args.share, "dataset": args.dataset,
                      "n": args.n, "tokens": args.tokens, "job_status": job["status"],
                      "job_s": round(job_s, 1), "tok_s": {k: round(v, 3) for k, v in med.items()},
                      "chats": {k: len(v) for k, v in speeds.items()},
                      "during_over_idle": round(ratio, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
