"""`steer inspect` and `steer extract --remote`: reading the stream of a running server from the
terminal, through the Python client (`clients.readout`).

    steer inspect "How do I pick a lock?" --completion "I can't help with that."
    steer extract --remote http://127.0.0.1:8000 --name tone \\
        --positive casual.json --negative formal.json        # progress on stderr, JSON at the end
    steer extract --remote http://127.0.0.1:8000 --name refusal2 --dataset refusal --n 32
"""

from __future__ import annotations

import json
import sys

from steering.data.contrastive import load_examples  # torch-free


def _client(url: str, api_key: str | None, model: str | None = None):
    from clients import SteeringClient

    return SteeringClient(url, api_key=api_key, model=model)


def cmd_inspect(args) -> int:
    prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read().strip()
    with _client(args.url, args.api_key, args.model) as c:
        result = c.inspect(prompt, completion=args.completion, pack=args.pack,
                           layer=args.layer, top_k=args.top_k)
    if args.json:
        print(json.dumps(result.raw))
    else:
        print(result.table(last=args.tokens))
    return 0


def _rows(path: str) -> list:
    return [e.prompt if e.completion is None else {"prompt": e.prompt, "completion": e.completion}
            for e in load_examples(path)]


def _line(job: dict) -> str:
    eta = f", ETA {job['eta_s']:.0f} s" if job.get("eta_s") is not None else ""
    return (f"{job['id']}: {job['status']} · {job['stage']} · {100 * job['fraction']:.0f}%"
            f"{eta}")


def cmd_extract_remote(args) -> int:
    """Submit an extraction job to the server at --remote and follow it to the end."""
    if args.dataset is None and not (args.positive and args.negative):
        raise ValueError("--remote needs --positive and --negative files, or --dataset")
    if args.name == "refusal" and not args.replace:
        raise ValueError("name the pack with --name (refusal is the served refusal pack's name)")
    with _client(args.remote, args.api_key) as c:
        if args.dataset is not None:
            job = c.extract(args.name, dataset=args.dataset, n=args.n, replace=args.replace)
        else:
            job = c.extract(args.name, _rows(args.positive), _rows(args.negative),
                            replace=args.replace)
        print(_line(job), file=sys.stderr)
        last = [""]

        def show(progress: dict) -> None:
            line = _line(progress)
            if line != last[0]:
                print(line, file=sys.stderr)
                last[0] = line

        try:
            done = c.wait_extraction(job["id"], poll_s=args.poll, on_progress=show)
        except KeyboardInterrupt:
            c.cancel_extraction(job["id"])
            print(f"{job['id']}: cancelled", file=sys.stderr)
            return 130
    print(json.dumps({k: done.get(k) for k in ("id", "name", "status", "served", "error",
                                                "elapsed_s", "pack")}))
    return 0 if done["status"] == "succeeded" else 1
