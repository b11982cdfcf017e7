"""Evaluation metrics on plain tensors and strings: refusal rate (substring matcher), token
negative log-likelihood, perplexity, KL(unsteered ‖ steered) of next-token distributions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from steering.evaluation.refusal import is_refusal, wilson_interval


def refusal_rate(completions: Sequence[str]) -> float:
    """Share of completions the refusal-substring matcher flags (nan for none)."""
    if not completions:
        return math.nan
    return sum(is_refusal(c) for c in completions) / len(completions)


def token_nll(logits: torch.Tensor, targets: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of `targets` [B, T] under `logits` [B, T, V]
    (logits[b, t] predicts targets[b, t]), over the positions where `mask` is true."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          reduction="none").view(targets.shape)
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    mask = mask.bool()
    return float(nll[mask].double().sum()), int(mask.sum())


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean NLL per token): the corpus perplexity (token-weighted)."""
    return math.exp(nll_sum / n_tokens) if n_tokens else math.nan


def row_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> list[float]:
    """Per row, KL(base ‖ other) of the softmax distributions (nats), in float64."""
    p = torch.log_softmax(base_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0).tolist()


def mean_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(base ‖ other) of the softmax distributions (nats), in float64."""
    kls = row_kl(base_logits, logits)
    return sum(kls) / len(kls) if kls else math.nan


def rate_record(prefix: str, texts: Sequence[str]) -> dict:
    """`<prefix>_refusal_rate`, `_refused`, `_n` and `_ci` (Wilson 95%) of completions."""
    refused = sum(is_refusal(t) for t in texts)
    n = len(texts)
    return {f"{prefix}_refusal_rate": refused / n if n else math.nan,
            f"{prefix}_refused": refused, f"{prefix}_n": n,
            f"{prefix}_ci": list(wilson_interval(refused, n))}


# Evaluation decoding, stated in full so nothing is inherited from the model's generation config.
