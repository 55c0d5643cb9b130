"""The figures of `decoupled inspect` (PNG files), drawn through ``decoupled.plotting`` (the
package's one pyplot entry point) when a figure is drawn.

Colors are the optimizer registry's, as in the lab's reports: Adam + L2 red, AdamW blue.
Within one optimizer's panel, layers take the colors of the "Dark2" palette, the same layer
the same color in every figure.
Log axes are cut below at a fraction of the smallest value seen before the last tenth of the
run, so that a schedule's final fall to lr = 0 does not squeeze the rest of the plot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from decoupled import plotting
from decoupled.diagnostics.inspection import InspectedRun, comparison_window
from decoupled.diagnostics.table import DecayTable
from decoupled.optim.registry import COLORS as OPTIMIZER_COLORS
from decoupled.optim.registry import DARK_COLORS
from decoupled.plotting import pyplot

DPI = 100


def save_figure(figure, path: Path) -> Path:
    """Write and close an inspect figure (at :data:`DPI`)."""
    return plotting.save_figure(figure, path, DPI)


def _decayed_tensors(runs: list[InspectedRun]) -> list[str]:
    """Tensors decayed in any run, in model order."""
    names: dict[str, None] = {}
    for run in runs:
        names.update(dict.fromkeys(run.table.where(decayed=True).tensors()))
    return list(names)


def _layer_colors(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["Dark2"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _layer_label(table: DecayTable, name: str) -> str:
    rows = table.for_tensor(name)
    if not len(rows):
        return name
    suffix = ", normalized" if rows[0].scale_invariant else ""
    return f"{name} ({rows[0].shape}{suffix})"


def _title(run: InspectedRun) -> str:
    return f"{run.label}  (γ={run.spec.lr:g}, λ={run.spec.weight_decay:g})"


def _cut_log_axis(axis, tables: list[DecayTable], column: str, top_column: str = "") -> None:
    """Log y limits from the values before the last tenth of the run (module docstring):
    the bottom from ``column``, the top from ``top_column`` (default: the same)."""

    def early_positive(name: str) -> list[float]:
        values = []
        for table in tables:
            last = max(table.column("step"), default=0)
            values += [getattr(r, name) for r in table if r.step <= 0.9 * last]
        return [v for v in values if v > 0 and np.isfinite(v)]

    low, high = early_positive(column), early_positive(top_column or column)
    if low and high:
        axis.set_ylim(min(low) / 2, max(high) * 1.5)


def _legend_or_note(axis, **options) -> None:
    """The panel's legend; a panel with nothing labelled (a run with λ = 0 decays no tensor)
    says so instead."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(**options)
    else:
        axis.text(0.5, 0.5, "no decayed tensor (λ = 0)", transform=axis.transAxes, ha="center")


def _shade_window(axis, table: DecayTable) -> None:
    """Grey band: the steps the printed comparison table averages over."""
    steps = comparison_window(table).column("step")
    if steps:
        axis.axvspan(min(steps), max(steps), color="grey", alpha=0.12, label="table's window")


def _per_optimizer_panels(runs, draw, path: Path, *, ylabel, title, xlabel="optimizer step"):
    """One panel per run sharing the y axis; ``draw(axis, run, colors)`` fills a panel."""
    plt = pyplot()
    colors = _layer_colors(_decayed_tensors(runs))
    figure, axes = plt.subplots(
        1, len(runs), figsize=(6 * len(runs), 4.6), sharey=True, squeeze=False
    )
    for axis, run in zip(axes[0], runs):
        draw(axis, run, colors)
        axis.set_title(_title(run), color=OPTIMIZER_COLORS.get(run.spec.optimizer))
        axis.set_xlabel(xlabel)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        _legend_or_note(axis, fontsize=7, loc="lower left", markerscale=3)
    axes[0][0].set_ylabel(ylabel)
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def _no_prediction_note(axis) -> None:
    axis.text(
        0.98,
        0.97,
        "Adam + L2: no equilibrium prediction —\nit depends on each layer's gradient scale",
        transform=axis.transAxes,
        fontsize=8,
        ha="right",
        va="top",
    )


def plot_decay_distributions(runs: list[InspectedRun], path: Path) -> Path:
    """Box plots of the per-element effective decay rate of every decayed layer, mid-run."""
    plt = pyplot()
    names = _decayed_tensors(runs)
    figure, axis = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        shown = [(i, n) for i, n in enumerate(names) if n in run.elements]
        optimizer = run.spec.optimizer
        if not shown:  # λ = 0 (charlm's and minilm's tuned Adam): nothing to draw
            axis.plot([], [], " ", label=f"{_title(run)}: no decayed tensor")
            continue
        parts = axis.boxplot(
            [run.elements[n][0] for _, n in shown],
            positions=[i + (index - (len(runs) - 1) / 2) * width for i, _ in shown],
            widths=width * 0.85,
            whis=(5, 95),
            showfliers=False,
            patch_artist=True,
            medianprops={"color": DARK_COLORS.get(optimizer, "black"), "linewidth": 2.5},
        )
        for box in parts["boxes"]:
            box.set(facecolor=OPTIMIZER_COLORS.get(optimizer), alpha=0.6)
        axis.plot(
            [], [], "s", color=OPTIMIZER_COLORS.get(optimizer), markersize=10, label=_title(run)
        )
    axis.set_yscale("log")
    labels = [_layer_label(runs[0].table, n).replace(" (", "\n(") for n in names]
    many = len(names) > 6  # a Transformer's tensors: slanted, or their names overlap
    axis.set_xticks(
        range(len(names)), labels, fontsize=7 if many else 8, rotation=30 if many else 0,
        ha="right" if many else "center",
    )  # fmt: skip
    axis.set_ylabel("effective decay per step\n(fraction of the weight removed, log scale)")
    axis.set_xlabel("decayed tensor (normalized: feeds a BatchNorm/LayerNorm, scale-invariant)")
    axis.set_title(
        f"How strongly each weight is decayed, element by element, at step "
        f"{runs[0].elements_step}\nbox: 25–75th percentile, whiskers: 5–95th, thick line: "
        "median; AdamW: one rate for all, a flat box"
    )
    axis.grid(alpha=0.3, axis="y")
    axis.legend(loc="lower right", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_angular_updates(runs: list[InspectedRun], path: Path) -> Path:
    """Angle each decayed layer turns per step, against AdamW's equilibrium prediction."""

    def draw(axis, run, colors):
        table = run.table
        _shade_window(axis, table)
        for name in table.where(decayed=True).tensors():
            rows = table.for_tensor(name)
            axis.plot(
                rows.column("step"),
                rows.column("angular_update"),
                color=colors[name],
                linewidth=1,
                label=_layer_label(table, name),
            )
        normalized = table.where(decayed=True, scale_invariant=True)
        rows = normalized.for_tensor(normalized.tensors()[0]) if len(normalized) else normalized
        if len(rows) and not np.all(np.isnan(rows.column("predicted_angular_update"))):
            axis.plot(
                rows.column("step"),
                rows.column("predicted_angular_update"),
                "k--",
                linewidth=2,
                label="theory: sqrt(2γ_tλ(1−β1)/(1+β1))",
            )
        else:
            _no_prediction_note(axis)
        _cut_log_axis(axis, [r.table.where(decayed=True) for r in runs], "angular_update")

    return _per_optimizer_panels(
        runs,
        draw,
        path,
        ylabel="angular update per step (radians, log scale)",
        title="Angle between θ before and after each step, per layer; theory (Kosson et al. "
        "2024): the same for all normalized layers at equilibrium",
    )


def plot_weight_norms(runs: list[InspectedRun], path: Path) -> Path:
    """‖θ‖ of each decayed tensor over training, with AdamW's predicted equilibrium norm."""

    def draw(axis, run, colors):
        table = run.table
        for name in table.where(decayed=True).tensors():
            rows = table.for_tensor(name)
            axis.plot(
                rows.column("step"),
                rows.column("weight_norm"),
                color=colors[name],
                linewidth=1.8,
                label=_layer_label(table, name),
            )
            if not np.all(np.isnan(rows.column("predicted_weight_norm"))):
                axis.plot(
                    rows.column("step"),
                    rows.column("predicted_weight_norm"),
                    "--",
                    color=colors[name],
                    linewidth=1,
                )
        if np.all(np.isnan(table.column("predicted_weight_norm"))):
            _no_prediction_note(axis)
        else:
            axis.plot([], [], "k--", linewidth=1, label="theory: sqrt(γ_t·d/(2λ)), same color")
        _cut_log_axis(axis, [r.table.where(decayed=True) for r in runs], "weight_norm")

    return _per_optimizer_panels(
        runs,
        draw,
        path,
        ylabel="weight norm ‖θ‖ (log scale)",
        title="Weight norm per layer (dashed: AdamW's equilibrium norm for normalized layers, "
        "d = number of elements)",
    )


def plot_decay_over_time(runs: list[InspectedRun], path: Path) -> Path:
    """Median effective decay per layer over the run, beside the learning-rate schedule."""
    plt = pyplot()
    colors = _layer_colors(_decayed_tensors(runs))
    figure, axes = plt.subplots(1, len(runs) + 1, figsize=(5 * (len(runs) + 1), 4.4))
    for axis, run in zip(axes, runs):
        table = run.table.where(decayed=True)
        for name in table.tensors():
            rows = table.for_tensor(name)
            steps = rows.column("step")
            axis.plot(
                steps,
                rows.column("rate_p50"),
                color=colors[name],
                label=_layer_label(run.table, name),
            )
            axis.fill_between(
                steps,
                rows.column("rate_p5"),
                rows.column("rate_p95"),
                color=colors[name],
                alpha=0.12,
            )
        if len(table) and all(row.rate_cv == 0 for row in table):
            axis.text(
                0.03,
                0.03,
                "all layers coincide: one rate γ_t·λ\nfor every element",
                transform=axis.transAxes,
                fontsize=8,
            )
        axis.set_yscale("log")
        _cut_log_axis(axis, [table], "rate_p5", "rate_p95")
        axis.set_title(
            f"{run.label}: median, band 5–95th percentile",
            color=OPTIMIZER_COLORS.get(run.spec.optimizer),
        )
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("effective decay per step (log scale)")
        axis.grid(alpha=0.3)
        _legend_or_note(axis, fontsize=7, loc="best")
    schedule = axes[-1]
    for run in runs:
        rows = run.table.for_tensor(run.table.tensors()[0])
        schedule.plot(
            rows.column("step"),
            rows.column("lr"),
            color=OPTIMIZER_COLORS.get(run.spec.optimizer),
            label=run.label,
        )
    schedule.set_title("learning-rate schedule")
    schedule.set_xlabel("optimizer step")
    schedule.set_ylabel("learning rate γ_t")
    schedule.grid(alpha=0.3)
    schedule.legend(fontsize=8)
    figure.suptitle(
        "Effective weight decay per layer over training: AdamW's is γ_t·λ for every weight; "
        "Adam + L2's is γ_t·λ/(sqrt(v̂)+ε), different per weight"
    )
    figure.tight_layout()
    return save_figure(figure, path)


def plot_decay_vs_grad_rms(runs: list[InspectedRun], path: Path) -> Path:
    """Per element: effective decay against the gradient's RMS sqrt(v̂), mid-run."""

    def draw(axis, run, colors):
        for name, (rates, rms) in run.elements.items():
            axis.scatter(
                rms,
                rates,
                s=4,
                alpha=0.35,
                color=colors[name],
                rasterized=True,
                label=_layer_label(run.table, name),
            )
        if run.elements and run.spec.optimizer == "adam":
            rms_all = np.concatenate([rms for _, rms in run.elements.values()])
            grid = np.geomspace(max(rms_all.min(), 1e-12), rms_all.max(), 50)
            steps = sorted(set(run.table.column("step")))
            nearest = min(steps, key=lambda s: abs(s - run.elements_step))
            lr = run.table.where(step=nearest)[0].lr
            axis.plot(
                grid,
                lr * run.spec.weight_decay / (grid + 1e-8),
                "k--",
                linewidth=1,
                label="γλ/(sqrt(v̂)+ε): slope −1",
            )
        axis.set_xscale("log")

    return _per_optimizer_panels(
        runs,
        draw,
        path,
        ylabel="effective decay per step (log scale)",
        xlabel="gradient RMS per element, sqrt(v̂) (log scale)",
        title=f"Decay vs gradient size, element by element, at step {runs[0].elements_step}: "
        "L2 decays large-gradient weights less; AdamW decays all alike",
    )


def plot_inspection(runs: list[InspectedRun], out: Path) -> list[Path]:
    """Every figure of `decoupled inspect`, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_decay_distributions(runs, out / "decay_distribution.png"),
        plot_angular_updates(runs, out / "angular_update.png"),
        plot_weight_norms(runs, out / "weight_norms.png"),
        plot_decay_over_time(runs, out / "decay_over_time.png"),
        plot_decay_vs_grad_rms(runs, out / "decay_vs_grad_rms.png"),
    ]
