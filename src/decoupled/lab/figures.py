"""The figures of compare and sweep reports (PNG files): learning curves, final metric per
seed, the paper's lr × λ heatmaps and the metric along each axis.

pyplot comes from ``decoupled.plotting`` (the package's one pyplot entry point) and each
optimizer's colour from the registry (``decoupled.optim.registry.COLORS``), so the report's
figures and those of `decoupled inspect` colour an optimizer alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from decoupled.lab.comparison import Arm, Comparison, metric_scale
from decoupled.optim.registry import COLORS, REGISTRY
from decoupled.plotting import pyplot, save_figure

DPI = 110


def _curve_matrix(arm: Arm, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Steps and a (seeds × evaluations) matrix of one curve, over the seeds that finished."""
    curves = [r.curves for r in arm.records.values() if r.status == "done" and r.curves]
    if not curves:
        return None
    length = min(len(c[key]) for c in curves)
    steps = np.asarray(curves[0]["step"][:length])
    return steps, np.asarray([c[key][:length] for c in curves], dtype=float)


def plot_curves(comparison: Comparison, path: Path) -> Path:
    """Learning curves: mean over seeds, band = min..max over seeds."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    metric = comparison.task.metric.replace("_", " ")
    for axis, key, label in ((axes[0], "train_loss", "train loss"), (axes[1], "metric", metric)):
        for arm in comparison.arms:
            curve = _curve_matrix(arm, key)
            if curve is None:
                continue
            steps, values = curve
            color = COLORS.get(arm.optimizer)
            axis.plot(
                steps,
                values.mean(0),
                color=color,
                label=f"{arm.name} ({REGISTRY[arm.optimizer].decay}, n={len(values)})",
            )
            axis.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if key == "train_loss":
            axis.set_yscale("log")
    axes[1].legend()
    figure.suptitle(f"{comparison.task.name}: mean over seeds, band = min–max")
    figure.tight_layout()
    return save_figure(figure, path, DPI)


def plot_per_seed(comparison: Comparison, path: Path) -> Path:
    """Final metric per seed, one column per optimizer, lines joining the same seed; a
    diverged seed is a cross on a row above the others, labelled "diverged"."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 4))
    scale = metric_scale(comparison.task.metric)[0]
    values = [arm.metrics_by_seed() for arm in comparison.arms]
    seeds = sorted(set().union(*values)) if values else []
    finite = [v * scale for by_seed in values for v in by_seed.values() if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = (high - low) or abs(high) or 1.0
    top = high + 0.15 * span  # the "diverged" row
    for seed in seeds:
        ys = [v.get(seed, math.nan) * scale for v in values]  # NaN: no run
        shown = [y if math.isfinite(y) or v.get(seed) is None else top for y, v in
                 zip(ys, values)]  # fmt: skip
        style = ":" if shown != ys else "-"  # dotted: the seed diverged on one side
        axis.plot(range(len(values)), shown, style, color="grey", alpha=0.5, linewidth=1)
    for index, (arm, by_seed) in enumerate(zip(comparison.arms, values)):
        ys = [y * scale for y in by_seed.values() if math.isfinite(y)]
        axis.scatter([index] * len(ys), ys, color=COLORS.get(arm.optimizer), zorder=3)
        diverged = len(by_seed) - len(ys)
        if diverged:
            axis.scatter([index], [top], color=COLORS.get(arm.optimizer), marker="x", zorder=3)
            axis.text(index, top, f"{diverged} diverged\n", ha="center", va="bottom", fontsize=8)
            axis.set_ylim(top=top + 0.15 * span)  # room for the label
    axis.set_xticks(range(len(values)), [arm.name for arm in comparison.arms])
    axis.set_xlim(-0.5, len(values) - 0.5)
    unit = " (%)" if comparison.as_percent else ""
    axis.set_ylabel(comparison.task.metric.replace("_", " ") + unit)
    axis.set_title("final metric per seed (lines pair seeds)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path, DPI)


def plot_heatmaps(items, metric: str, percent: bool, path: Path) -> Path:
    """The paper's Figure 2: the final metric over lr × λ, one panel per optimizer, the best
    cell boxed, every cell labelled with its value or, if it has none, with why (diverged,
    "k/n diverged" when some of its n seeds did, failed, running, missing; grid axes are
    log-spaced values)."""
    plt = pyplot()
    figure, axes = plt.subplots(
        1, len(items), figsize=(6.2 * len(items), 4.6), squeeze=False, gridspec_kw={"wspace": 0.35}
    )
    scale = 100.0 if percent else 1.0
    finite = [land.values[np.isfinite(land.values)] * scale for land in items]
    finite = np.concatenate(finite) if finite else np.array([])
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    colormap = plt.get_cmap("viridis" if items and items[0].higher_is_better else "viridis_r")
    image = None
    for axis, land in zip(axes[0], items):
        image = axis.imshow(
            land.values.T * scale,
            origin="lower",
            cmap=colormap,
            vmin=vmin,
            vmax=vmax,
            aspect="auto",
        )
        axis.set_xticks(range(len(land.lrs)), [f"{v:.2g}" for v in land.lrs], rotation=45)
        axis.set_yticks(range(len(land.wds)), [f"{v:.2g}" for v in land.wds])
        axis.set_xlabel("learning rate γ")
        axis.set_ylabel("weight decay λ")
        for i in range(len(land.lrs)):
            for j in range(len(land.wds)):
                value = land.values[i, j] * scale
                if not np.isfinite(value):  # diverged, failed, running or missing
                    axis.text(i, j, land.cell_label(i, j), ha="center", va="center", fontsize=7)
                    continue
                shade = colormap((value - vmin) / (vmax - vmin) if vmax > vmin else 0.5)
                luminance = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2]
                axis.text(
                    i,
                    j,
                    f"{value:.3g}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if luminance > 0.5 else "white",
                )
        best = land.best()
        if best is not None:
            from matplotlib.patches import Rectangle

            corner = (best[0] - 0.5, best[1] - 0.5)
            axis.add_patch(Rectangle(corner, 1, 1, fill=False, edgecolor="red", linewidth=2.5))
        slope = round(land.diagonal_slope(), 2) + 0.0  # + 0.0 turns -0.0 into 0.0
        axis.set_title(f"{land.optimizer} (red box: best): slope log λ*/log γ = {slope:.2f}")
    unit = " (%)" if percent else ""
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), label=f"{metric}{unit}, mean over seeds")
    better = "higher" if items and items[0].higher_is_better else "lower"
    figure.suptitle(
        f"final {metric} over the lr × weight-decay grid ({better} is better; yellow = best)"
    )
    return save_figure(figure, path, DPI, bbox_inches="tight")


def plot_axes(items, metric: str, percent: bool, path: Path) -> Path:
    """Metric against lr at each optimizer's best λ, and against λ at its best lr."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    scale = 100.0 if percent else 1.0
    for land in items:
        best = land.best()
        if best is None:
            continue
        i, j = best
        color = COLORS.get(land.optimizer)
        left.plot(
            land.lrs,
            land.values[:, j] * scale,
            "o-",
            color=color,
            label=f"{land.optimizer} at λ = {land.wds[j]:.2g}",
        )
        wds = [w if w > 0 else np.nan for w in land.wds]
        right.plot(
            wds,
            land.values[i, :] * scale,
            "o-",
            color=color,
            label=f"{land.optimizer} at γ = {land.lrs[i]:.2g}",
        )
    unit = " (%)" if percent else ""
    for axis, label in ((left, "learning rate γ"), (right, "weight decay λ")):
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(metric + unit)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set_title("metric vs lr at the best λ")
    zero = any(0.0 in land.wds for land in items)
    right.set_title("metric vs λ at the best lr" + (" (λ = 0 is off the log axis)" if zero else ""))
    figure.tight_layout()
    return save_figure(figure, path, DPI)
