"""Iterative nullspace projection on synthetic data with a planted multi-dimensional signal."""

from __future__ import annotations

import torch

from steering.extraction.inlp import InlpConfig, fit_logistic, inlp

D = 24
MEANS = (1.5, 1.2, 1.0)  # class-mean offsets along three planted directions ...
SDS = (1.0, 2.0, 3.0)  # ... with different noise, so one linear classifier cannot use it all


def planted(n: int = 1000, seed: int = 0, offset: float = 5.0):
    """Two classes that differ along a 3-dimensional subspace (returned as [d, 3])."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(99),
                                           dtype=torch.float64))
    signal = basis[:, :3]
    m = torch.tensor(MEANS, dtype=torch.float64)
    sd = torch.tensor(SDS, dtype=torch.float64)

    def sample(sign: float) -> torch.Tensor:
        z = torch.randn(n, 3, generator=g, dtype=torch.float64) * sd + sign * m
        noise = torch.randn(n, D, generator=g, dtype=torch.float64)
        noise = noise - noise @ signal @ signal.T
        return z @ signal.T + noise + offset  # away from the origin, like residual streams

    return sample(+1).float(), sample(-1).float(), signal


def heldout_accuracy(x1, x0, seed=1) -> float:
    """Fit a fresh logistic classifier on half of the data and score the other half."""
    x = torch.cat([x1, x0]).double()
    x = x - x.mean(0)
    x = x / x.norm(dim=1).mean()
    y = torch.cat([torch.ones(len(x1)), torch.zeros(len(x0))])
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = perm[: len(x) // 2], perm[len(x) // 2:]
    w, b = fit_logistic(x[train], y[train], 1e-3)
    return float((((x[test] @ w + b) > 0).double() == y[test].double()).double().mean())


def test_accuracy_falls_over_iterations():
    harmful, harmless, signal = planted()
    config = InlpConfig(max_directions=8)
    result = inlp(harmful, harmless, config, progress=False)
    acc = result.accuracy.tolist()
    assert 2 <= result.count < config.max_directions, acc  # stopped near chance, not at max
    assert acc[0] > 0.9
    for prev, nxt in zip(acc, acc[1:]):
        assert nxt <= prev + 0.01, acc
    assert acc[-1] < acc[0] - 0.2, acc
    assert all(a > 0.5 + config.chance_margin for a in acc), acc  # kept ones beat chance

    q = result.directions.double()
    # Leading first: the first direction lies in the planted subspace and points from the
    # harmless towards the harmful class.
    assert (q[0] @ signal).norm() > 0.95
    assert float(q[0] @ (harmful.double().mean(0) - harmless.double().mean(0))) > 0
    assert (q[1] @ signal).norm() > 0.8


def test_projecting_the_directions_out_leaves_chance():
    harmful, harmless, _ = planted()
    result = inlp(harmful, harmless, InlpConfig(max_directions=8), progress=False)
    q = result.directions.double()
    fresh_h, fresh_l, _ = planted(seed=7)  # data INLP did not see
    assert heldout_accuracy(fresh_h, fresh_l) > 0.9

    def null(x):
        x = x.double()
        return x - (x @ q.T) @ q

    assert heldout_accuracy(null(fresh_h), null(fresh_l)) < 0.62
    # The leading direction alone, thresholded at its boundary, classifies fresh data well.
    pred_h = (fresh_h.double() @ q[0]) > result.boundary[0].double()
    pred_l = (fresh_l.double() @ q[0]) > result.boundary[0].double()
    assert (pred_h.double().mean() + (1 - pred_l.double().mean())) / 2 > 0.85


def test_directions_are_orthonormal_with_midpoint_boundaries():
    harmful, harmless, _ = planted(n=300)
    result = inlp(harmful, harmless, InlpConfig(max_directions=8), progress=False)
    q = result.directions.double()
    torch.testing.assert_close(q @ q.T, torch.eye(result.count, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    midpoint = (harmful.double().mean(0) + harmless.double().mean(0)) / 2
    torch.testing.assert_close(result.boundary.double(), q @ midpoint, atol=1e-4, rtol=1e-5)
    assert result.directions.dtype == torch.float32
    assert result.accuracy.shape == result.boundary.shape == (result.count,)


def test_stops_at_max_directions():
    harmful, harmless, _ = planted(n=300)
    result = inlp(harmful, harmless, InlpConfig(max_directions=1), progress=False)
    assert result.count == 1 and result.directions.shape == (1, D)


def test_deterministic_for_a_seed():
    harmful, harmless, _ = planted(n=300)
    a = inlp(harmful, harmless, InlpConfig(seed=3), progress=False)
    b = inlp(harmful, harmless, InlpConfig(seed=3), progress=False)
    assert torch.equal(a.directions, b.directions) and torch.equal(a.accuracy, b.accuracy)


def test_constant_activations_give_no_directions():
    """Template tokens before any prompt-dependent context: every row identical."""
    row = torch.randn(D)
    result = inlp(row.expand(20, D).clone(), row.expand(20, D).clone(), progress=False)
    assert result.count == 0
    assert result.directions.shape == (0, D)


def test_binomial_test_against_chance():
    from steering.extraction.inlp import above_chance, binomial_p_value

    assert binomial_p_value(10, 10) == 2.0 ** -10
    assert abs(binomial_p_value(0, 7) - 1.0) < 1e-12
    assert abs(binomial_p_value(5, 10) - 638 / 1024) < 1e-12
    config = InlpConfig()
    assert above_chance(0.75, 64, config)  # 48/64: p ≈ 3e-5
    assert not above_chance(0.6, 20, config)  # 12/20: p ≈ 0.25
    assert not above_chance(0.56, 400, InlpConfig(chance_margin=0.1))  # significant, too small


def test_no_direction_when_the_classes_are_not_separable():
    """Two samples of the same distribution: not even the first direction is kept (the old
    rule kept it at any accuracy)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(160, D, generator=g) + 3.0
    result = inlp(x[:80], x[80:], progress=False)
    assert result.count == 0


def test_directions_point_toward_the_harmful_class():
    harmful, harmless, _ = planted(n=300)
    result = inlp(harmful, harmless, InlpConfig(max_directions=8), progress=False)
    diff = harmful.double().mean(0) - harmless.double().mean(0)
    assert (result.directions.double() @ diff > 0).all()
