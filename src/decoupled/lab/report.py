"""Reports: report.md and report.html with plots, rebuilt from the store at any time.

A report is a list of blocks (heading, paragraph, preformatted text, table, image) rendered
twice, to Markdown and to HTML, so both always say the same. This is the only module that
imports matplotlib.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from decoupled.lab.comparison import Arm, Comparison, format_table, metric_scale
from decoupled.lab.train import DECAY_KIND


@dataclass(frozen=True)
class Block:
    kind: str  # h1 | h2 | p | pre | table | img
    content: object


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"adam": "#d62728", "adamw": "#1f77b4", "sgd": "#ff7f0e", "sgdw": "#2ca02c"}


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
    plt = _pyplot()
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
                label=f"{arm.name} ({DECAY_KIND[arm.optimizer]}, n={len(values)})",
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
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_per_seed(comparison: Comparison, path: Path) -> Path:
    """Final metric per seed, one column per optimizer, lines joining the same seed; a
    diverged seed is a cross on a row above the others, labelled "diverged"."""
    plt = _pyplot()
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
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def decay_table(comparison: Comparison) -> list[list[str]]:
    """The Adam vs AdamW table of the README, filled with this comparison's measurements."""
    scale, unit = metric_scale(comparison.task.metric)
    header = ["", *(f"{a.name} ({DECAY_KIND[a.optimizer]})" for a in comparison.arms)]
    applied = ["how the decay is applied"]
    per_element = ["decay per step per weight, at peak lr"]
    metric = [f"generalization: {comparison.task.metric.replace('_', ' ')}"]
    norms = ["final weight norm (all parameters)"]
    for arm in comparison.arms:
        lam = _fmt(arm.spec.weight_decay)
        if DECAY_KIND[arm.optimizer] == "L2":
            applied.append(
                f"g ← g + λθ (λ = {lam}); then divided by √v̂+ε"
                if "adam" in arm.optimizer
                else f"g ← g + λθ (λ = {lam})"
            )
        else:
            applied.append(f"θ ← θ(1 − γλ) (λ = {lam}), outside the scaling")
        summary = arm.mean_decay_summary()
        if not summary:
            per_element.append("—")
        elif summary.get("cv", 0) < 1e-9:
            per_element.append(f"{_fmt(summary['median'])} for every decayed weight")
        else:
            per_element.append(
                f"median {_fmt(summary['median'])}, 5–95%: {_fmt(summary['p5'])}–"
                f"{_fmt(summary['p95'])} (×{summary['spread_p95_p5']:.1f} spread, "
                f"CV {summary['cv']:.2f})"
            )
        interval = arm.interval()
        metric.append(
            "—"
            if interval is None
            else f"{interval.mean * scale:.2f}{unit} ± {interval.half_width * scale:.2f}"
            if interval.n > 1
            else f"{interval.mean * scale:.2f}{unit}"
        )
        totals = [
            r.metrics["weight_norms"]["total"] for r in arm.records.values() if r.status == "done"
        ]
        norms.append(_fmt(sum(totals) / len(totals)) if totals else "—")
    return [header, applied, per_element, metric, norms]


def compare_blocks(name: str, comparison: Comparison, plot_dir: Path, rel: str) -> list[Block]:
    spec = comparison.arms[0].spec if comparison.arms else None
    seeds = max((len(a.records) for a in comparison.arms), default=0)
    blocks = [Block("h2", f"{name}: {comparison.task.name}")]
    if spec is not None:
        description = comparison.task.description.rstrip(".")
        protocol = (
            f"{description}. Protocol: {spec.steps} steps per run, {spec.schedule} lr schedule "
            f"(warm-up {spec.warmup_steps}), up to {seeds} seeds; every optimizer sees the same "
            "initial weights and batches for a given seed, and biases and normalization layers "
            "are not decayed."
        )
        blocks.append(Block("p", protocol))
    blocks.append(Block("pre", format_table(comparison)))
    blocks.extend(_missing_blocks(comparison.missing))
    blocks.append(Block("p", "What the decay does, measured (means over seeds):"))
    blocks.append(Block("table", decay_table(comparison)))
    if any(a.records for a in comparison.arms):
        curves = plot_curves(comparison, plot_dir / f"{name}-curves.png")
        per_seed = plot_per_seed(comparison, plot_dir / f"{name}-per-seed.png")
        blocks.append(Block("img", f"{rel}/{curves.name}"))
        blocks.append(Block("img", f"{rel}/{per_seed.name}"))
    return blocks


def _missing_blocks(missing: dict[str, str] | None) -> list[Block]:
    """One paragraph per kind of planned run without a result (``workflow.missing_runs``)."""
    return [Block("p", f"Warning: {line}.") for line in (missing or {}).values()]


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        if block.kind == "h1":
            out.append(f"# {block.content}\n")
        elif block.kind == "h2":
            out.append(f"## {block.content}\n")
        elif block.kind == "p":
            out.append(f"{block.content}\n")
        elif block.kind == "pre":
            out.append(f"```\n{block.content}\n```\n")
        elif block.kind == "table":
            rows = block.content
            out.append("| " + " | ".join(rows[0]) + " |")
            out.append("|" + " --- |" * len(rows[0]))
            out.extend("| " + " | ".join(row) + " |" for row in rows[1:])
            out.append("")
        elif block.kind == "img":
            out.append(f"![{Path(str(block.content)).stem}]({block.content})\n")
    return "\n".join(out)


def render_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        text = block.content
        if block.kind in ("h1", "h2", "p"):
            body.append(f"<{block.kind}>{html.escape(str(text))}</{block.kind}>")
        elif block.kind == "pre":
            body.append(f"<pre>{html.escape(str(text))}</pre>")
        elif block.kind == "table":
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>"
                    for c in row
                )
                + "</tr>"
                for i, row in enumerate(text)
            )
            body.append(f"<table>{rows}</table>")
        elif block.kind == "img":
            body.append(f'<img src="{html.escape(str(text))}" alt="{html.escape(str(text))}">')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(out_dir: Path, blocks: list[Block], title: str = "decoupled report") -> list[Path]:
    """Write report.md and report.html into ``out_dir`` (each via a temporary file and an
    atomic rename, so an interrupted write never leaves half a report)."""
    paths = []
    for name, text in (
        ("report.md", render_markdown(blocks)),
        ("report.html", render_html(blocks, title)),
    ):
        path = out_dir / name
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
        paths.append(path)
    return paths


def plot_heatmaps(items, metric: str, percent: bool, path: Path) -> Path:
    """The paper's Figure 2: the final metric over lr × λ, one panel per optimizer, the best
    cell boxed, every cell labelled with its value or, if it has none, with why (diverged,
    "k/n diverged" when some of its n seeds did, failed, running, missing; grid axes are
    log-spaced values)."""
    plt = _pyplot()
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
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_axes(items, metric: str, percent: bool, path: Path) -> Path:
    """Metric against lr at each optimizer's best λ, and against λ at its best lr."""
    plt = _pyplot()
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
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def sweep_blocks(
    name: str, task, items, plot_dir: Path, rel: str, spec, missing: dict[str, str] | None = None
) -> list[Block]:
    """A sweep's section; ``missing``: ``workflow.missing_runs`` lines, one paragraph each."""
    from decoupled.lab.sweep import format_landscapes

    metric = task.metric.replace("_", " ")
    percent = metric_scale(task.metric)[1] == "%"
    explanation = (
        f"{spec.steps} steps per run, {spec.schedule} schedule, decay_scale "
        f"{spec.decay_scale}. The slope of log(best λ) against log(lr) across the grid's rows "
        "is about −1 when the good region is a diagonal (lr and λ must be tuned together) and "
        "about 0 when it is separable (Loshchilov & Hutter 2019, Figure 2)."
    )
    blocks = [Block("h2", f"{name}: {task.name}, lr × weight decay"), Block("p", explanation)]
    blocks.append(Block("pre", format_landscapes(items, task.metric)))
    blocks.extend(_missing_blocks(missing))
    if any(land.best() is not None for land in items):
        heatmap = plot_heatmaps(items, metric, percent, plot_dir / f"{name}-heatmap.png")
        axes = plot_axes(items, metric, percent, plot_dir / f"{name}-axes.png")
        blocks += [Block("img", f"{rel}/{heatmap.name}"), Block("img", f"{rel}/{axes.name}")]
    return blocks
