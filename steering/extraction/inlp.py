"""Iterative Nullspace Projection (Ravfogel et al. 2020), as used by Rocchetti & Ferrara 2026.

Repeatedly: fit a linear classifier (harmful vs harmless) on the activations projected onto the
current nullspace, keep its unit direction, held-out accuracy and boundary, and project the
direction out. Stop at `max_directions` or at the first direction whose held-out accuracy is not
clearly above chance: a one-sided exact binomial test against p = ½ on the held-out split
(P(X ≥ correct) < `p_value`) *and* accuracy above ½ + `chance_margin`. That applies to the first
direction too: data the classifier cannot separate gives no directions at all.

Each kept direction is oriented toward the harmful class (qᵀ(μ⁺ − μ⁻) > 0), so the one-sided
interventions know which side of the boundary to move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from steering.packs.format import InlpDirections


@dataclass
class InlpConfig:
    max_directions: int = 8
    chance_margin: float = 0.05  # stop once held-out accuracy ≤ 0.5 + margin ...
    p_value: float = 0.01  # ... or the binomial test against chance is not significant
    l2: float = 1e-3
    holdout: float = 0.25
    seed: int = 0


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression by L-BFGS on float64; returns (w, b)."""
    x, yf = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, yf)
        loss = loss + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), float(b.detach())


def binomial_p_value(correct: int, n: int) -> float:
    """One-sided exact binomial test against chance: P(X ≥ correct), X ~ Binomial(n, ½)."""
    if n <= 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(max(0, correct), n + 1)) / 2.0 ** n


def above_chance(accuracy: float, n: int, config: InlpConfig) -> bool:
    """Is a held-out accuracy on n examples clearly better than chance?"""
    correct = round(accuracy * n)
    return accuracy > 0.5 + config.chance_margin and \
        binomial_p_value(correct, n) < config.p_value


def inlp(harmful: torch.Tensor, harmless: torch.Tensor, config: InlpConfig | None = None,
         progress: bool = True) -> InlpDirections:
    """harmful, harmless: [n, d] activations at one layer/position → ordered directions."""
    config = config or InlpConfig()
    x = torch.cat([harmful, harmless]).double()
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))])
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(x), generator=gen)
    n_test = max(2, int(len(x) * config.holdout))
    test, train = perm[:n_test], perm[n_test:]
    # Centre on the midpoint of the class means so the classifier's bias stays small and the
    # regulariser does not pull the boundary towards the origin of the raw residual stream.
    midpoint = (harmful.double().mean(0) + harmless.double().mean(0)) / 2
    centred = x - midpoint
    scale = centred.norm(dim=1).mean().clamp_min(1e-12)
    directions: list[torch.Tensor] = []
    accuracies: list[float] = []
    projected = centred / scale
    steps = range(config.max_directions)
    for _ in tqdm(steps, desc="INLP", leave=False) if progress else steps:
        w, b = fit_logistic(projected[train], y[train], config.l2)
        acc = float((((projected[test] @ w + b) > 0).double() == y[test].double()).double().mean())
        if not above_chance(acc, n_test, config):
            break
        q = w.clone()
        for prev in directions:  # keep the set orthonormal against round-off
            q = q - (q @ prev) * prev
        if q.norm() < 1e-9:
            break
        q = q / q.norm()
        if float(q @ (centred[:len(harmful)].mean(0) - centred[len(harmful):].mean(0))) < 0:
            q = -q  # point toward the harmful class
        directions.append(q)
        accuracies.append(acc)
        projected = projected - torch.outer(projected @ q, q)
    if not directions:  # nothing separable (e.g. constant template-token activations)
        d = x.shape[1]
        return InlpDirections(torch.zeros(0, d), torch.zeros(0), torch.zeros(0))
    qs = torch.stack(directions)  # [n, d]
    # Boundary along each direction: the midpoint of the class means (nearest-mean rule).
    boundary = qs @ midpoint
    return InlpDirections(directions=qs.float(), accuracy=torch.tensor(accuracies),
                          boundary=boundary.float())
