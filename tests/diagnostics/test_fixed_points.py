"""Where full-batch Adam + L2, SGD + L2 and AdamW converge, against exact solvers
(SCIENCE.md §5: Xie & Li 2024 for AdamW)."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

from decoupled.diagnostics.fixed_points import (
    BOUNDARY_TOLERANCE,
    DISTANCE_TOLERANCE,
    KKT_TOLERANCE,
    OPTIMIZERS,
    ball_position,
    box_optimum,
    check_weight_decay,
    conclusions,
    decay_growth,
    fixed_points,
    format_fixed_points,
    kkt_gap,
    l2_optimum,
    load_problem,
    log_loss_and_gradient,
    train,
)

# the tests that share ``result`` run in one xdist worker, which computes it once (14 s): a
# cache, not a module fixture, which xdist tears down whenever the worker's queue runs dry
pytestmark = pytest.mark.xdist_group("fixed_points")


@functools.cache
def _fixed_points():
    return fixed_points()  # λ = 1, 20000 full-batch steps each


@pytest.fixture
def result():
    return _fixed_points()


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


def test_the_conclusions_follow_the_numbers_of_a_converged_run(result):
    row = result.summary()["AdamW"]
    assert row["to_box_optimum"] < DISTANCE_TOLERANCE and abs(row["kkt_gap"]) < KKT_TOLERANCE
    assert abs(row["sup_norm_times_lambda"] - 1) <= 1e-5  # 1.000009 here
    text = format_fixed_points(result)
    assert "Adam + L2 ends at the L2 optimum" in text and "SGD + L2 ends at the L2 optimum" in text
    assert (
        "AdamW ends on the boundary of the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (to 1e-5), at the ℓ∞-constrained "
        "optimum" in text
    )
    assert "two different problems solved" in text and "not converged" not in text


def test_a_run_too_short_to_converge_is_reported_as_not_converged():
    # 200 steps: AdamW is 0.63 from the ℓ∞ optimum with a KKT gap of 0.59 — the report used
    # to claim it had converged there all the same
    short = fixed_points(steps=200)
    row = short.summary()["AdamW"]
    assert row["to_box_optimum"] > 0.5 and row["kkt_gap"] > 0.5
    lines = conclusions(short)
    adamw = next(line for line in lines if line.startswith("AdamW"))
    assert adamw.startswith(
        "AdamW has not converged after 200 steps: distance to the ℓ∞ optimum 0.63, KKT gap 0.59,"
    )
    assert "inside the ℓ∞ ball" in adamw
    text = format_fixed_points(short)
    assert "ℓ∞-constrained optimum" not in text and "two different problems" not in text


@pytest.mark.parametrize(
    "sup_norm_times_lambda, expected",
    [
        (1.000009, "on the boundary of the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (to 1e-5)"),
        (0.99999, "on the boundary of the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (to 1e-5)"),
        (1 + BOUNDARY_TOLERANCE / 2, "on the boundary of the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (to 1e-3)"),
        (1.0, "exactly on the boundary of the ℓ∞ ball ‖θ‖∞ ≤ 1/λ"),
        (0.534, "inside the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (‖θ‖∞·λ = 0.534)"),
        (1.0106, "outside the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (‖θ‖∞·λ = 1.011)"),
    ],
)
def test_ball_position_is_worded_from_the_number(sup_norm_times_lambda, expected):
    assert ball_position(sup_norm_times_lambda) == expected


@pytest.mark.parametrize(
    "key, weight_decay, refused",
    [("sgd", 14.0, False), ("sgd", 20.0, True), ("adamw", 50.0, False), ("adamw", 1e3, True)],
)
def test_the_weight_decay_check_refuses_exactly_runs_that_overflow(key, weight_decay, refused):
    """decay_growth's bound against real runs, on both sides of the limit (2000 steps: the
    growing steps γ_t·λ > 2 all come before the cool-down either way)."""
    steps = 2000
    lr = next(lr for _, name, lr in OPTIMIZERS if name == key)
    X, y = load_problem()
    with np.errstate(over="ignore", invalid="ignore"):  # the refused runs do overflow
        run = train(X, y, key, lr, weight_decay, steps, np.ones(X.shape[1]))
    finite = np.isfinite(run.theta).all() and np.isfinite(run.distance).all()
    assert finite != refused
    assert (decay_growth(lr, weight_decay, steps) > 1e150) == refused


def test_weight_decay_check():
    assert decay_growth(0.3, 2 / 0.3, 20_000) == 1.0  # γ_0·λ ≤ 2: the factor never exceeds 1
    check_weight_decay(1.0)
    for bad, why in [
        (0.0, "must be > 0"),
        (float("nan"), "must be > 0"),
        (1e-310, "the bound 1/λ of AdamW's ℓ∞ ball overflows"),
        (1e200, "SGD + L2 at γ_0 = 0.3"),
        (1e308, "SGD + L2 at γ_0 = 0.3"),
    ]:
        with pytest.raises(
            ValueError, match=re.escape(f"Invalid weight_decay value: {bad} ({why}")
        ):
            check_weight_decay(bad)
    with pytest.raises(ValueError, match="Invalid weight_decay value: 1e\\+20"):
        fixed_points(1e20)  # refused before loading or training anything


def test_cautious_decay_keeps_descending_f_past_the_linf_ball(result):
    """On separable data f has no minimizer: AdamW + CWD (arXiv 2510.12402) is stopped by
    neither regularized optimum and ends with a lower loss and a far smaller ‖∇f‖."""
    summary = result.summary()
    row, adamw, adam = summary["AdamW + CWD"], summary["AdamW"], summary["Adam + L2"]
    assert row["sup_norm_times_lambda"] > 2  # well outside AdamW's ball ‖θ‖∞ ≤ 1/λ
    assert row["log_loss"] < min(adamw["log_loss"], adam["log_loss"])
    assert row["grad_norm"] < min(adamw["grad_norm"], adam["grad_norm"]) / 10
    assert row["to_l2_optimum"] > 0.5 and row["to_box_optimum"] > 0.5
    line = next(line for line in conclusions(result) if line.startswith("AdamW + CWD"))
    assert "it keeps descending f" in line


def test_cautious_decay_converges_to_the_minimizer_of_f():
    """The predicted effect where f has a minimizer (least squares, the same schedule): AdamW
    + CWD ends at argmin f, AdamW at the ℓ∞-constrained optimum and Adam + L2 at the ridge
    solution, both far from it (the minimizer lies outside the ball ‖θ‖∞ ≤ 1/λ)."""
    import torch

    import decoupled
    from decoupled.diagnostics.fixed_points import learning_rate_factor

    generator = np.random.default_rng(0)
    A = generator.standard_normal((200, 10))
    b = A @ generator.uniform(-3, 3, 10) + 0.1 * generator.standard_normal(200)
    minimizer = np.linalg.lstsq(A, b, rcond=None)[0]
    weight_decay, steps = 1.0, 1000
    ridge = np.linalg.solve(A.T @ A / 200 + weight_decay * np.eye(10), A.T @ b / 200)
    assert np.abs(minimizer).max() > 2 / weight_decay  # the ball would cut it off

    def train_on_least_squares(cls, **options):
        theta = torch.zeros(10, dtype=torch.float64)
        optimizer = cls(
            [theta], lr=0.05, weight_decay=weight_decay, betas=(0.9, 0.99), fused=False, **options
        )
        inputs, targets = torch.from_numpy(A), torch.from_numpy(b)
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = 0.05 * float(learning_rate_factor(step, steps))
            theta.grad = inputs.T @ (inputs @ theta - targets) / 200
            optimizer.step()
        return theta.numpy()

    def distance(theta, target):
        return np.linalg.norm(theta - target) / np.linalg.norm(target)

    cautious = train_on_least_squares(decoupled.AdamW, cautious=True)
    adamw = train_on_least_squares(decoupled.AdamW)
    adam = train_on_least_squares(decoupled.Adam)
    assert distance(cautious, minimizer) < 1e-3
    assert distance(adamw, minimizer) > 0.3 and np.abs(adamw).max() < 1 / weight_decay + 1e-3
    assert distance(adam, minimizer) > 0.3 and distance(adam, ridge) < 1e-3
