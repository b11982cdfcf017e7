"""The native engine's thread-count tuner (`STEER_TUNE_THREADS`, server/engine/threads.py), off
vs on, on idle cores and beside a CPU hog (a 2-thread fp32 matmul loop at nice 10, as a
neighbouring job would be).

    .venv/bin/python bench/tune_threads.py [--rounds 3] [--reverse-start] [--neighbour CMD]

Both servers (the default int8 model) stay loaded; each round measures off and on in turn (the
order alternates), at 1 stream × 64 tokens and 8 streams × 48 tokens (`ignore_eos`). Prints a
table of median output tokens/s with every round's value and on ÷ off, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from testkit.server import ServerProcess  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."
HOG = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True: a @ a"
CELLS = ((1, 64), (8, 48))  # (streams, tokens)


def tokens_per_s(server: ServerProcess, streams: int, tokens: int) -> float:
    def one(_: int) -> int:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=900, json={
            "model": server.served_model(), "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "messages": [{"role": "user", "content": PROMPT}]})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        n = sum(pool.map(one, range(streams)))
    return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds between starting the neighbour and measuring")
    ap.add_argument("--neighbour", default=None, metavar="CMD",
                    help="the busy phase's neighbour, a shell command run at nice 10 "
                         "(default: the 2-thread matmul loop)")
    ap.add_argument("--reverse-start", action="store_true",
                    help="start the tuned server first (a later-started server can run a few "
                         "percent faster: run both orders and average)")
    args = ap.parse_args()
    servers: dict[str, ServerProcess] = {}
    runs: dict[str, list[float]] = {}
    with ExitStack() as stack:  # both servers stop at the end, or on any failure
        order = (("off", "0"), ("on", "1"))
        for name, tune in (order[::-1] if args.reverse_start else order):
            servers[name] = stack.enter_context(ServerProcess(
                env={"STEER_TUNE_THREADS": tune, "STEER_CONCEPT_PACKS": ""}))
            servers[name].wait_ready()
        for load in ("idle", "hog"):
            hog = None
            if load == "hog":
                cmd = ["sh", "-c", args.neighbour] if args.neighbour else [sys.executable,
                                                                           "-c", HOG]
                hog = subprocess.Popen(["nice", "-n", "10", *cmd], start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(args.settle)
            try:
                for rnd in range(args.rounds):
                    for name in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
                        for streams, tokens in CELLS:
                            value = tokens_per_s(servers[name], streams, tokens)
                            runs.setdefault(f"{load} {name} {streams}", []).append(
                                round(value, 1))
            finally:
                if hog is not None:
                    os.killpg(hog.pid, signal.SIGKILL)  # the neighbour and its children
    print("| load | streams | tune off tok/s (rounds) | tune on tok/s (rounds) | on ÷ off |")
    print("|---|---|---|---|---|")
    ratios = {}
    for load in ("idle", "hog"):
        for streams, _ in CELLS:
            off, on = runs[f"{load} off {streams}"], runs[f"{load} on {streams}"]
            ratio = statistics.median(on) / statistics.median(off)
            ratios[f"{load} {streams}"] = round(ratio, 3)
            print(f"| {load} | {streams} | {statistics.median(off)} {off} | "
                  f"{statistics.median(on)} {on} | {ratio:.2f} |")
    print(json.dumps({"bench": "tune_threads", "rounds": args.rounds,
                      "neighbour": args.neighbour or "matmul loop",
                      "started_first": "on" if args.reverse_start else "off", "runs": runs,
                      "on_over_off": ratios}))


if __name__ == "__main__":
    main()
