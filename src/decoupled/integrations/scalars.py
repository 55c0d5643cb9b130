"""The monitor's rows as named scalars, the one naming scheme every logger receives.

Per decayed tensor (λ > 0 at that step), with ``<layer>`` the tensor's name in the model
(``encoder.layer.0.attention.self.query.weight``):

* ``decay/<layer>/rate_mean``, ``rate_cv``, ``rate_p5``, ``rate_p50``, ``rate_p95``: the
  effective decay rate per element (fraction of the weight removed per step; rates.py),
  its mean, its spread (std/mean: 0 under decoupled decay, large under Adam + L2) and its
  quantiles;
* ``decay/<layer>/angular_update`` (radians per step) and, where theory has one,
  ``decay/<layer>/predicted_angular_update``;
* ``decay/<layer>/weight_norm`` and, where theory has one, ``predicted_weight_norm``;
* ``decay/<layer>/grad_to_weight``: ‖∇f‖/‖θ‖, and ``decay/<layer>/numel``, its element
  count (the d of the equilibrium norm; lets a figure label the layer).

Whole model, over the decayed tensors: ``decay_model/lr`` (γ_t of the first decayed tensor's
group), ``decay_model/weight_decay`` (the largest λ), ``decay_model/rate_mean`` and
``decay_model/rate_cv`` (means weighted by element count), ``decay_model/angular_update``
(the mean over tensors) and ``decay_model/weight_norm`` (‖θ‖ of all decayed tensors
together). A value that is not finite (no prediction, an undefined ratio) is left out, so
every logged value is a number. Hugging Face's TensorBoard and W&B callbacks prefix each name
with ``train/``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from decoupled.diagnostics.monitor import DecayMonitor
from decoupled.diagnostics.table import DecayRecord

#: the integrations' logging interval. A recorded step (measuring, then writing ~50 scalars)
#: costs about 1.5 of mnist1d's 1.6 ms steps on a 2-core CPU (benchmarks/callback_overhead.py):
#: 12–16% more time when every 10th step is recorded, 2–6% (3% in the hooks alone) at every
#: 50th. 50 is also Lightning's own ``log_every_n_steps``.
DEFAULT_EVERY_N_STEPS = 50

#: per-tensor fields logged, in this order
LAYER_FIELDS = (
    "rate_mean",
    "rate_cv",
    "rate_p5",
    "rate_p50",
    "rate_p95",
    "angular_update",
    "predicted_angular_update",
    "weight_norm",
    "predicted_weight_norm",
    "grad_to_weight",
    "numel",
)
#: whole-model fields logged
MODEL_FIELDS = ("lr", "weight_decay", "rate_mean", "rate_cv", "angular_update", "weight_norm")


def layer_tag(tensor: str, field: str) -> str:
    return f"decay/{tensor}/{field}"


def model_tag(field: str) -> str:
    return f"decay_model/{field}"


def decay_scalars(rows: list[DecayRecord]) -> dict[str, float]:
    """The scalars of one recorded step (the monitor's rows of that step), by the scheme of
    the module docstring."""
    decayed = [row for row in rows if row.decayed]
    scalars: dict[str, float] = {}
    for row in decayed:
        for field in LAYER_FIELDS:
            scalars[layer_tag(row.tensor, field)] = float(getattr(row, field))
    if decayed:
        numel = sum(row.numel for row in decayed)
        model = {
            "lr": decayed[0].lr,
            "weight_decay": max(row.weight_decay for row in decayed),
            "rate_mean": sum(row.rate_mean * row.numel for row in decayed) / numel,
            "rate_cv": sum(row.rate_cv * row.numel for row in decayed) / numel,
            "angular_update": sum(row.angular_update for row in decayed) / len(decayed),
            "weight_norm": math.sqrt(sum(row.weight_norm**2 for row in decayed)),
        }
        scalars.update({model_tag(field): float(value) for field, value in model.items()})
    return {tag: value for tag, value in scalars.items() if math.isfinite(value)}


class NewSteps:
    """Reads a monitor's rows recorded since the last read, one step at a time, so that each
    integration logs every recorded step exactly once."""

    def __init__(self, monitor: DecayMonitor) -> None:
        self.monitor = monitor
        self._read = 0  # rows already handed out

    def __iter__(self) -> Iterator[tuple[int, dict[str, float]]]:
        """(monitor step, scalars) for each step recorded since the last iteration."""
        records = self.monitor.records
        start, self._read = self._read, len(records)
        by_step: dict[int, list[DecayRecord]] = {}
        for row in records[start : self._read]:
            by_step.setdefault(row.step, []).append(row)
        for step, rows in by_step.items():
            yield step, decay_scalars(rows)


def check_every_n_steps(every_n_steps: object) -> int:
    """The one error for a logging interval that is not a positive integer."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(
            f"Invalid every_n_steps value: {every_n_steps!r} (must be an integer >= 1)"
        )
    return every_n_steps


def attach_monitor(optimizer, model, every_n_steps: int, caller: str) -> DecayMonitor:
    """A :class:`DecayMonitor` on the optimizer a trainer steps: wrappers that hold the real
    optimizer as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``) are looked through. An optimizer the monitor does not support is
    refused with the list of those it does."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    try:
        return DecayMonitor(optimizer, model, every=every_n_steps)
    except TypeError as error:
        raise TypeError(f"{caller} cannot monitor this trainer's optimizer: {error}") from error
