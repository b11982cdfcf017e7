"""lm-evaluation-harness against the real server, steering chosen by the model name alone, beside
`steer eval` on the same prompts (issue 31, item 2). Prints a table and one JSON line.

    .venv/bin/python bench/lm_eval_refusal.py [--presets none,no-refusal] [--limit N]
                                              [--precision auto] [--skip-steer-eval]

1. `lm-eval[api]==0.4.13` in its own virtual environment (testkit/venvs.py: created on first
   use under the cache root; its pins need not agree with ours);
2. the real server (`steer serve`, `--precision`, default the server's own: int8 on CPU);
3. `lm_eval --model local-chat-completions --apply_chat_template` on the repository's task
   `steer_refusal_harmful_val` (tasks/lm_eval/steer_refusal: the 37 prompts of harmful_val, 16
   greedy tokens, the project's substring matcher), once per model name `<id>` and
   `<id>+<preset>`: what a gateway user who can set only `model` would run;
4. `steer eval --harmful harmful_val` at the same precision and length, with each preset's
   method, strength and k as the built-in presets define them (steering.catalog) — after the
   server has stopped, so the two never share the cores;
5. per setting: both refusal rates with Wilson 95% intervals and the difference's 95% interval
   (Newcombe 1998, method 10: from the two Wilson intervals); "within noise" when it holds 0.
Both sides decode greedily; they differ only by numerics (the server decodes each row alone in
its own KV slot, `steer eval` batches with left padding), so a flipped prompt or two is expected.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from steering.catalog import BUILTIN_PRESETS  # noqa: E402
from steering.evaluation.refusal import wilson_interval  # noqa: E402
from testkit.server import ServerProcess  # noqa: E402
from testkit.venvs import ensure_venv  # noqa: E402

LM_EVAL = "lm-eval[api]==0.4.13"
TASK = "steer_refusal_harmful_val"
TASKS_DIR = ROOT / "tasks" / "lm_eval"
MAX_TOKENS = 16  # the task's max_gen_toks and steer eval's --max-new-tokens


def lm_eval_venv() -> tuple[Path, float | None]:
    """lm-eval's venv: its bin folder, and its install's seconds when it was installed now."""
    return ensure_venv("lm-eval", [LM_EVAL])


def run_lm_eval(bin_dir: Path, url: str, model: str, out: Path, limit: int | None = None,
                concurrent: int = 4) -> dict:
    """One lm_eval run on the task through `model`; {"rate", "stderr", "n", "samples"} with the
    samples' (prompt, response, refused)."""
    args = [str(bin_dir / "lm_eval"), "--model", "local-chat-completions", "--model_args",
            f"model={model},base_url={url}/v1/chat/completions,num_concurrent={concurrent},"
            "max_retries=3,tokenized_requests=False",
            "--tasks", TASK, "--include_path", str(TASKS_DIR), "--apply_chat_template",
            "--output_path", str(out), "--log_samples"]
    if limit:
        args += ["--limit", str(limit)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home()),
                               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                               "OPENAI_API_KEY": "unused"})
    if done.returncode != 0:
        raise RuntimeError(f"lm_eval failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(Path(sorted(glob.glob(f"{out}/**/results_*.json",
                                               recursive=True))[-1]).read_text())
    metrics = results["results"][TASK]
    samples = [json.loads(line) for f in glob.glob(f"{out}/**/samples_{TASK}_*.jsonl",
                                                   recursive=True)
               for line in Path(f).read_text().splitlines() if line.strip()]
    samples.sort(key=lambda s: s["doc_id"])
    return {"rate": metrics["refusal_rate,none"],
            "stderr": metrics.get("refusal_rate_stderr,none"),
            "n": len(samples),
            "samples": [{"prompt": s["doc"]["instruction"], "response": s["resps"][0][0],
                         "refused": bool(s["refusal_rate"])} for s in samples]}


# The steer eval grid row each model name means (BUILTIN_PRESETS' steering).
def preset_row(preset: str) -> tuple[str, float, int | None]:
    if preset == "none":
        return "none", 0.0, None
    p = BUILTIN_PRESETS[preset]
    return p["method"], float(p.get("strength", 1.0)), p.get("k")


def run_steer_eval(presets: list[str], n: int, precision: str | None, out: Path) -> dict:
    """`steer eval` on harmful_val[:n]: {preset: (refused, n)}."""
    rows = {p: preset_row(p) for p in presets}
    methods = sorted({m for m, _, _ in rows.values() if m != "none"}) or ["none"]
    ks = sorted({k for _, _, k in rows.values() if k}) or [1]
    steer = Path(sys.executable).with_name("steer")
    args = [str(steer), "eval", "--harmful", f"harmful_val[0:{n}]", "--n-harmful", str(n),
            "--methods", ",".join(methods), "--strengths", "1", "--ks",
            ",".join(map(str, ks)), "--max-new-tokens", str(MAX_TOKENS), "--n-harmless", "1",
            "--n-general", "1", "--json", str(out)]
    if precision:
        args += ["--precision", precision]
    subprocess.run(args, check=True, cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    found = {}
    for preset, (method, strength, k) in rows.items():
        if method == "none":
            base = result["baseline"]
            found[preset] = (base["harmful_refused"], base["harmful_n"])
            continue
        for r in result["results"]:
            if r.get("method") == method and math.isclose(r["strength"], strength) \
                    and r.get("k") == k:
                found[preset] = (r["harmful_refused"], r["harmful_n"])
                break
        else:
            raise RuntimeError(f"steer eval has no row for {preset} ({method}, {strength}, {k})")
    return found


def _env() -> dict:
    import os

    return dict(os.environ)


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p1 − p2 and its 95% interval from the two Wilson intervals (Newcombe 1998, method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="none,no-refusal",
                    help="'none' (the base model name) and preset names")
    ap.add_argument("--limit", type=int, default=None, help="first N prompts only")
    ap.add_argument("--model", default=None, help="the server's model (default: embedded)")
    ap.add_argument("--precision", default=None, help="server and steer eval (default: auto)")
    ap.add_argument("--concurrent", type=int, default=4, help="lm_eval's num_concurrent")
    ap.add_argument("--skip-steer-eval", action="store_true")
    args = ap.parse_args()
    presets = args.presets.split(",")

    bin_dir, install_s = lm_eval_venv()
    work = Path(tempfile.mkdtemp(prefix="lm-eval-"))
    server_args = ["--precision", args.precision] if args.precision else []
    if args.model:
        server_args += ["--model", args.model]
    harness: dict[str, dict] = {}
    with ServerProcess(*server_args, env={"PYTHONPATH": str(ROOT)},
                       log_path=str(work / "server.log")) as server:
        server.wait_ready()
        base = server.served_model()
        for preset in presets:
            model = base if preset == "none" else f"{base}+{preset}"
            t0 = time.perf_counter()
            harness[preset] = run_lm_eval(bin_dir, server.url, model, work / preset,
                                          args.limit, args.concurrent)
            harness[preset]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"lm_eval {model}: refusal {harness[preset]['rate']:.3f} "
                  f"({harness[preset]['n']} prompts, {harness[preset]['seconds']} s)",
                  flush=True)
    n = harness[presets[0]]["n"]
    reference = None if args.skip_steer_eval else run_steer_eval(
        presets, n, args.precision, work / "steer-eval.json")

    print(f"\nrefusal on harmful_val[:{n}], {MAX_TOKENS} greedy tokens, substring matcher")
    print(f"{'model name':<28} {'lm-eval':>16} {'steer eval':>16} {'diff (95% CI)':>24}  match")
    rows = []
    for preset in presets:
        h = harness[preset]
        k1 = sum(s["refused"] for s in h["samples"])
        row = {"preset": preset, "lm_eval_refused": k1, "n": n, "lm_eval_rate": h["rate"],
               "lm_eval_seconds": h["seconds"]}
        left = f"{k1}/{n} ({h['rate']:.2f})"
        right, diff, match = "-", "-", "-"
        if reference is not None:
            k2, n2 = reference[preset]
            d, lo, hi = newcombe(k1, n, k2, n2)
            ok = lo <= 0 <= hi
            row.update(steer_eval_refused=k2, steer_eval_n=n2, diff=d, diff_ci=[lo, hi],
                       within_noise=ok)
            right = f"{k2}/{n2} ({k2 / n2:.2f})"
            diff, match = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]", "yes" if ok else "NO"
        name = "<id>" if preset == "none" else f"<id>+{preset}"
        print(f"{name:<28} {left:>16} {right:>16} {diff:>24}  {match}")
        rows.append(row)
    print(json.dumps({"bench": "lm_eval_refusal", "task": TASK, "precision": args.precision
                      or "auto", "lm_eval": LM_EVAL, "venv_install_s": install_s,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
