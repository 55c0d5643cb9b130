"""Reports: the sections of report.md and report.html, rebuilt from the store at any time.

Each compare and sweep contributes a section of blocks (``render.py`` writes them to Markdown
and HTML): its protocol, the printed table, warnings for runs without a result, the measured
decay table, and the figures of ``figures.py``.
"""

from __future__ import annotations

from pathlib import Path

from decoupled.lab.comparison import Comparison, format_table, metric_scale
from decoupled.lab.figures import plot_axes, plot_curves, plot_heatmaps, plot_per_seed
from decoupled.lab.render import Block
from decoupled.lab.sweep import format_landscapes
from decoupled.optim.registry import REGISTRY


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def decay_table(comparison: Comparison) -> list[list[str]]:
    """The Adam vs AdamW table of the README, filled with this comparison's measurements."""
    scale, unit = metric_scale(comparison.task.metric)
    header = ["", *(f"{a.name} ({REGISTRY[a.optimizer].decay})" for a in comparison.arms)]
    applied = ["how the decay is applied"]
    per_element = ["decay per step per weight, at peak lr"]
    metric = [f"generalization: {comparison.task.metric.replace('_', ' ')}"]
    norms = ["final weight norm (all parameters)"]
    for arm in comparison.arms:
        lam = _fmt(arm.spec.weight_decay)
        if REGISTRY[arm.optimizer].decay == "L2":
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
    blocks.extend(_statistics_blocks(comparison))
    blocks.extend(_missing_blocks(comparison.missing))
    blocks.append(Block("p", "What the decay does, measured (means over seeds):"))
    blocks.append(Block("table", decay_table(comparison)))
    if any(a.records for a in comparison.arms):
        curves = plot_curves(comparison, plot_dir / f"{name}-curves.png")
        per_seed = plot_per_seed(comparison, plot_dir / f"{name}-per-seed.png")
        blocks.append(Block("img", f"{rel}/{curves.name}"))
        blocks.append(Block("img", f"{rel}/{per_seed.name}"))
    return blocks


def _statistics_blocks(comparison: Comparison) -> list[Block]:
    """How to read the verdicts: power (what this many seeds can detect) and, for a
    ``--seeds auto`` compare, why its verdict reads a confidence sequence."""
    blocks = []
    for (first, second, _, _), line in zip(comparison.paired, comparison.power, strict=False):
        if line is not None:
            blocks.append(
                Block(
                    "p",
                    f"Power, {second.name} − {first.name}: {line}. The paired t-test's power "
                    "comes from the noncentral t distribution (Cohen 1988, ch. 2) with the "
                    "spread the seeds showed; that spread is itself an estimate, hence the "
                    "range of seeds."
                    + (
                        ""
                        if comparison.design is None
                        else " It is the power of a fixed-n t-test, for reference: the "
                        "confidence sequence the verdict reads is valid at every look and "
                        "needs larger differences or more seeds."
                    ),
                )
            )
    if comparison.design is not None:
        blocks.append(
            Block(
                "p",
                "Seeds were added one round at a time (every optimizer per seed) and the data "
                "looked at after each round. The verdicts read an always-valid confidence "
                "sequence (Lai 1976; Wang & Ramdas 2023), whose error rate holds however many "
                "times it is looked at; the fixed-n t-test printed beside it would not, after "
                "stopping chosen from the data.",
            )
        )
    if comparison.adjusted:
        blocks.append(
            Block(
                "p",
                "With several pairs, the p-values are Holm-adjusted (Holm 1979): the chance of "
                "any false 'significant' among them stays at most 5%.",
            )
        )
    return blocks


def _missing_blocks(missing: dict[str, str] | None) -> list[Block]:
    """One paragraph per kind of planned run without a result (``workflow.missing_runs``)."""
    return [Block("p", f"Warning: {line}.") for line in (missing or {}).values()]


def sweep_blocks(
    name: str, task, items, plot_dir: Path, rel: str, spec, missing: dict[str, str] | None = None
) -> list[Block]:
    """A sweep's section; ``missing``: ``workflow.missing_runs`` lines, one paragraph each."""
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
