"""Build a steering pack: DiM directions with selection (Arditi et al. 2024, §2.2–2.3 and App. C),
the ACE reference points (Marshall et al. 2024: the harmless means) and INLP directions at the
selected layer (Rocchetti & Ferrara 2026).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import torch
from tqdm.auto import tqdm

from steering import __version__
from steering.data.prompts import load_instructions, prompts_hash
from steering.evaluation.refusal import refusal_score, refusal_token_ids
from steering.interventions.activations import collect_residuals, last_logits
from steering.interventions.methods import SteeringSpec, build_row
from steering.models.chat import post_instruction_length, template_hash
from steering.models.fingerprint import fingerprint
from steering.models.loading import LoadedModel
from steering.packs.format import SteeringPack
from steering.packs.inlp import InlpConfig, inlp

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """`fast` fits a CPU in minutes; `full` follows the paper's candidate grid."""

    mode: str = "fast"
    n_train: int = 64  # per class
    n_val: int = 12  # per class, after filtering
    candidate_positions: int = 1  # how many of the last post-instruction positions to try
    layer_stride: int = 1
    min_layer_fraction: float = 0.5
    max_layer_fraction: float = 0.8  # Arditi et al. drop the last 20% of layers
    kl_threshold: float = 0.1
    inlp: InlpConfig = field(default_factory=InlpConfig)
    batch_size: int = 16

    @staticmethod
    def preset(mode: str) -> ExtractConfig:
        if mode == "fast":
            return ExtractConfig()
        if mode == "full":
            return ExtractConfig(mode="full", n_train=256, n_val=32, candidate_positions=99,
                                 layer_stride=1, min_layer_fraction=0.0,
                                 inlp=InlpConfig(max_directions=16))
        raise ValueError(f"unknown extraction mode {mode!r}; use fast or full")


def _kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(base ‖ steered) of the next-token distributions."""
    p = torch.log_softmax(base_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _filtered(prompts: list[str], scores: torch.Tensor, refusing: bool, n: int) -> list[str]:
    """Arditi et al.'s filter — harmful prompts the model refuses (score > 0), harmless ones it
    answers (score < 0) — topped up with the next most (or least) refused prompts when too few
    pass, so the validation set always has `n` prompts."""
    order = torch.argsort(scores, descending=refusing).tolist()
    return [prompts[i] for i in order[:n]]


def extract_pack(lm: LoadedModel, harmful_train: list[str] | None = None,
                 harmless_train: list[str] | None = None, harmful_val: list[str] | None = None,
                 harmless_val: list[str] | None = None, config: ExtractConfig | None = None,
                 name: str = "refusal") -> SteeringPack:
    config = config or ExtractConfig()
    t0 = time.perf_counter()
    harmful_train = (harmful_train or load_instructions("harmful_train"))[: config.n_train]
    harmless_train = (harmless_train or load_instructions("harmless_train"))[: config.n_train]
    harmful_val = harmful_val or load_instructions("harmful_val")
    harmless_val = (harmless_val or load_instructions("harmless_val"))[: config.n_val * 2]
    tok_ids = refusal_token_ids(lm.tokenizer)
    n_pos = post_instruction_length(lm.tokenizer)
    positions = list(range(-n_pos, 0))
    bs = config.batch_size

    # 1. Activations at every layer × post-instruction position, and the class means.
    acts_h, _ = collect_residuals(lm, harmful_train, n_pos, bs, desc="harmful activations")
    acts_l, _ = collect_residuals(lm, harmless_train, n_pos, bs, desc="harmless activations")
    n_layers = lm.n_layers
    mean_h = acts_h[:, :n_layers].mean(0)  # [L, P, d]
    mean_l = acts_l[:, :n_layers].mean(0)

    # 2. Validation sets filtered as in Arditi et al.: harmful the model refuses, harmless it
    #    answers (judged by the refusal score's sign).
    base_hv = last_logits(lm, harmful_val, batch_size=bs, desc="harmful val baseline")
    base_lv = last_logits(lm, harmless_val, batch_size=bs, desc="harmless val baseline")
    sc_hv, sc_lv = refusal_score(base_hv, tok_ids), refusal_score(base_lv, tok_ids)
    keep_h = _filtered(harmful_val, sc_hv, True, config.n_val)
    keep_l = _filtered(harmless_val, sc_lv, False, config.n_val)
    base_h = base_hv[[harmful_val.index(p) for p in keep_h]]
    base_l = base_lv[[harmless_val.index(p) for p in keep_l]]
    baseline = {"harmful_val_refusal_score": float(refusal_score(base_h, tok_ids).mean()),
                "harmless_val_refusal_score": float(refusal_score(base_l, tok_ids).mean())}

    # 3. Candidate selection.
    # Layer 0's input at template positions is the same embedding for every prompt: skip it.
    lo = max(1, int(config.min_layer_fraction * n_layers))
    hi = int(config.max_layer_fraction * n_layers)
    cand_layers = list(range(lo, hi, config.layer_stride)) or [max(0, hi - 1)]
    cand_positions = positions[-min(config.candidate_positions, n_pos):]
    candidates = [(layer, pos) for pos in cand_positions for layer in cand_layers]
    scratch = SteeringPack(name=name, mean_harmful=mean_h, mean_harmless=mean_l,
                           positions=positions, layer=0, position=positions[-1])
    scores = []
    for layer, pos in tqdm(candidates, desc="selecting direction"):
        scratch.layer, scratch.position = layer, pos
        ablate = build_row(SteeringSpec("ablate", 1.0), scratch)
        add = build_row(SteeringSpec("actadd", 1.0), scratch)
        bypass_logits = last_logits(lm, keep_h, lm.hooks, ablate, bs)
        kl_logits = last_logits(lm, keep_l, lm.hooks, ablate, bs)
        induce_logits = last_logits(lm, keep_l, lm.hooks, add, bs)
        scores.append({
            "layer": layer, "position": pos,
            "bypass_score": float(refusal_score(bypass_logits, tok_ids).mean()),
            "induce_score": float(refusal_score(induce_logits, tok_ids).mean()),
            "kl": _kl(base_l, kl_logits),
        })
    # Arditi et al.: keep candidates with KL < threshold and induce score > 0, then take the
    # lowest bypass score. Where no candidate induces refusal by the first-token score, fall back
    # to the KL filter alone, then to no filter (recorded in the sidecar).
    low_kl = [s for s in scores if s["kl"] < config.kl_threshold]
    passing = [s for s in low_kl if s["induce_score"] > 0]
    filters = "kl+induce" if passing else ("kl" if low_kl else "none")
    chosen = min(passing or low_kl or scores, key=lambda s: s["bypass_score"])
    if filters != "kl+induce":
        log.warning("no candidate passed the KL and induce filters; selected with %s", filters)
    layer, position = chosen["layer"], chosen["position"]

    # 4. INLP at the selected layer and position.
    p_index = positions.index(position)
    directions = inlp(acts_h[:, layer, p_index], acts_l[:, layer, p_index], config.inlp)

    meta = {
        "model": {"id": lm.model_id, "name": lm.name},
        "fingerprint": fingerprint(lm.model),
        "chat_template_hash": template_hash(lm.tokenizer),
        "refusal_token_ids": tok_ids,
        "selection": {"chosen": chosen, "filters": filters,
                      "candidates": scores, "baseline": baseline,
                      "kl_threshold": config.kl_threshold},
        "data": {
            "harmful_train": {"n": len(harmful_train), "sha256": prompts_hash(harmful_train)},
            "harmless_train": {"n": len(harmless_train), "sha256": prompts_hash(harmless_train)},
            "harmful_val": {"n": len(keep_h), "sha256": prompts_hash(keep_h)},
            "harmless_val": {"n": len(keep_l), "sha256": prompts_hash(keep_l)},
        },
        "config": asdict(config),
        "tool_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "extract_seconds": round(time.perf_counter() - t0, 1),
    }
    return SteeringPack(name=name, mean_harmful=mean_h, mean_harmless=mean_l,
                        positions=positions, layer=layer, position=position,
                        inlp={layer: directions} if directions.count else {}, meta=meta)
