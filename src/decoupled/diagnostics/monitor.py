"""DecayMonitor: measure, during training, what weight decay does to each parameter tensor.

Attach it to an optimizer; every ``every`` steps it records, per tensor that has a gradient,
the effective decay rate per element (``rates.py``; for cautious weight decay c on the elements
the step decayed, 0 elsewhere) summarized across elements, the weight
norm, the update's norm and angle, ‖g‖/‖θ‖, and the equilibrium that theory predicts for
scale-invariant tensors (``theory.py``). Rows go into a :class:`~decoupled.diagnostics.table
.DecayTable` (CSV, or the lab's results.db).

    monitor = DecayMonitor(optimizer, model, every=10)
    for batch in batches:
        ...; loss.backward(); optimizer.step()
    monitor.table.to_csv("decay.csv")

It uses torch's optimizer step hooks: the pre-hook copies the parameters (only on steps
that are recorded, so other steps cost one counter increment), the post-hook measures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from decoupled.diagnostics import theory
from decoupled.diagnostics.rates import (
    cautious_mask_of,
    decay_kind,
    element_decay_rates,
    median_grad_rms,
    step_decoupled_rate,
    step_weight_decay,
    summarize_rates,
)
from decoupled.diagnostics.scale_invariance import structurally_scale_invariant
from decoupled.diagnostics.table import DecayRecord, DecayTable


@dataclass(frozen=True)
class DecayedFraction:
    """Cautious weight decay (arXiv 2510.12402) in one step of one tensor: the fraction of its
    elements the mask decayed; the record's ``rate_mean`` is c times it."""

    step: int
    tensor: str
    fraction: float


_NO_PREDICTION = {
    "predicted_angular_update": math.nan,
    "predicted_weight_norm": math.nan,
    "predicted_grad_to_weight": math.nan,
}


class DecayMonitor:
    """Records weight-decay diagnostics of ``optimizer`` every ``every`` steps.

    Args:
        optimizer: a ``decoupled`` or ``torch.optim`` Adam, AdamW, SGD or SGDW, or a class
            made by ``decoupled.with_decoupled_decay``.
        model: optional; names the tensors (``named_parameters``) and finds the
            scale-invariant ones structurally (``structurally_scale_invariant``).
        every: record steps ``every, 2·every, ...`` (counted from the attachment).
        scale_invariant: names of scale-invariant tensors, replacing the structural guess
            (e.g. from ``scale_invariant_tensors``, the numerical check).

    ``records`` holds the rows; ``table`` wraps them as a :class:`DecayTable`. For groups
    with cautious decay, ``decayed_fractions`` holds a :class:`DecayedFraction` per recorded
    row, and the row's rates are c on the decayed elements and 0 on the others (``rates.py``).
    ``with_decoupled_decay``'s optimizers are recorded as AdamW is: r = c. ``remove()``
    detaches the hooks (also on leaving a ``with`` block).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        every: int = 10,
        scale_invariant: Iterable[str] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every value: {every!r} (must be an integer >= 1)")
        decay_kind(optimizer)  # refuse unsupported optimizers now, not at the first record
        self.optimizer = optimizer
        self.every = every
        self.names = _parameter_names(optimizer, model)
        if scale_invariant is not None:
            self.scale_invariant = set(scale_invariant)
        else:
            structural = structurally_scale_invariant(model) if model is not None else set()
            self.scale_invariant = structural
        self.records: list[DecayRecord] = []
        self.decayed_fractions: list[DecayedFraction] = []
        self.steps = 0  # optimizer steps seen
        self._before: dict[int, Tensor] = {}  # id(param) -> its value before the step
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    @property
    def table(self) -> DecayTable:
        return DecayTable(self.records)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = {}

    def __enter__(self) -> DecayMonitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def to_csv(self, path: str | Path) -> Path:
        return self.table.to_csv(path)

    # -- the hooks -----------------------------------------------------------------------
    def _recording(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._recording(self.steps + 1):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # a closure passed to step() (Lightning's, LBFGS-style loops) computes the gradients
        # after this hook: then every tensor is kept, and those still without a gradient
        # after the step are left out there
        chosen = [p for p in params if p.grad is not None] or params
        self._before = {id(p): p.detach().clone() for p in chosen}

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if not self._before:
            return
        for i, group in enumerate(optimizer.param_groups):
            for j, param in enumerate(group["params"]):
                before = self._before.get(id(param))
                if before is not None and param.grad is not None:
                    # groups added after attaching are named by position
                    name = self.names.get(id(param), f"group{i}.param{j}")
                    self.records.append(self._measure(group, param, name, before))
        self._before = {}

    # -- one tensor ----------------------------------------------------------------------
    def _measure(self, group: dict, param: Tensor, name: str, before: Tensor) -> DecayRecord:
        optimizer = self.optimizer
        kind = decay_kind(optimizer, group)
        weight_decay = step_weight_decay(optimizer, group)
        decayed, invariant = weight_decay > 0, name in self.scale_invariant
        # sqrt(v̂) per element only where the rate depends on it (Adam + L2)
        rates, rms = element_decay_rates(
            optimizer, param, group, with_grad_rms=False, before=before
        )
        # the share decayed means something only where there is a decay to mask
        mask = cautious_mask_of(optimizer, group, param, before) if decayed else None
        if mask is not None:
            fraction = float(mask.sum(dtype=torch.float64)) / max(mask.numel(), 1)
            self.decayed_fractions.append(DecayedFraction(self.steps, name, fraction))
        after = param.detach()
        # float64 norms: a float32 sum over millions of squares loses digits
        before64 = before.flatten().double()
        update = after.flatten().double() - before64  # exact for float32 parameters
        norm_before, norm_after, update_norm = _norm64(before), _norm64(after), _norm64(update)
        grad_norm = _norm64(param.grad)
        record = {
            "step": self.steps,
            "tensor": name,
            "shape": "x".join(str(s) for s in param.shape) or "scalar",
            "numel": param.numel(),
            "decayed": decayed,
            "scale_invariant": invariant,
            "decay_kind": kind.label,
            "lr": float(group["lr"]),
            "weight_decay": weight_decay,
            **summarize_rates(rates, rms),
            "grad_rms_p50": median_grad_rms(optimizer, group, param),
            "weight_norm": norm_after,
            "update_norm": update_norm,
            "angular_update": theory.angle_of_update(before64, update),
            "grad_norm": grad_norm,
            "grad_to_weight": grad_norm / norm_before if norm_before else math.nan,
            **_NO_PREDICTION,
            **(self._predictions(group, kind, param.numel()) if decayed and invariant else {}),
        }
        return DecayRecord(**record)

    def _predictions(self, group: dict, kind, numel: int) -> dict[str, float]:
        """Equilibrium predictions (theory.py) for a decayed, scale-invariant tensor."""
        predicted = {}
        lr = float(group["lr"])
        if kind.family == "adam" and kind.decoupled:
            rate = step_decoupled_rate(self.optimizer, group)
            predicted["predicted_angular_update"] = theory.adamw_angular_update(
                rate, group["betas"][0]
            )
            predicted["predicted_weight_norm"] = theory.adamw_equilibrium_norm(lr, rate, numel)
        elif kind.family == "sgd" and not group.get("nesterov") and lr > 0:
            momentum, dampening = group["momentum"], group["dampening"]
            if momentum == 0:
                dampening = 0.0  # torch ignores dampening without momentum
            if kind.decoupled:
                rate = step_decoupled_rate(self.optimizer, group)
                predicted["predicted_angular_update"] = theory.sgdw_angular_update(rate, momentum)
                predicted["predicted_grad_to_weight"] = theory.sgdw_grad_to_weight(
                    lr, rate, momentum, dampening
                )
            else:
                weight_decay = step_weight_decay(self.optimizer, group)
                predicted["predicted_angular_update"] = theory.sgd_l2_angular_update(
                    lr, weight_decay, momentum, dampening
                )
                predicted["predicted_grad_to_weight"] = theory.sgd_l2_grad_to_weight(
                    lr, weight_decay, momentum, dampening
                )
        return predicted


def _norm64(tensor: Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))


def _parameter_names(optimizer: torch.optim.Optimizer, model: nn.Module | None) -> dict:
    """id(tensor) -> the tensor's name: the model's, else ``group<i>.param<j>``."""
    from_model = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    return {
        id(p): from_model.get(id(p), f"group{i}.param{j}")
        for i, group in enumerate(optimizer.param_groups)
        for j, p in enumerate(group["params"])
    }
