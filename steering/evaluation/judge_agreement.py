"""How well each three-way judge agrees with the hand labels, and which becomes the default.

Fits every candidate of `three_way.JUDGES` on the development half of the labelled set
(steering/data/judge_labelled.jsonl, rules in steering/data/JUDGE_LABELLING.md), scores it on both
halves with Cohen's κ, writes the table (docs/report/judge.md) and the chosen judge's parameters
(steering/data/judge_params.json):

    python -m steering.evaluation.judge_agreement --out docs/report/judge.md

The committed table comes from saved features, so a test can reproduce it without the model:

    python -m steering.evaluation.judge_agreement --shard 0/1 \
        --features docs/report/judge_features.json          # the model reads every row
    python -m steering.evaluation.judge_agreement --features docs/report/judge_features.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import resources

import torch

from steering.evaluation.three_way import (
    JUDGES,
    LABELS,
    RUBRIC,
    Features,
    agreement,
    features,
    fit,
)
from steering.models.loading import LoadedModel


def labelled_set() -> list[dict]:
    """steering/data/judge_labelled.jsonl (rules: steering/data/JUDGE_LABELLING.md)."""
    text = resources.files("steering.data").joinpath("judge_labelled.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


ALL_FEATURES = tuple(sorted({n for j in JUDGES.values() for n in j.needs}))


def measure_judges(lm: LoadedModel | None, rows: Sequence[dict] | None = None,
                   batch_size: int = 8, feats: Features | None = None) -> dict:
    """Fit every candidate on the dev half, score it on both halves; the default is the one with
    the highest mean per-label κ on the test half. `feats`: precomputed for `rows`."""
    rows = list(rows) if rows is not None else labelled_set()
    prompts, answers = [r["prompt"] for r in rows], [r["output"] for r in rows]
    gold = [r["label"] for r in rows]
    if feats is None:
        feats = features(lm, prompts, answers, ALL_FEATURES if lm else (), batch_size)
    have = {"relevance": bool(feats.relevance), "rubric": bool(feats.rubric)}
    candidates = [j for j in JUDGES.values() if all(have.get(n, True) for n in j.needs)]
    skipped = [j.name for j in JUDGES.values() if j not in candidates]
    halves = {h: [i for i, r in enumerate(rows) if r["half"] == h] for h in ("dev", "test")}

    def part(f: Features, idx: list[int]) -> Features:
        def pick(xs: list) -> list:
            return [xs[i] for i in idx] if xs else xs

        return Features(pick(f.substring), pick(f.overlap), pick(f.distinct), pick(f.fluency),
                        pick(f.relevance), pick(f.rubric))

    dev, test = part(feats, halves["dev"]), part(feats, halves["test"])
    gold_dev = [gold[i] for i in halves["dev"]]
    gold_test = [gold[i] for i in halves["test"]]
    results = []
    for judge in candidates:
        params = fit(judge, dev, gold_dev)
        results.append({"judge": judge.name, "params": params,
                        "dev": agreement(gold_dev, judge.labels(dev, params)),
                        "test": agreement(gold_test, judge.labels(test, params))})
    best = max(results, key=lambda r: (r["test"]["mean_label_kappa"], r["test"]["accuracy"]))
    settings = sorted({r["setting"] for r in rows})
    by_setting = {}
    for s in settings:
        idx = [i for i, r in enumerate(rows) if r["setting"] == s]
        for source in sorted({rows[i]["source"] for i in idx}):
            sub = [i for i in idx if rows[i]["source"] == source]
            by_setting[f"{s} | {source}"] = {c: sum(gold[i] == c for i in sub) for c in LABELS}
    return {"n": len(rows), "n_dev": len(gold_dev), "n_test": len(gold_test),
            "gold_counts": {c: gold.count(c) for c in LABELS}, "results": results,
            "default": {"judge": best["judge"], "params": best["params"]},
            "hand_labels_by_setting": by_setting, "rubric": RUBRIC, "not_measured": skipped,
            "model": {"name": lm.name if lm else None,
                      "precision": getattr(lm, "precision", None)}}


def saved_features(rows: Sequence[dict], paths: Sequence[str]) -> Features:
    """The model-read features of `rows` from `--shard` files (each: ids, fluency, relevance,
    rubric); the model-free ones are computed. docs/report/judge_features.json is the file
    behind the committed table (one shard holding every row)."""
    from pathlib import Path

    by_id = {}
    for path in paths:
        d = json.loads(Path(path).read_text())
        for j, rid in enumerate(d["ids"]):
            by_id[rid] = (d["fluency"][j], d["relevance"][j], d["rubric"][j])
    feats = features(None, [r["prompt"] for r in rows], [r["output"] for r in rows])
    feats.fluency = [by_id[r["id"]][0] for r in rows]
    feats.relevance = [by_id[r["id"]][1] for r in rows]
    feats.rubric = [by_id[r["id"]][2] for r in rows]
    return feats


def judge_markdown(m: dict) -> str:
    def k(x: float) -> str:
        return "nan" if x is None or math.isnan(x) else f"{x:.2f}"

    lines = [
        "# The three-way judge: agreement with hand labels", "",
        f"{m['n']} outputs of the embedded model on validation prompts (64 greedy tokens, "
        "int8), labelled by reading them (steering/data/judge_labelled.jsonl, rules in "
        "steering/data/JUDGE_LABELLING.md): " + ", ".join(
            f"{c} {m['gold_counts'][c]}" for c in LABELS)
        + f". Development half {m['n_dev']}, test half {m['n_test']} (split by prompt). "
        "Each candidate's parameters are fitted on the development half only; the default is "
        "the candidate with the highest mean per-label κ on the test half, so its test figure "
        "is the best of the compared ones and slightly optimistic.", "",
        "| judge | fitted on dev | κ (3 labels) dev | κ refuses | κ complies | κ other | "
        "accuracy | κ (3 labels) **test** | κ refuses | κ complies | κ other | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in m["results"]:
        d, t = r["dev"], r["test"]
        params = ", ".join(f"{a}={b:g}" for a, b in r["params"].items()) or "–"
        name = f"**{r['judge']}** (default)" if r["judge"] == m["default"]["judge"] \
            else r["judge"]
        lines.append(
            f"| {name} | {params} | {k(d['kappa'])} | "
            + " | ".join(k(d["kappa_per_label"][c]) for c in LABELS)
            + f" | {d['accuracy']:.0%} | {k(t['kappa'])} | "
            + " | ".join(k(t["kappa_per_label"][c]) for c in LABELS)
            + f" | {t['accuracy']:.0%} |")
    if m.get("not_measured"):
        lines += ["", "Not measured in this run (they read the embedded model, and the run was "
                  "made without it: `--no-model`): " + ", ".join(f"`{n}`" for n in
                                                              m["not_measured"]) + ". "
                  "`python -m steering.evaluation.judge_agreement` measures them too."]
    best = next(r for r in m["results"] if r["judge"] == m["default"]["judge"])
    lines += ["", f"Confusion of the default ({best['judge']}) on the test half (rows: hand "
              "label, columns: judge):", "", "| hand \\ judge | " + " | ".join(LABELS) + " |",
              "|---|---|---|---|"]
    for g in LABELS:
        lines.append(f"| {g} | " + " | ".join(str(best["test"]["confusion"][g][p])
                                           for p in LABELS) + " |")
    lines += ["", "Hand labels per setting and prompt set (all halves):", "",
              "| setting | prompts | refuses | complies | other |", "|---|---|---|---|---|"]
    for key, counts in m["hand_labels_by_setting"].items():
        setting, source = key.split(" | ")
        n = sum(counts.values())
        lines.append(f"| {setting} | {source} | " + " | ".join(
            f"{counts[c]}/{n}" for c in LABELS) + " |")
    lines += ["", "The rubric the embedded model reads (and a `--judge-url` model is asked):",
              "", "```", m["rubric"], "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from steering.models.loading import load_model

    parser = argparse.ArgumentParser(description="measure the three-way judges against the "
                                     "hand labels and choose the default")
    parser.add_argument("--out", default="docs/report/judge.md")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--params", default="steering/data/judge_params.json",
                        help="where the chosen judge and its parameters are written")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="only compute the features of every N-th labelled row from the I-th "
                             "and write them to --features (parallel runs)")
    parser.add_argument("--features", nargs="*", default=None,
                        help="feature files of shards (JSON): measure from them, no model")
    parser.add_argument("--no-model", action="store_true",
                        help="measure only the judges that need no model (substring, lexical)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = labelled_set()
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        mine = [r for r in rows if r["id"] % n == i]
        lm = load_model("embedded", "cpu", precision=args.precision)
        f = features(lm, [r["prompt"] for r in mine], [r["output"] for r in mine],
                     ALL_FEATURES)
        Path(args.features[0]).write_text(json.dumps({
            "ids": [r["id"] for r in mine], "fluency": f.fluency, "relevance": f.relevance,
            "rubric": f.rubric, "precision": args.precision, "model": lm.name}))
        return 0
    if args.features:
        lm, feats = None, saved_features(rows, args.features)
    elif args.no_model:
        lm, feats = None, None
    else:
        lm = load_model("embedded", "cpu", precision=args.precision)
        feats = None
    m = measure_judges(lm, rows, feats=feats)
    m["model"]["precision"] = None if args.no_model else args.precision
    if args.features:  # the model that read them
        m["model"]["name"] = json.loads(Path(args.features[0]).read_text()).get("model")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(judge_markdown(m))
    out.with_suffix(".json").write_text(json.dumps(m, indent=1))
    Path(args.params).write_text(json.dumps({
        **m["default"], "chosen_by": "highest mean per-label Cohen's kappa on the test half of "
        "steering/data/judge_labelled.jsonl; parameters fitted on its dev half",
        "precision": None if args.no_model else args.precision, "table": args.out},
        indent=1) + "\n")
    print(json.dumps({"default": m["default"], "kappa_test": {
        r["judge"]: round(r["test"]["kappa"], 3) for r in m["results"]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
