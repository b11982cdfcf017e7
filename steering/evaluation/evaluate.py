"""Evaluation of steering settings: refusal, perplexity and KL over a grid (issue 5).

For each setting (method × strength × k) on a model and pack:

- **refusal rate** on harmful prompts: share of greedy completions that the JailbreakBench
  substring matcher (`refusal.is_refusal`, the list Arditi et al. 2024 use) calls a refusal;
- **refusal score**: mean log-odds of the refusal tokens at the first answer position
  (Arditi et al. 2024, App. B), on harmful and on harmless prompts;
- **induced refusal** on harmless prompts (for the methods that add refusal: `actadd`, `ace`);
- **perplexity** of the steered model on the *unsteered* model's own greedy completions of
  harmless prompts (generated once and cached on disk, keyed by model, template and prompts), and
  on general text (WikiText-2 test paragraphs);
- **KL**: mean KL(unsteered ‖ steered) of the next-token distribution at the first answer
  position of harmless prompts.

Every setting is measured with the same batches as the unsteered baseline, so `none` reproduces
the baseline exactly. `evaluate` returns a JSON-ready dict (every number, with the prompts' hashes
and the settings); `tables.markdown_table` renders its table. The metrics are in `metrics`, the
model passes in `passes`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steering import __version__
from steering.catalog import REGISTRY
from steering.data.prompts import load_general_text, load_instructions, prompts_hash
from steering.evaluation.metrics import perplexity, rate_record, row_kl
from steering.evaluation.passes import GENERATION, decode, generate_greedy, sequence_nll
from steering.evaluation.refusal import (
    bootstrap_mean_ci,
    is_refusal,
    refusal_score,
    refusal_token_ids,
)
from steering.interventions.methods import (
    INLP_METHODS,
    METHODS,
    RowSteering,
    SteeringSpec,
    build_row,
)
from steering.models.chat import format_chat, template_hash
from steering.models.embedded import cache_root
from steering.models.fingerprint import fingerprint
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack

log = logging.getLogger(__name__)

DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {
    m.name: m.eval_strengths for m in REGISTRY.values() if m.eval_strengths}


# ---- configuration and the grid -------------------------------------------------------------

@dataclass
class EvalConfig:
    """What to measure and on how much data. Defaults are sized for a CPU in minutes."""

    # split name (may be sliced: "x[a:b]") or JSON file. Validation by default: `steer eval` is
    # the development tool; only `steer report` reads the test split (harmful_test_jbb).
    harmful: str = "harmful_val"
    harmless: str = "harmless_val[3000:3030]"  # disjoint from the slice extraction selects on
    overrefusal: str | None = "overrefusal"  # benign prompts that look harmful (None: skip)
    n_harmful: int = 100  # prompts judged for refusal
    n_harmless: int = 30  # prompts for KL, refusal score, induced refusal, perplexity
    n_overrefusal: int = 30
    completion_tokens: int = 32  # the unsteered completions of those scored for perplexity
    n_general: int = 8  # WikiText-2 paragraphs for general-text perplexity
    general_tokens: int = 96  # tokens of each paragraph
    # Greedy tokens per completion judged for refusal: 64, the length the three-way judge's hand
    # labels were read at (steering/data/JUDGE_LABELLING.md).
    max_new_tokens: int = 64
    three_way: bool = True  # refuses / complies / other with the default offline judge
    humaneval: int = 0  # HumanEval problems for the capability column (0: off; 164: all)
    humaneval_tokens: int = 384  # greedy tokens per HumanEval reply
    methods: tuple[str, ...] = METHODS
    strengths: dict[str, tuple[float, ...]] | None = None  # per method; None: DEFAULT_STRENGTHS
    ks: tuple[int, ...] = (1, 2, 4)  # INLP leading-k sweep (the pack's maximum is always added)
    batch_size: int = 16
    cache_dir: str | None = None  # unsteered completions; None: <cache root>/eval
    judge_url: str | None = None  # optional LLM judge (OpenAI-compatible server); None: off
    judge_model: str | None = None
    judge_api_key: str | None = None  # never written to the outputs

    def settings(self) -> dict:
        d = asdict(self)
        d["judge_api_key"] = "set" if self.judge_api_key else None
        d["methods"] = list(self.methods)
        d["ks"] = list(self.ks)
        d["strengths"] = {m: list(s) for m, s in (self.strengths or DEFAULT_STRENGTHS).items()}
        return d


def build_grid(pack: SteeringPack | None, methods: Sequence[str] = METHODS,
               strengths: dict[str, Sequence[float]] | None = None,
               ks: Sequence[int] = (1, 2, 4)) -> list[SteeringSpec]:
    """methods × strengths × k (k for INLP only, clipped to the pack's directions, plus k_max)."""
    strengths = strengths or DEFAULT_STRENGTHS
    grid: list[SteeringSpec] = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == "none":
            grid.append(SteeringSpec("none", 0.0))
            continue
        if pack is None:
            raise ValueError(f"method {method!r} needs a steering pack")
        values = strengths.get(method) or DEFAULT_STRENGTHS.get(method, (1.0,))
        if method in INLP_METHODS:
            k_max = pack.max_k()
            if k_max == 0:
                log.warning("pack %r has no INLP directions: skipping %s", pack.name, method)
                continue
            k_values = sorted({k for k in ks if 1 <= k <= k_max} | {k_max})
            grid.extend(SteeringSpec(method, float(s), k) for s in values for k in k_values)
        else:
            grid.extend(SteeringSpec(method, float(s)) for s in values)
    return grid


def spec_label(spec: SteeringSpec) -> str:
    if spec.method == "none":
        return "none"
    label = f"{spec.method} s={spec.strength:g}"
    label += f" k={spec.k}" if spec.k is not None else ""
    return label + (f" layers={','.join(map(str, spec.layers))}" if spec.layers else "")


# ---- the data: prompts, cached unsteered completions, general text ---------------------------

@dataclass
class EvalData:
    harmful: list[str]
    harmless: list[str]
    harmless_seqs: list[list[int]]  # chat prompt ids + the unsteered model's completion ids
    completion_lens: list[int]
    general_seqs: list[list[int]]
    hashes: dict = field(default_factory=dict)
    overrefusal: list[str] = field(default_factory=list)


def _model_key(lm: LoadedModel) -> str:
    fp = fingerprint(lm.model)
    probe = hashlib.sha256(json.dumps(fp["probe"]).encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in lm.name)
    return f"{safe}-{fp['arch']}-{probe}-{template_hash(lm.tokenizer)}"


def unsteered_completions(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int,
                          cache_dir: str | Path | None = None, batch_size: int = 16
                          ) -> tuple[list[list[int]], Path]:
    """The unsteered model's greedy completion ids of `prompts`, generated once and cached
    (JSON, keyed by model fingerprint + chat template + prompts hash + length)."""
    folder = Path(cache_dir) if cache_dir else cache_root() / "eval"
    key = f"{_model_key(lm)}-{prompts_hash(list(prompts))}-{max_new_tokens}"
    path = folder / f"completions-{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("prompts_sha256") == prompts_hash(list(prompts)) and \
                    len(cached.get("completions", [])) == len(prompts):
                return [list(map(int, c)) for c in cached["completions"]], path
        except (json.JSONDecodeError, TypeError, ValueError):
            log.warning("ignoring unreadable completions cache %s", path)
    completions, _ = generate_greedy(lm, prompts, None, max_new_tokens, batch_size,
                                     desc="unsteered completions (cached once)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({"model": lm.name, "prompts_sha256": prompts_hash(list(prompts)),
                               "max_new_tokens": max_new_tokens, "completions": completions,
                               "texts": decode(lm, completions)}))
    tmp.replace(path)
    return completions, path


def prepare_data(lm: LoadedModel, config: EvalConfig) -> EvalData:
    harmful = load_instructions(config.harmful)[: config.n_harmful]
    harmless = load_instructions(config.harmless)[: config.n_harmless]
    comps, cache_path = unsteered_completions(lm, harmless, config.completion_tokens,
                                              config.cache_dir, config.batch_size)
    seqs, lens = [], []
    for prompt, comp in zip(harmless, comps):
        ids = lm.tokenizer(format_chat(lm.tokenizer, prompt), add_special_tokens=False)
        seqs.append(list(ids["input_ids"]) + comp)
        lens.append(len(comp))
    general = load_general_text(config.n_general)
    general_seqs = []
    for text in general:
        ids = lm.tokenizer(text, add_special_tokens=True)["input_ids"][: config.general_tokens]
        if len(ids) >= 2:
            general_seqs.append(list(ids))
    hashes = {
        "harmful": {"source": str(config.harmful), "n": len(harmful),
                    "sha256": prompts_hash(harmful)},
        "harmless": {"source": str(config.harmless), "n": len(harmless),
                     "sha256": prompts_hash(harmless)},
        "completions": {"n": len(seqs), "tokens": sum(lens),
                        "max_new_tokens": config.completion_tokens,
                        "sha256": prompts_hash([str(c) for c in comps]),
                        "cache": str(cache_path)},
        "general_text": {"source": "wikitext2_test_paragraphs500.jsonl", "n": len(general_seqs),
                         "sha256": prompts_hash(general),
                         "tokens": sum(len(s) - 1 for s in general_seqs)},
    }
    over = load_instructions(config.overrefusal)[: config.n_overrefusal] \
        if config.overrefusal else []
    if over:
        hashes["overrefusal"] = {"source": str(config.overrefusal), "n": len(over),
                                 "sha256": prompts_hash(over)}
    return EvalData(harmful, harmless, seqs, lens, general_seqs, hashes, over)


# ---- one setting ------------------------------------------------------------------------------

def is_induce_setting(spec: SteeringSpec | None) -> bool:
    """actadd / ace at strength > 0 add refusal: their harmful-prompt refusal is not measured."""
    return spec is not None and REGISTRY[spec.method].purpose(spec.strength) == "induce"


def measure(lm: LoadedModel, data: EvalData, row: RowSteering | None, config: EvalConfig,
            tok_ids: list[int], base_harmless_logits: torch.Tensor | None = None,
            harmful: bool = True, label: str = "") -> tuple[dict, torch.Tensor]:
    """Every metric for one steering row (None: the unsteered model), and the harmless
    prompts' first-answer-position logits (the KL reference when `row` is None).

    One greedy generation pass over the harmful (unless `harmful` is false), harmless and
    over-refusal prompts together (refusal rates with Wilson 95% intervals; the first step gives
    the harmful refusal score), one forward over harmless prompt + unsteered completion
    (perplexity, and the first answer position's logits for KL and the harmless refusal score),
    one over the general text."""
    bs = config.batch_size
    t0 = time.perf_counter()
    hp = list(data.harmful) if harmful else []
    prompts = hp + list(data.harmless) + list(data.overrefusal)
    comps, logits = generate_greedy(lm, prompts, row, config.max_new_tokens, bs,
                                    desc=f"{label}: completions")
    texts = decode(lm, comps)
    nh, nl = len(hp), len(data.harmless)
    out: dict = {}
    if harmful:
        out.update(rate_record("harmful", texts[:nh]))
        out["harmful_refusal_score"] = float(refusal_score(logits[:nh], tok_ids).mean())
    else:
        out.update({"harmful_refusal_rate": None, "harmful_refused": None, "harmful_n": 0,
                    "harmful_ci": None, "harmful_refusal_score": None})
    out.update(rate_record("harmless", texts[nh:nh + nl]))
    out["harmless_examples"] = texts[nh:nh + 3]
    if data.overrefusal:
        out.update(rate_record("overrefusal", texts[nh + nl:]))
    spans = {"harmful": (0, nh), "harmless": (nh, nh + nl),
             "overrefusal": (nh + nl, len(prompts))}
    if config.three_way:
        out.update(_three_way(lm, prompts, texts, spans, bs))
    if config.judge_url:
        out.update(_judged(config, prompts, texts, spans))
    nll, n, logits_l = sequence_nll(lm, data.harmless_seqs, data.completion_lens, row,
                                    max(1, bs // 2), desc=f"{label}: perplexity (completions)",
                                    answer_logits=True)
    out["ppl_completions"] = perplexity(nll, n)
    out["harmless_refusal_score"] = float(refusal_score(logits_l, tok_ids).mean())
    base = base_harmless_logits if base_harmless_logits is not None else logits_l
    kls = row_kl(base, logits_l)
    out["kl_harmless"] = sum(kls) / len(kls) if kls else math.nan
    out["kl_harmless_ci"] = list(bootstrap_mean_ci(kls))
    nll, n = sequence_nll(lm, data.general_seqs, [len(s) - 1 for s in data.general_seqs], row,
                          max(1, bs // 4), desc=f"{label}: perplexity (general text)")
    out["ppl_general"] = perplexity(nll, n)
    if config.humaneval:
        from steering.evaluation.capability import humaneval_pass_at_1, humaneval_problems

        out["capability"] = humaneval_pass_at_1(
            lm, row, humaneval_problems(config.humaneval), config.humaneval_tokens, bs,
            desc=f"{label}: HumanEval").record()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, logits_l


def _three_way(lm: LoadedModel, prompts: list[str], texts: list[str],
               spans: dict[str, tuple[int, int]], batch_size: int) -> dict:
    """Refuses / complies / other per prompt set, by the default offline judge (it reads the
    unsteered model: the hooks are idle between passes)."""
    from steering.evaluation.three_way import judge_answers, three_rates

    labels = judge_answers(lm, prompts, texts, batch_size=max(1, batch_size // 2))
    out: dict = {}
    for prefix, (a, b) in spans.items():
        if b > a:
            out.update(three_rates(prefix, labels[a:b]))
    return out


def _judged(config: EvalConfig, prompts: list[str], texts: list[str],
            spans: dict[str, tuple[int, int]]) -> dict:
    """The LLM judge's verdicts on every completion, per prompt set next to the matcher's: the
    yes/no refusal question and the three-way rubric."""
    from steering.evaluation.llm_judge import LlmJudge, judge_record
    from steering.evaluation.three_way import three_rates

    judge = LlmJudge(config.judge_url, config.judge_model, config.judge_api_key)
    verdicts = judge.refused(prompts, texts)
    labels = judge.labels(prompts, texts)
    out: dict = {}
    for prefix, (a, b) in spans.items():
        if b > a:
            out.update(judge_record(prefix, verdicts[a:b], [is_refusal(t) for t in texts[a:b]]))
            parsed = [x for x in labels[a:b] if x is not None]
            out.update(three_rates(f"{prefix}_llm", parsed))
            out[f"{prefix}_llm_unparsed"] = (b - a) - len(parsed)
    return out


def evaluate(lm: LoadedModel, pack: SteeringPack | None, config: EvalConfig | None = None,
             grid: Sequence[SteeringSpec] | None = None) -> dict:
    """Measure the unsteered baseline and every setting of the grid; a JSON-ready dict."""
    config = config or EvalConfig()
    if config.judge_url and not config.judge_model:
        raise ValueError("an LLM judge needs a model name (judge_model / --judge-model)")
    t0 = time.perf_counter()
    grid = list(grid) if grid is not None else build_grid(pack, config.methods,
                                                          config.strengths, config.ks)
    rows = [build_row(spec, pack) for spec in grid]  # validate everything before the long run
    tok_ids = refusal_token_ids(lm.tokenizer)
    data = prepare_data(lm, config)
    baseline, base_logits = measure(lm, data, None, config, tok_ids, label="unsteered")
    baseline["kl_harmless"] = 0.0
    baseline["kl_harmless_ci"] = [0.0, 0.0]
    results = []
    for spec, row in zip(tqdm(grid, desc="steering settings"), rows):
        label = spec_label(spec)
        metrics, _ = measure(lm, data, row, config, tok_ids, base_logits,
                             not is_induce_setting(spec), label)
        results.append({"label": label, **row.applied(), **metrics})
        log.info("%s: %s", label, {k: v for k, v in metrics.items() if k != "harmless_examples"})
    return {
        "tool_version": __version__,
        "model": {"id": lm.model_id, "name": lm.name, "fingerprint": fingerprint(lm.model)["arch"],
                  "chat_template_hash": template_hash(lm.tokenizer),
                  "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
                  "precision": getattr(lm, "precision", None)},
        "pack": _pack_summary(pack),
        "settings": config.settings(),
        "refusal_token_ids": tok_ids,
        "generation": {**GENERATION, "max_new_tokens": config.max_new_tokens,
                       "kernel_dtype": "float32"},
        "prompts": data.hashes,
        "judge": _judge_summary(config),
        "baseline": {"label": "unsteered", **baseline},
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _judge_summary(config: EvalConfig) -> dict | None:
    if not config.judge_url:
        return None
    from steering.evaluation.llm_judge import JUDGE_INSTRUCTION

    return {"url": config.judge_url, "model": config.judge_model,
            "instruction": JUDGE_INSTRUCTION}


def _pack_summary(pack: SteeringPack | None) -> dict | None:
    if pack is None:
        return None
    d = pack.describe()
    meta = d.pop("meta", {})
    d["selection"] = (meta.get("selection") or {}).get("chosen")
    d["data"] = meta.get("data")
    d["created"] = meta.get("created")
    return d
