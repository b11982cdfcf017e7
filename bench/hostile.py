"""What a hostile body costs the real server before and after authentication (issue 12, finding 2).

    python bench/hostile.py                 # embedded model, 1 MiB bodies, 15 tries each
    python bench/hostile.py --size-mib 4 --tries 5

Starts `steer serve` on a free loopback port with one API key and sends bodies built to be
expensive to parse: 1 MiB of nested arrays (`[[[...]]]`, deeper than the depth limit), 1 MiB of
a flat array of small numbers (clean JSON, refused by the protocol model), the same ending in
`NaN` (flagged, so walked value by value to name the field), and a 1 MiB string of lone
surrogates. Each goes once without a key
(expect 401 before the body is read) and once with the key (expect 400 naming the problem), one
at a time. Prints per case the status, the median and worst latency, and the server's RSS growth
(VmRSS sampled every 2 ms during the case, peak minus before), beside the targets of the finding:

    no key: 401 in < 50 ms;  with a key: 400 in < 200 ms and < 20 MB extra RSS

then one JSON line. Exit status 1 when a status is not the expected one (latency and RSS are
figures to read, not pass/fail: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.security.auth import hash_key  # noqa: E402
from testkit.server import ServerProcess  # noqa: E402

KEY = "hostile-bench-key"
TARGET_NO_KEY_MS = 50.0
TARGET_KEY_MS = 200.0
TARGET_RSS_MB = 20.0


def bodies(size: int) -> dict[str, bytes]:
    """name -> a body of about `size` bytes that is costly to parse or to walk."""
    half = size // 2
    nested = b"[" * half + b"]" * half
    flat = b'{"model":"x","messages":[],"n":[' + b"1," * (size // 2 - 20) + b"1]}"
    surrogates = (b'{"model":"x","messages":[{"role":"user","content":"'
                  + b"\\ud800" * (size // 6 - 10) + b'"}]}')
    flat_nan = flat[:-3] + b"NaN]}"  # flagged: walked value by value to name the field
    return {"nested arrays": nested, "flat array": flat, "flat + NaN": flat_nan,
            "lone surrogates": surrogates}


def _timed_post(client: httpx.Client, url: str, body: bytes, headers: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = client.post(url, content=body, headers={"content-type": "application/json", **headers})
    return r.status_code, (time.perf_counter() - t0) * 1000.0


def run_case(srv: ServerProcess, client: httpx.Client, body: bytes, with_key: bool,
             tries: int) -> dict:
    headers = {"authorization": f"Bearer {KEY}"} if with_key else {}
    url = f"{srv.url}/v1/chat/completions"
    before = srv.rss_kb()
    peak, done = [before], threading.Event()

    def sample() -> None:  # VmHWM is the model load's peak; poll VmRSS during the requests
        while not done.is_set():
            peak[0] = max(peak[0], srv.rss_kb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    statuses, ms = set(), []
    try:
        for _ in range(tries):
            status, elapsed = _timed_post(client, url, body, headers)
            statuses.add(status)
            ms.append(elapsed)
    finally:
        done.set()
        sampler.join()
    return {"statuses": sorted(statuses), "p50_ms": statistics.median(ms), "max_ms": max(ms),
            "peak_rss_growth_mb": (peak[0] - before) / 1024.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=1.0, help="body size (the server's default "
                    "limit is 1 MiB; a larger body is refused by size)")
    ap.add_argument("--tries", type=int, default=15)
    ap.add_argument("--model", default=None, help="passed to steer serve (default: embedded)")
    args = ap.parse_args()
    size = int(args.size_mib * 1024 * 1024) - 1024  # stay just under the body limit

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({"keys": [{"id": "bench", "sha256": hash_key(KEY)}]}))
        extra = ["--model", args.model] if args.model else []
        with ServerProcess(*extra, env={"STEER_KEYS_FILE": str(keys), "STEER_ACCESS_LOG": "0"},
                           log_path=str(Path(tmp) / "server.log")) as srv:
            srv.wait_ready()
            rows, ok = [], True
            with httpx.Client(timeout=60) as client:
                for name, body in bodies(size).items():
                    for with_key in (False, True):
                        res = run_case(srv, client, body, with_key, args.tries)
                        expected = 400 if with_key else 401
                        ok &= res["statuses"] == [expected]
                        target = (f"400, < {TARGET_KEY_MS:.0f} ms, < {TARGET_RSS_MB:.0f} MB"
                                  if with_key else f"401, < {TARGET_NO_KEY_MS:.0f} ms")
                        rows.append({"body": name, "key": with_key, "bytes": len(body),
                                     "target": target, **res})

    print(f"{'body':<16} {'key':<4} {'status':<8} {'p50 ms':>8} {'max ms':>8} "
          f"{'peak RSS +MB':>12}  target")
    for r in rows:
        print(f"{r['body']:<16} {'yes' if r['key'] else 'no':<4} "
              f"{','.join(map(str, r['statuses'])):<8} {r['p50_ms']:>8.1f} {r['max_ms']:>8.1f} "
              f"{r['peak_rss_growth_mb']:>12.1f}  {r['target']}")
    print(json.dumps({"bench": "hostile", "size_bytes": size, "tries": args.tries,
                      "statuses_ok": ok, "rows": rows}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
