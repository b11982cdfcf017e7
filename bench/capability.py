"""HumanEval pass@1 (greedy) per steering setting: capability under steering.

    .venv/bin/python bench/capability.py [--problems 164] [--settings none,ablate,...]
    .venv/bin/python bench/capability.py --url http://127.0.0.1:8000 [--concurrency 8]

Settings: unsteered, every suppression method and preset (no-refusal = ablate; the INLP edits at
the pack's k; the project's raw-origin variants at k = 2), actadd at strength 1 and at the pack's
calibrated strength, ACE at 0, and the conditional settings of the README (ablation when the
prompt scores below 0.415; actadd at the calibrated strength on generated tokens when it scores
above 0.5). Without `--url` the library generates (`steering.interventions.generate`); with it
every problem is one chat completion to that server (temperature 0, the setting as the request's
`steering` object), the calibrated strength read from its `GET /v1/steering/packs`. Both modes
ask the same user turn (`steering.evaluation.capability.prompt_for`) and score the same way.
Generated code runs in `steering.evaluation.sandbox` (own process, time and memory limits, no
network, a throwaway directory). Prints a table and one JSON line; `--out` writes the JSON
(every task's status per setting), rewritten after each setting, and `--resume` skips the
settings it already holds. Timings are from a shared machine: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("none", "ablate", "inlp_flip", "inlp_null", "inlp_negate_positive k=2",
            "inlp_zero_positive k=2", "ace s=0", "actadd s=1", "actadd calibrated",
            "ablate below 0.415", "actadd calibrated above 0.5 generation")


def steering_of(name: str, calibrated: float) -> dict | None:
    """Setting `name` as a request's `steering` object (None: unsteered); `calibrated` is the
    pack's calibrated actadd strength. The library mode reads the same object through
    `steering.interventions.schema.SteeringObject`."""
    table: dict[str, dict | None] = {
        "none": None,
        "ablate": {"method": "ablate", "strength": 1.0},
        "inlp_flip": {"method": "inlp_flip", "strength": 1.0},
        "inlp_null": {"method": "inlp_null", "strength": 1.0},
        "inlp_negate_positive k=2": {"method": "inlp_negate_positive", "strength": 1.0, "k": 2},
        "inlp_zero_positive k=2": {"method": "inlp_zero_positive", "strength": 1.0, "k": 2},
        "ace s=0": {"method": "ace", "strength": 0.0},
        "actadd s=1": {"method": "actadd", "strength": 1.0},
        "actadd calibrated": {"method": "actadd", "strength": calibrated},
        "ablate below 0.415": {"method": "ablate", "strength": 1.0, "when": {"below": 0.415}},
        "actadd calibrated above 0.5 generation": {
            "method": "actadd", "strength": calibrated, "apply_to": "generation",
            "when": {"above": 0.5}},
    }
    if name not in table:
        raise SystemExit(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
    return table[name]


# ---- through the server -------------------------------------------------------------------------


class ServerRun:
    """Chat completions against a running server through the project's client
    (`clients.steering_client.SteeringClient`), `concurrency` requests in flight."""

    def __init__(self, url: str, api_key: str | None, concurrency: int, max_tokens: int,
                 timeout_s: float = 3600.0):
        import httpx

        from clients.steering_client import SteeringClient

        http = httpx.Client(base_url=url.rstrip("/"),
                            headers={"authorization": f"Bearer {api_key}"} if api_key else {},
                            timeout=httpx.Timeout(timeout_s, connect=30.0),
                            limits=httpx.Limits(max_connections=concurrency))
        self.client = SteeringClient(url, http=http)
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.model = self.client.model()
        packs = [p for p in self.client._send("GET", "/v1/steering/packs")["data"]
                 if p.get("default")]
        self.pack = packs[0] if packs else {}

    @property
    def calibrated(self) -> float:
        """The default pack's calibrated actadd strength as the server reports it (else 1)."""
        return (self.pack.get("calibrated_strengths") or {}).get("actadd") or 1.0

    def complete(self, prompt: str, steering: dict | None) -> dict:
        """One greedy chat completion (retried on a full queue or a drain, as Retry-After
        says); its content, finish reason and condition outcome."""
        from clients.steering_client import SteeringServerError

        for attempt in range(5):
            try:
                result = self.client.chat([{"role": "user", "content": prompt}],
                                          steering=steering, max_tokens=self.max_tokens,
                                          temperature=0)
                break
            except SteeringServerError as exc:
                if exc.status not in (429, 503) or attempt == 4:
                    raise
                time.sleep(2.0)
        applied = result.steering
        applied = applied[0] if isinstance(applied, list) and applied else applied
        condition = applied.get("condition") if isinstance(applied, dict) else None
        return {"content": result.text, "finish_reason": result.finish_reason,
                "condition": condition}

    def replies(self, prompts: dict[str, str], steering: dict | None, desc: str,
                on_reply) -> None:
        """Ask every prompt (task id → user turn); `on_reply(task_id, reply)` as each arrives,
        the reply being its content, finish reason and condition."""
        from tqdm.auto import tqdm

        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self.complete, p, steering): t for t, p in prompts.items()}
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc):
                on_reply(futures[future], future.result())


def saved_replies(path: str | None) -> dict[str, dict[str, dict]]:
    """setting → task id → reply, from a --replies file (the last line of a task wins)."""
    out: dict[str, dict[str, dict]] = {}
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["setting"], {})[rec["task_id"]] = rec
    return out


def score_setting(name: str, steering: dict | None, problems: list[dict],
                  replies: dict[str, dict], seconds: float | None) -> dict:
    """The setting's record over the problems `replies` holds (all of them: complete)."""
    from steering.evaluation.capability import score_replies

    asked = [p for p in problems if p["task_id"] in replies]
    got = [replies[p["task_id"]] for p in asked]
    rec = score_replies(asked, [g["content"] for g in got]).record()
    rec.update(setting=name, steering=steering, complete=len(asked) == len(problems),
               seconds=None if seconds is None else round(seconds, 1),
               finish_length=sum(g.get("finish_reason") == "length" for g in got))
    conditions = [g["condition"] for g in got if g.get("condition") is not None]
    if conditions:
        rec["condition_applied"] = sum(bool(c.get("applied")) for c in conditions)
    return rec


def run_server(args, problems: list[dict], names: list[str], done: list[dict]) -> dict:
    from steering.evaluation.capability import prompt_for

    server = ServerRun(args.url, args.api_key, args.concurrency, args.max_new_tokens)
    meta = {"mode": "server", "model": server.model, "pack": server.pack.get("id"),
            "pack_created": server.pack.get("created"), "calibrated_actadd": server.calibrated,
            "concurrency": args.concurrency}
    saved = saved_replies(args.replies) if args.resume else {}
    rows = list(done)
    for name in names:
        steering = steering_of(name, server.calibrated)
        have = saved.get(name, {})  # a setting cut off earlier resumes where it stopped
        todo = {p["task_id"]: prompt_for(p) for p in problems if p["task_id"] not in have}

        def keep(task_id: str, reply: dict, name: str = name, have: dict = have) -> None:
            have[task_id] = reply
            if args.replies:
                with open(args.replies, "a") as f:
                    f.write(json.dumps({"setting": name, "task_id": task_id, **reply}) + "\n")

        t0 = time.perf_counter()
        server.replies(todo, steering, name, keep)
        rec = score_setting(name, steering, problems, have, time.perf_counter() - t0)
        rec["resumed_replies"] = len(problems) - len(todo)
        rows.append(rec)
        _report_row(rec)
        _write(args, problems, meta, rows)
    return _write(args, problems, meta, rows)


def score_saved(args, problems: list[dict], names: list[str]) -> dict:
    """--score-replies: score what the --replies file holds per setting, complete or not; a
    setting cut off short also gets the unsteered pass count on the same tasks (paired)."""
    saved = saved_replies(args.replies)
    previous = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() \
        else {}
    meta = {k: previous[k] for k in ("mode", "model", "pack", "pack_created",
                                     "calibrated_actadd", "concurrency") if k in previous}
    old = {r["setting"]: r for r in previous.get("rows", [])}
    calibrated = meta.get("calibrated_actadd", 1.0)
    rows = []
    for name in [n for n in names if n in saved]:
        seconds = old[name]["seconds"] if name in old and old[name].get("complete", True) \
            else None
        rec = score_setting(name, steering_of(name, calibrated), problems, saved[name], seconds)
        if not rec["complete"] and "none" in saved:
            base = [saved["none"].get(t) for t in rec["per_task"]]
            if all(base):
                unsteered = score_setting("none", None, [p for p in problems
                                                         if p["task_id"] in rec["per_task"]],
                                          saved["none"], None)
                rec["unsteered_same_tasks"] = {"passed": unsteered["passed"],
                                               "n": unsteered["n"]}
        rows.append(rec)
        _report_row(rec)
    return _write(args, problems, meta, rows)


# ---- through the library ------------------------------------------------------------------------


def run_library(args, problems: list[dict], names: list[str], done: list[dict]) -> dict:
    import torch

    from steering import build_row, load_model
    from steering.evaluation.capability import humaneval_pass_at_1
    from steering.extraction.store import ensure_pack
    from steering.interventions.schema import SteeringObject

    torch.set_grad_enabled(False)
    lm = load_model("embedded", "cpu", precision=args.precision)
    pack = ensure_pack(lm, args.pack)
    calibrated = pack.calibrated_strength("actadd") or 1.0
    meta = {"mode": "library", "pack_created": pack.meta.get("created"),
            "calibrated_actadd": calibrated, "batch_size": args.batch_size}
    rows = list(done)
    for name in names:
        steering = steering_of(name, calibrated)
        row = (None if steering is None else
               build_row(SteeringObject.model_validate(steering).to_spec(None), pack))
        t0 = time.perf_counter()
        rec = humaneval_pass_at_1(lm, row, problems, args.max_new_tokens, args.batch_size,
                                  desc=name).record()
        rec.update(setting=name, steering=steering, seconds=round(time.perf_counter() - t0, 1))
        rows.append(rec)
        _report_row(rec)
        _write(args, problems, meta, rows)
    return _write(args, problems, meta, rows)


# ---- output -------------------------------------------------------------------------------------


def _report_row(rec: dict) -> None:
    print(f"| {rec['setting']} | {rec['passed']}/{rec['n']} | {rec['pass_at_1']:.1%} | "
          f"[{rec['ci'][0]:.1%}, {rec['ci'][1]:.1%}] | "
          f"{'' if rec['seconds'] is None else format(rec['seconds'], '.0f') + ' s'} |",
          flush=True)


def _write(args, problems: list[dict], meta: dict, rows: list[dict]) -> dict:
    """The summary line; with --out, the whole record (rewritten after every setting)."""
    summary = {"bench": "capability", "benchmark": "HumanEval", "problems": len(problems),
               "max_new_tokens": args.max_new_tokens, "precision": args.precision, **meta,
               "isolation": rows[0]["isolation"] if rows else None,
               "pass_at_1": {r["setting"]: r["pass_at_1"] for r in rows},
               "seconds": {r["setting"]: r["seconds"] for r in rows}}
    if args.out:
        Path(args.out).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=164, help="first N HumanEval problems")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--precision", default="int8",
                        help="library: the weights loaded; with --url: a label (the server's)")
    parser.add_argument("--batch-size", type=int, default=8, help="library mode")
    parser.add_argument("--pack", default=None, help="library mode (default: the cached pack)")
    parser.add_argument("--url", default=None, help="run through this server instead")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=8, help="server mode: requests "
                                                                    "in flight")
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true",
                        help="keep the settings --out already holds and run the others")
    parser.add_argument("--replies", default=None, help="server mode: append every reply "
                        "(JSON lines) to this file as it arrives; with --resume, replies already "
                        "there are not asked again")
    parser.add_argument("--score-replies", action="store_true",
                        help="ask nothing: score what --replies holds per setting, complete or "
                             "not (a cut-off setting: with the unsteered count on its tasks)")
    args = parser.parse_args(argv)

    from steering.evaluation.capability import humaneval_problems

    problems = humaneval_problems(args.problems)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    for name in names:
        steering_of(name, 1.0)  # unknown names fail before any generation
    done: list[dict] = []
    if args.resume and args.out and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        if previous.get("problems") == len(problems):
            done = [r for r in previous["rows"] if r["setting"] in names]
    names = [n for n in names if n not in {r["setting"] for r in done}]
    print("| setting | passed | pass@1 | 95% interval (Wilson) | time |\n|---|---|---|---|---|",
          flush=True)
    for rec in done:
        _report_row(rec)
    if args.score_replies:
        print(json.dumps(score_saved(args, problems, names)))
        return 0
    run = run_server if args.url else run_library
    print(json.dumps(run(args, problems, names, done)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
