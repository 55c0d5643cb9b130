"""The figure of `decoupled inspect fixed-points`: where Adam + L2, SGD + L2 and AdamW end on
logistic regression, coordinate by coordinate, and how fast each approaches its limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from decoupled.diagnostics.fixed_points import FixedPointResult
from decoupled.diagnostics.plots import OPTIMIZER_COLORS, pyplot, save_figure

_FIXED_POINT_STYLE = {  # marker, color
    "Adam + L2": ("x", OPTIMIZER_COLORS["adam"]),
    "SGD + L2": ("+", OPTIMIZER_COLORS["sgd"]),
    "AdamW": (".", OPTIMIZER_COLORS["adamw"]),
}


def plot_fixed_points(result: FixedPointResult, path: Path) -> Path:
    """Where each optimizer ends, coordinate by coordinate, and how it got there."""
    plt = pyplot()
    figure, (coords, curves) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.6, 1]}
    )
    order = np.argsort(result.box_solution)
    index = np.arange(len(order))
    bound = result.bound
    coords.axhspan(-bound, bound, color=OPTIMIZER_COLORS["adamw"], alpha=0.06)
    for level in (-bound, bound):
        coords.axhline(level, color=OPTIMIZER_COLORS["adamw"], linestyle=":", linewidth=1)
    coords.plot(
        index,
        result.box_solution[order],
        "s",
        mfc="none",
        markersize=10,
        color=OPTIMIZER_COLORS["adamw"],
        label="exact: argmin f s.t. ‖θ‖∞ ≤ 1/λ",
    )
    coords.plot(
        index,
        result.l2_solution[order],
        "o",
        mfc="none",
        markersize=10,
        color=OPTIMIZER_COLORS["adam"],
        label="exact: argmin f + (λ/2)‖θ‖²",
    )
    for label, run in result.runs.items():  # not AdamW + CWD: far outside (the report says)
        marker, color = _FIXED_POINT_STYLE.get(label, ("^", "grey"))
        coords.plot(
            index,
            run.theta[order],
            marker,
            color=color,
            markersize=8,
            label=f"{label} after {result.steps} steps",
        )
    coords.set_xlabel("coordinate of θ (30 features + intercept), sorted by the ℓ∞ solution")
    coords.set_ylabel("weight value (standardized features)")
    coords.set_title(
        f"Where each optimizer ends, λ = {result.weight_decay:g} "
        f"(dotted: ±1/λ = ±{bound:g}, the ℓ∞ ball)"
    )
    coords.grid(alpha=0.3)
    coords.legend(fontsize=8, loc="upper left")
    for label, run in result.runs.items():
        _, color = _FIXED_POINT_STYLE.get(label, ("^", "grey"))
        target = "ℓ∞-constrained optimum" if label == "AdamW" else "L2 optimum"
        curves.plot(run.steps, run.distance, color=color, label=f"{label} → {target}")
    curves.set_xscale("log")
    curves.set_yscale("log")
    curves.set_xlabel("full-batch step (log scale)")
    curves.set_ylabel("relative distance ‖θ_t − θ*‖/‖θ*‖ (log scale)")
    curves.set_title(
        "Distance to the limit theory predicts\n(Adam's steps stay ≈ γ_t as ∇ → 0; "
        "they end as the lr cools)",
        fontsize=10,
    )
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8, loc="center left")
    figure.suptitle(
        "Full-batch logistic regression (breast-cancer data): with the same λ, L2 and "
        "decoupled decay converge to the solutions of different problems"
    )
    figure.tight_layout()
    return save_figure(figure, path)
