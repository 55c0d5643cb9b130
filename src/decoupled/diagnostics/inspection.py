"""Compare what weight decay did in monitored runs (Adam + L2 against AdamW): how uniform it
is, whether it follows the gradient scale, and how evenly layers rotate (SCIENCE.md §8,
predictions 1 and 2). Used by ``decoupled inspect``, whose runs the lab trains
(``lab/inspection.py``): this layer only reads what a :class:`DecayMonitor` and an
optimizer's state hold, and never imports the lab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from decoupled.diagnostics.rates import element_decay_rates, sample_elements
from decoupled.diagnostics.table import DecayTable
from decoupled.diagnostics.theory import equilibrium_steps
from decoupled.optim.registry import REGISTRY

#: per-element samples kept for the scatter plot and the distributions, per tensor
ELEMENT_SAMPLE = 2000


class RunSettings(Protocol):
    """What the comparison reads of a run's settings (the lab's ``RunSpec`` has them)."""

    optimizer: str  # a name in decoupled.optim.registry
    lr: float  # peak lr γ
    weight_decay: float  # λ


@dataclass
class InspectedRun:
    """One monitored training run."""

    spec: RunSettings
    table: DecayTable
    metric: float  # the task's metric at the end
    metric_name: str
    wall_time: float
    # per decayed tensor, at the middle of the run: (effective decay rate, sqrt(v̂)) samples
    elements: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    elements_step: int = 0

    @property
    def label(self) -> str:
        info = REGISTRY.get(self.spec.optimizer)
        return info.described if info else self.spec.optimizer


def element_samples(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """Per decayed tensor with Adam state, ``ELEMENT_SAMPLE`` elements' (effective decay
    rate, sqrt(v̂)) as two arrays drawn at the same elements; keyed by ``names[id(param)]``
    (a monitor's ``names``)."""
    samples = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            rates, rms = element_decay_rates(optimizer, param, group)
            if rms is None or float(np.max(np.asarray(rates))) == 0:
                continue  # not decayed, or no Adam state
            rms_sample = sample_elements(rms, ELEMENT_SAMPLE).double().numpy()
            if isinstance(rates, torch.Tensor):  # the same draw: rates pair with their rms
                rate_sample = sample_elements(rates, ELEMENT_SAMPLE).double().numpy()
            else:
                rate_sample = np.full_like(rms_sample, rates)
            samples[names[id(param)]] = (rate_sample, rms_sample)
    return samples


# -- the comparison -----------------------------------------------------------------------
def comparison_window(table: DecayTable) -> DecayTable:
    """Rows past the first quarter of the run (the start-up transient) while γ_t is at least
    half its peak: where a fast equilibrium can keep up with the schedule. Under a cosine
    schedule that is the second quarter; with a constant lr, the last three quarters.
    """
    if not len(table):
        return table
    last = max(table.column("step"))
    peak = max(table.column("lr"))
    return DecayTable(row for row in table if row.step > last / 4 and row.lr >= peak / 2)


def _finite(values) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _median(values) -> float:
    values = _finite(values)
    return float(np.median(values)) if values else math.nan


def _mean(values) -> float:
    values = _finite(values)
    return float(np.mean(values)) if values else math.nan


def layer_means(table: DecayTable, column: str, **conditions) -> dict[str, float]:
    """Per tensor, the mean of ``column`` over :func:`comparison_window`."""
    window = comparison_window(table).where(**conditions)
    return {name: _mean(window.for_tensor(name).column(column)) for name in window.tensors()}


def comparison(runs: list[InspectedRun]) -> dict[str, dict[str, float | str]]:
    """Measured numbers per run (label -> values), over each run's comparison window."""
    result = {}
    for run in runs:
        coupled = REGISTRY[run.spec.optimizer].decay == "L2"
        cautious = run.spec.optimizer.endswith("-cautious")
        decayed = comparison_window(run.table).where(decayed=True)
        normalized = {"decayed": True, "scale_invariant": True}
        angles = layer_means(run.table, "angular_update", **normalized)
        predicted = layer_means(run.table, "predicted_angular_update", **normalized)
        ratios = _finite(angles[n] / predicted[n] for n in angles)
        result[run.label] = {
            "how": "λθ added to the gradient"
            if coupled
            else "θ ← θ − γλθ where sign(u) = sign(θ)"
            if cautious
            else "θ ← θ − γλθ after the step",
            # the share of elements decayed: rate_mean = c × fraction (c = γλ, "lr" units)
            "decayed_fraction": math.nan
            if coupled
            else _median(
                r.rate_mean / (r.lr * r.weight_decay) for r in decayed if r.lr * r.weight_decay
            ),
            "adaptive": "yes: divided by sqrt(v̂)+ε" if coupled else "no",
            "lr": run.spec.lr,
            "weight_decay": run.spec.weight_decay,
            "rate_median": _median(decayed.column("rate_p50")),
            "rate_cv": _median(decayed.column("rate_cv")),
            "rate_p95_over_p5": _median(r.rate_p95 / r.rate_p5 for r in decayed if r.rate_p5 > 0),
            "spearman": _median(decayed.column("rate_grad_rms_spearman")),
            "angle_mean": _mean(angles.values()),
            "angle_spread": max(angles.values()) / min(angles.values()) if angles else math.nan,
            "angle_vs_theory": _mean(ratios),
            "equilibrium_steps": math.nan
            if coupled
            else equilibrium_steps(run.spec.lr * run.spec.weight_decay),
            "metric": run.metric,
        }
    return result


def _cell(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def format_comparison(runs: list[InspectedRun]) -> str:
    """The Adam vs AdamW table, filled with measured numbers."""
    numbers = comparison(runs)
    labels = list(numbers)
    metric = runs[0].metric_name.replace("_", " ") if runs else "metric"
    rows = [
        ("how the decay is applied", "how"),
        ("does the adaptive scaling touch it", "adaptive"),
        ("peak lr γ, λ", None),
        ("median decay rate per step", "rate_median"),
        ("share of elements decayed (CWD mask)", "decayed_fraction"),
        ("uniformity: CV across elements", "rate_cv"),
        ("spread: p95/p5 across elements", "rate_p95_over_p5"),
        ("rank corr. of decay with grad RMS", "spearman"),
        ("angular update, normalized layers", "angle_mean"),
        ("  spread across layers: max/min", "angle_spread"),
        ("  measured / equilibrium theory", "angle_vs_theory"),
        ("  steps to equilibrium, 1/(2γλ)", "equilibrium_steps"),
        (f"final {metric}", "metric"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    column = max(30, *(len(str(numbers[label]["how"])) + 3 for label in labels))
    lines = [f"{'':<{width}}" + "".join(f"{label:<{column}}" for label in labels)]
    for name, key in rows:
        if key is None:
            cells = [f"{numbers[l]['lr']:g}, {numbers[l]['weight_decay']:g}" for l in labels]
        else:
            cells = [_cell(numbers[l][key]) for l in labels]
        lines.append((f"{name:<{width}}" + "".join(f"{c:<{column}}" for c in cells)).rstrip())
    lines[0] = lines[0].rstrip()
    lines += [
        "",
        "decay rate: fraction of a weight the decay removes per step (Adam + L2: γλ/(sqrt(v̂)+ε))",
        "CV: std/mean over a tensor's elements (0: every element decays alike); medians over",
        "  the decayed tensors",
        "angular update: radians per step, mean over normalized (scale-invariant) layers;",
        "  theory: sqrt(2γλ(1−β1)/(1+β1)) (Kosson et al. 2024)",
        "measured after the first quarter of the run, while γ_t ≥ γ_peak/2",
    ]
    return "\n".join(lines)
