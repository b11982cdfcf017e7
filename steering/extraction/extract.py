"""Build a steering pack: DiM directions with selection (Arditi et al. 2024, §2.2–2.3 and App. C),
the ACE reference points (Marshall et al. 2024: the harmless means), INLP directions around the
selected layer (Rocchetti & Ferrara 2026), and a calibrated strength per method.

1. **Training prompts, filtered as Arditi et al. do**: harmful prompts the model refuses and
   harmless ones it answers, judged on a short greedy completion (`steering.extraction.judge`) in the
   same pass that records the activations. If fewer than `min_filtered` pass, the filter is skipped
   for that set (recorded in the sidecar under `filters`).
2. **Validation prompts**: every harmful_val prompt the model refuses and every one of the first
   `n_val_harmless` harmless_val prompts it answers (all that pass, not the n most extreme).
   Evaluation uses harmless_val prompts after that slice and the JailbreakBench test split.
3. **Selection** over (layer, position) candidates with Arditi et al.'s criteria judged on short
   greedy completions instead of first-token log-odds (which stay negative on small models):
   bypass = refusal rate on harmful val under ablation (lower is better; the mean first-token
   refusal score breaks ties), induce = refusal rate on harmless val under activation addition at
   strength 1 (filter: ≥ `induce_threshold`), KL of the harmless first-token distribution under
   ablation (filter: < `kl_threshold`), layers below `max_layer_fraction` of the depth. Which
   filters the chosen candidate passed is recorded; when none passes both, selection falls back to
   the KL filter alone (then to none) and says so. KL is judged first for every candidate, and
   bypass and induce only for those passing it (all of them when none does): the same choice
   for less than half the work (`_candidate_scores`).
4. **Calibration**: for actadd and ace, the smallest strength of `calibrate_strengths` that
   induces refusal on ≥ `calibrate_target` of the harmless val prompts, with its WikiText
   perplexity; suppression methods are recorded at strength 1 with their val refusal rates.
5. **INLP** on the filtered training activations at the chosen position, at the chosen layer and
   its `inlp_layers_around` neighbours (the pack holds one set per layer; the chosen layer is the
   default).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import torch

from steering import __version__
from steering.catalog import CALIBRATED_METHODS
from steering.data.prompts import load_general_text, load_instructions, prompts_hash
from steering.evaluation.refusal import refusal_score, refusal_token_ids
from steering.extraction.inlp import InlpConfig, inlp
from steering.extraction.judge import judge, rate
from steering.interventions.methods import SteeringSpec, build_row
from steering.models.chat import post_instruction_length, template_hash
from steering.models.fingerprint import fingerprint
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack

log = logging.getLogger(__name__)

# Bumped whenever extraction changes what a pack contains or how it is chosen; cached packs with
# an older version are extracted again (steering.extraction.store.ensure_pack).
EXTRACT_VERSION = 3  # 3: training/validation prompts without the test split's near-duplicates

@dataclass
class ExtractConfig:
    """`fast` fits a 2-core CPU in about 5 minutes; `full` follows the paper's candidate grid."""

    mode: str = "fast"
    n_train: int = 128  # harmful training prompts scanned before the refusal filter
    n_train_harmless: int | None = 96  # None: n_train
    n_val_harmless: int = 16  # harmless_val[:n] scanned for selection (evaluation uses later ones)
    n_val_harmful: int | None = None  # None: the whole harmful_val split
    min_filtered: int = 4  # fewer prompts pass a filter: skip that filter (recorded)
    judge_tokens: int = 5  # greedy tokens judged for refusal during extraction
    candidate_positions: int = 1  # how many of the last post-instruction positions to try
    layer_stride: int = 1
    min_layer_fraction: float = 0.42
    max_layer_fraction: float = 0.71  # Arditi et al. drop the last 20% of layers
    kl_threshold: float = 0.1
    induce_threshold: float = 0.5
    calibrate_target: float = 0.8
    calibrate_strengths: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    calibrate_general: int = 4  # WikiText paragraphs for the calibrated strengths' perplexity
    calibrate_general_tokens: int = 64
    inlp_layers_around: int = 2
    inlp: InlpConfig = field(default_factory=InlpConfig)
    batch_size: int = 32  # a decode step costs about the same at 16 and 32 rows (weights)

    @staticmethod
    def preset(mode: str) -> ExtractConfig:
        if mode == "fast":
            return ExtractConfig()
        if mode == "full":
            return ExtractConfig(mode="full", n_train=260, n_train_harmless=520,
                                 n_val_harmless=64,
                                 candidate_positions=99, min_layer_fraction=0.0,
                                 max_layer_fraction=0.8, inlp=InlpConfig(max_directions=16))
        raise ValueError(f"unknown extraction mode {mode!r}; use fast or full")


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(base ‖ steered) of the next-token distributions."""
    p = torch.log_softmax(base_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _keep(prompts: list[str], refused: list[bool], want_refused: bool, minimum: int
          ) -> tuple[list[int], dict]:
    """Indices passing Arditi et al.'s filter (harmful: refused; harmless: answered), or all of
    them when fewer than `minimum` pass; and the record of what happened."""
    passing = [i for i, r in enumerate(refused) if r == want_refused]
    applied = len(passing) >= minimum
    kept = passing if applied else list(range(len(prompts)))
    return kept, {"scanned": len(prompts), "passed": len(passing), "kept": len(kept),
                  "applied": applied, "rule": "refused" if want_refused else "answered"}


def _candidate_scores(lm: LoadedModel, scratch: SteeringPack,
                      candidates: list[tuple[int, int]], harmful: list[str], harmless: list[str],
                      base_l: torch.Tensor, tok_ids: list[int], config: ExtractConfig
                      ) -> list[dict]:
    """Arditi et al.'s criteria for every (layer, position) candidate, in two batched passes
    (each row carries its own candidate's edits, so one pass judges many candidates):

    1. ablation on the harmless val prompts, every candidate: the KL filter (and ablation's
       harmless refusal rate);
    2. bypass (ablation on harmful val) and induce (actadd s=1 on harmless val) for the
       candidates that pass KL — for all of them when none does. `select` never picks a
       candidate failing KL while one passes, so skipping the others cannot change the choice;
       their rates are recorded as None (not judged)."""

    def rows(method: str) -> list:
        out = []
        for layer, pos in candidates:
            scratch.layer, scratch.position = layer, pos
            out.append(build_row(SteeringSpec(method, 1.0), scratch))
        return out

    nc, nh, nl = len(candidates), len(harmful), len(harmless)
    ablate, add = rows("ablate"), rows("actadd")
    kl = judge(lm, harmless * nc, [r for r in ablate for _ in range(nl)], config.judge_tokens,
               config.batch_size, desc="selection: KL")
    scores = []
    for i, (layer, pos) in enumerate(candidates):
        part = slice(i * nl, (i + 1) * nl)
        scores.append({"layer": layer, "position": pos, "kl": _kl(base_l, kl.first_logits[part]),
                       "ablate_harmless_rate": rate(kl.refused[part]), "bypass_rate": None,
                       "bypass_score": None, "induce_rate": None, "induce_score": None})
    finalists = [i for i, s in enumerate(scores) if s["kl"] < config.kl_threshold] or list(
        range(nc))
    prompts, steer = [], []
    for i in finalists:
        prompts += harmful + harmless
        steer += [ablate[i]] * nh + [add[i]] * nl
    j = judge(lm, prompts, steer, config.judge_tokens, config.batch_size,
              desc="selection: bypass, induce")
    for n, i in enumerate(finalists):
        at = n * (nh + nl)
        bypass, induce = slice(at, at + nh), slice(at + nh, at + nh + nl)
        scores[i].update(
            bypass_rate=rate(j.refused[bypass]),
            bypass_score=float(refusal_score(j.first_logits[bypass], tok_ids).mean()),
            induce_rate=rate(j.refused[induce]),
            induce_score=float(refusal_score(j.first_logits[induce], tok_ids).mean()))
    return scores


def select(scores: list[dict], kl_threshold: float, induce_threshold: float
           ) -> tuple[dict, str]:
    """Arditi et al.'s rule on generation-judged scores: among candidates with KL below the
    threshold and induced refusal at least `induce_threshold`, the lowest bypass rate (ties: the
    higher induce rate, then the lower first-token bypass score). Without such a candidate: the
    KL filter alone, then no filter. Returns the chosen candidate and the filters it passed."""
    for s in scores:  # induce None: not judged (`_candidate_scores`)
        s["passes"] = {"kl": s["kl"] < kl_threshold,
                       "induce": s["induce_rate"] is not None
                       and s["induce_rate"] >= induce_threshold}
    both = [s for s in scores if all(s["passes"].values())]
    low_kl = [s for s in scores if s["passes"]["kl"]]
    filters = "kl+induce" if both else ("kl" if low_kl else "none")
    chosen = min(both or low_kl or scores,  # all judged when none passes KL
                 key=lambda s: (s["bypass_rate"], -s["induce_rate"], s["bypass_score"]))
    return chosen, filters


def _calibrate(lm: LoadedModel, pack: SteeringPack, harmful: list[str], harmless: list[str],
               base_rates: dict, bypass: dict, config: ExtractConfig) -> dict:
    """Per method: the strength that reaches its effect on the validation split."""
    from steering.evaluation.metrics import perplexity
    from steering.evaluation.passes import sequence_nll

    out: dict[str, dict] = {}
    nh, nl = len(harmful), len(harmless)
    rates: dict[str, list[tuple[float, float]]] = {m: [] for m in CALIBRATED_METHODS}
    if config.calibrate_strengths[:1] == (1.0,) and bypass.get("induce_rate") is not None:
        rates["actadd"].append((1.0, bypass["induce_rate"]))  # judged in selection already
    extra = [build_row(SteeringSpec(m, 1.0), pack) for m in ("inlp_flip", "inlp_null")
             ] if pack.inlp else []  # INLP's val rates ride along with the first round

    def reached(m: str) -> bool:
        return any(r >= config.calibrate_target for _, r in rates[m])

    for s in config.calibrate_strengths:
        todo = [m for m in CALIBRATED_METHODS if not reached(m) and s not in dict(rates[m])]
        if not todo and not extra:
            continue
        rows = [build_row(SteeringSpec(m, s), pack) for m in todo]
        prompts = harmless * len(rows) + (harmful + harmless) * len(extra)
        steer = [r for r in rows for _ in range(nl)] + [r for r in extra for _ in range(nh + nl)]
        j = judge(lm, prompts, steer, config.judge_tokens, config.batch_size,
                  desc=f"calibration: strength {s}")
        for i, m in enumerate(todo):
            rates[m].append((s, rate(j.refused[i * nl:(i + 1) * nl])))
        for i, (m, row) in enumerate(zip(("inlp_flip", "inlp_null"), extra)):
            at = len(rows) * nl + i * (nh + nl)
            part = j.refused[at:at + nh + nl]
            out[m] = {"strength": 1.0, "k": row.spec.k, "harmful_val_refusal": rate(part[:nh]),
                      "harmless_val_refusal": rate(part[nh:]), "n_harmful_val": nh,
                      "n_harmless_val": nl}
        extra = []
    general = [lm.tokenizer(t, add_special_tokens=True)["input_ids"]
               [: config.calibrate_general_tokens]
               for t in load_general_text(config.calibrate_general)]
    targets = [len(g) - 1 for g in general]

    def ppl(row) -> float:
        nll, n = sequence_nll(lm, general, targets, row, batch_size=config.batch_size)
        return perplexity(nll, n)

    base_ppl = ppl(None)
    for m in CALIBRATED_METHODS:
        reached = [(s, r) for s, r in rates[m] if r >= config.calibrate_target]
        s, r = reached[0] if reached else max(rates[m], key=lambda x: (x[1], -x[0]))
        out[m] = {"strength": s, "reached": bool(reached), "harmless_val_refusal": r,
                  "n_harmless_val": nl, "target": config.calibrate_target,
                  "tried": [{"strength": a, "harmless_val_refusal": b} for a, b in rates[m]],
                  "ppl_general": ppl(build_row(SteeringSpec(m, s), pack)),
                  "ppl_general_unsteered": base_ppl}
    # Suppression methods keep their paper strength; record what it does on val.
    out["ablate"] = {"strength": 1.0, "harmful_val_refusal": bypass["bypass_rate"],
                     "harmless_val_refusal": bypass["ablate_harmless_rate"],
                     "n_harmful_val": len(harmful), "n_harmless_val": nl}
    out["unsteered"] = base_rates
    return out


def extract_pack(lm: LoadedModel, harmful_train: list[str] | None = None,
                 harmless_train: list[str] | None = None, harmful_val: list[str] | None = None,
                 harmless_val: list[str] | None = None, config: ExtractConfig | None = None,
                 name: str = "refusal") -> SteeringPack:
    config = config or ExtractConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    harmful_train = (harmful_train or load_instructions("harmful_train"))[: config.n_train]
    harmless_train = (harmless_train or load_instructions("harmless_train"))[
        : config.n_train_harmless or config.n_train]
    harmful_val = (harmful_val or load_instructions("harmful_val"))[: config.n_val_harmful]
    harmless_val = (harmless_val or load_instructions("harmless_val"))[: config.n_val_harmless]
    tok_ids = refusal_token_ids(lm.tokenizer)
    n_pos = post_instruction_length(lm.tokenizer)
    positions = list(range(-n_pos, 0))
    bs = config.batch_size
    n_layers = lm.n_layers

    # 1. Training activations and their refusal judgement in one pass; Arditi et al.'s filter.
    jh = judge(lm, harmful_train, None, config.judge_tokens, bs, capture=n_pos,
               desc="harmful train")
    jl = judge(lm, harmless_train, None, config.judge_tokens, bs, capture=n_pos,
               desc="harmless train")
    keep_th, f_th = _keep(harmful_train, jh.refused, True, config.min_filtered)
    keep_tl, f_tl = _keep(harmless_train, jl.refused, False, config.min_filtered)
    acts_h, acts_l = jh.residuals[keep_th], jl.residuals[keep_tl]
    mean_h = acts_h[:, :n_layers].mean(0)  # [L, P, d]
    mean_l = acts_l[:, :n_layers].mean(0)
    timings["train"] = time.perf_counter() - t0

    # 2. Validation prompts: all that pass the filter.
    jv = judge(lm, harmful_val + harmless_val, None, config.judge_tokens, bs, desc="val")
    nhv = len(harmful_val)
    keep_vh, f_vh = _keep(harmful_val, jv.refused[:nhv], True, config.min_filtered)
    keep_vl, f_vl = _keep(harmless_val, jv.refused[nhv:], False, config.min_filtered)
    val_h = [harmful_val[i] for i in keep_vh]
    val_l = [harmless_val[i] for i in keep_vl]
    base_l = jv.first_logits[nhv:][keep_vl]
    base_rates = {"harmful_val_refusal": rate([jv.refused[i] for i in keep_vh]),
                  "harmless_val_refusal": rate([jv.refused[nhv + i] for i in keep_vl]),
                  "harmful_val_refusal_all": rate(jv.refused[:nhv]),
                  "harmless_val_refusal_all": rate(jv.refused[nhv:])}
    baseline = {"harmful_val_refusal_score": float(refusal_score(jv.first_logits[:nhv][keep_vh],
                                                                 tok_ids).mean()),
                "harmless_val_refusal_score": float(refusal_score(base_l, tok_ids).mean()),
                **base_rates}
    timings["val"] = time.perf_counter() - t0 - sum(timings.values())

    # 3. Candidate selection. Layer 0's input at template positions is the same embedding for
    #    every prompt: skip it.
    lo = max(1, int(config.min_layer_fraction * n_layers))
    hi = int(config.max_layer_fraction * n_layers)
    cand_layers = list(range(lo, hi, config.layer_stride)) or [max(0, hi - 1)]
    cand_positions = positions[-min(config.candidate_positions, n_pos):]
    candidates = [(layer, pos) for pos in cand_positions for layer in cand_layers]
    scratch = SteeringPack(name=name, mean_harmful=mean_h, mean_harmless=mean_l,
                           positions=positions, layer=0, position=positions[-1])
    scores = _candidate_scores(lm, scratch, candidates, val_h, val_l, base_l, tok_ids, config)
    chosen, filters = select(scores, config.kl_threshold, config.induce_threshold)
    if filters != "kl+induce":
        log.warning("no candidate passed the KL and induce filters; selected with %s", filters)
    layer, position = chosen["layer"], chosen["position"]
    timings["selection"] = time.perf_counter() - t0 - sum(timings.values())

    # 4. INLP at the chosen position, at the chosen layer and its neighbours.
    p_index = positions.index(position)
    inlp_sets = {}
    around = range(max(1, layer - config.inlp_layers_around),
                   min(n_layers, layer + config.inlp_layers_around + 1))
    for lay in around:
        dirs = inlp(acts_h[:, lay, p_index], acts_l[:, lay, p_index], config.inlp,
                    progress=False)
        if dirs.count:
            inlp_sets[lay] = dirs
    n_test = max(2, int((len(keep_th) + len(keep_tl)) * config.inlp.holdout))
    timings["inlp"] = time.perf_counter() - t0 - sum(timings.values())

    pack = SteeringPack(name=name, mean_harmful=mean_h, mean_harmless=mean_l,
                        positions=positions, layer=layer, position=position, inlp=inlp_sets)
    # 5. Calibrated strengths on the validation split.
    calibration = _calibrate(lm, pack, val_h, val_l, base_rates, chosen, config)
    timings["calibration"] = time.perf_counter() - t0 - sum(timings.values())

    def data(prompts: list[str], source: str, record: dict | None = None) -> dict:
        return {"source": source, "n": len(prompts), "sha256": prompts_hash(prompts),
                **({"filter": record} if record else {})}

    pack.meta = {
        "extract_version": EXTRACT_VERSION,
        "model": {"id": lm.model_id, "name": lm.name},
        "fingerprint": fingerprint(lm.model),
        "chat_template_hash": template_hash(lm.tokenizer),
        "refusal_token_ids": tok_ids,
        "selection": {"chosen": chosen, "filters": filters, "candidates": scores,
                      "baseline": baseline, "kl_threshold": config.kl_threshold,
                      "induce_threshold": config.induce_threshold,
                      "judge": f"substring matcher on {config.judge_tokens} greedy tokens"},
        "calibration": calibration,
        "inlp": {"layers": sorted(inlp_sets), "default_layer": layer, "position": position,
                 "n_train": {"harmful": len(keep_th), "harmless": len(keep_tl)},
                 "n_heldout": n_test, "p_value": config.inlp.p_value,
                 "chance_margin": config.inlp.chance_margin},
        "data": {
            "harmful_train": data([harmful_train[i] for i in keep_th], "harmful_train", f_th),
            "harmless_train": data([harmless_train[i] for i in keep_tl], "harmless_train",
                                   f_tl),
            "harmful_val": data(val_h, "harmful_val", f_vh),
            "harmless_val": data(val_l, f"harmless_val[:{config.n_val_harmless}]", f_vl),
        },
        "config": asdict(config),
        "tool_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "extract_seconds": round(time.perf_counter() - t0, 1),
    }
    return pack
