"""Where full-batch Adam + L2, SGD + L2 and AdamW converge, against exact solvers
(SCIENCE.md §5: Xie & Li 2024 for AdamW)."""

from __future__ import annotations

import numpy as np
import pytest

from decoupled.diagnostics.fixed_points import (
    box_optimum,
    fixed_points,
    format_fixed_points,
    kkt_gap,
    l2_optimum,
    load_problem,
    log_loss_and_gradient,
)


@pytest.fixture(scope="module")
def result():
    return fixed_points()  # λ = 1, 20000 full-batch steps each: a few seconds


def test_exact_solutions_are_what_they_claim():
    X, y = load_problem()
    assert X.shape == (569, 31) and np.allclose(X[:, -1], 1) and set(np.unique(y)) == {0, 1}
    weight_decay = 1.0
    theta = l2_optimum(X, y, weight_decay)
    _, grad = log_loss_and_gradient(theta, X, y)
    # the regularized gradient ∇f + λθ, the one the optimizers' L2 term produces, vanishes
    assert np.abs(grad + weight_decay * theta).max() < 1e-14
    box = box_optimum(X, y, 1 / weight_decay)
    assert np.abs(box).max() <= 1 / weight_decay
    assert kkt_gap(box, log_loss_and_gradient(box, X, y)[1], weight_decay) < 1e-6


def test_gradient_matches_finite_differences():
    X, y = load_problem()
    theta = np.random.default_rng(0).normal(size=X.shape[1])
    loss, grad = log_loss_and_gradient(theta, X, y)
    step = 1e-6
    for i in (0, 7, 30):
        shifted = theta.copy()
        shifted[i] += step
        assert (log_loss_and_gradient(shifted, X, y)[0] - loss) / step == pytest.approx(
            grad[i], abs=1e-5
        )


def test_l2_optimizers_reach_the_l2_optimum(result):
    summary = result.summary()
    for label in ("Adam + L2", "SGD + L2"):
        assert summary[label]["to_l2_optimum"] < 1e-3, label
        assert summary[label]["to_box_optimum"] > 0.5  # and not the ℓ∞ solution


def test_adamw_ends_inside_the_linf_ball_at_a_kkt_point(result):
    row = result.summary()["AdamW"]
    assert row["sup_norm_times_lambda"] <= 1 + 1e-3  # ‖θ‖∞ ≤ 1/λ, to 1e-3 relative
    assert row["sup_norm_times_lambda"] > 0.999  # on the bound: the constraint is active
    assert abs(row["kkt_gap"]) < 1e-3  # ⟨−λθ, ∇f⟩ = ‖∇f‖₁
    assert row["to_box_optimum"] < 1e-2
    assert row["to_l2_optimum"] > 1  # nowhere near the L2 solution
    assert result.active_coordinates() >= 10


def test_report_and_convergence_curves(result):
    text = format_fixed_points(result)
    for label in ("Adam + L2", "SGD + L2", "AdamW", "KKT gap", "coordinates on the bound"):
        assert label in text
    for run in result.runs.values():
        assert run.steps[-1] == result.steps and run.distance[-1] < run.distance[0]
