"""What every `decoupled` optimizer shares: argument checks, the step template, skipped steps.

The step template follows torch.optim (``torch/optim/adam.py``): ``step()`` gathers, per
parameter group, the parameters that have a gradient and their state, then calls one
functional core with keyword-only hyperparameters. Subclasses supply ``_init_state`` and
``_update_group``; everything else (closures, sparse-gradient refusal, ``skip_nonfinite``)
lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from decoupled.optim.decay import DECAY_SCALES, DECAY_TARGETS, decay_rate, weight_decay_at


def check_argument(name: str, value: Any, valid: bool, rule: str = "") -> None:
    """Raise ``ValueError("Invalid {name} value: {value}")`` (torch's pattern) unless ``valid``.

    ``rule`` is appended after a colon when given, so the message also says what is allowed.
    """
    if not valid:
        suffix = f" ({rule})" if rule else ""
        raise ValueError(f"Invalid {name} value: {value}{suffix}")


def as_float(value: float | Tensor) -> float:
    """A Python float from a float or a one-element tensor (for checks, never for math)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def is_zero(value: float | Tensor) -> bool:
    """True for a Python zero only. A tensor (a tensor lr times λ) counts as nonzero without
    being read: ``tensor != 0`` in an ``if`` is a data-dependent branch that breaks a
    ``torch.compile`` graph, and applying a zero rate (``θ·(1 − 0)``) leaves θ bit-identical."""
    return not isinstance(value, Tensor) and value == 0


def step_value(step: Tensor) -> float | Tensor:
    """Adam's step count for the bias corrections, as torch's ``_get_value`` reads it: a Python
    number in eager mode (faster, and bit-identical to torch), the tensor itself while
    ``torch.compile`` traces (``.item()`` would break the graph)."""
    if torch.compiler.is_compiling():
        return step
    return step.item()


def check_lr(lr: float | Tensor) -> None:
    lr_value = as_float(lr)
    check_argument("lr", lr, math.isfinite(lr_value) and lr_value >= 0, "must be finite and >= 0")


def check_weight_decay(weight_decay: float | Callable[[int], float]) -> None:
    if callable(weight_decay):  # a schedule step -> λ, checked each time it is called
        return
    value = as_float(weight_decay)
    check_argument(
        "weight_decay",
        weight_decay,
        math.isfinite(value) and value >= 0,
        "must be finite and >= 0",
    )


def check_params_argument(params: Any) -> None:
    """torch accepts any iterable; a bare tensor or an exhausted generator is a common slip."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, "
            f"but got a single {torch.typename(params)}; wrap it in a list: [tensor]"
        )


def decay_defaults(*, decoupled: bool, decay_to: str = "zero", **decoupled_options) -> dict:
    """The weight-decay options of a param group (see ``decay.py``).

    L2 optimizers (Adam, SGD) take only ``decay_to``; ``decay_scale``, ``max_lr``,
    ``lambda_norm`` and ``decay_period`` scale a decoupled decay (AdamW, SGDW).
    """
    if not decoupled and decoupled_options:
        names = ", ".join(sorted(decoupled_options))
        raise TypeError(f"{names}: only for decoupled weight decay (AdamW, SGDW), not L2")
    return {"decay_to": decay_to, **decoupled_options}


def check_group(group: dict) -> None:
    """Validate one param group's hyperparameters (every group, not only the defaults)."""
    check_lr(group["lr"])
    check_weight_decay(group["weight_decay"])
    decay_to = group.get("decay_to", "zero")
    check_argument(
        "decay_to", repr(decay_to), decay_to in DECAY_TARGETS, f"choose from {DECAY_TARGETS}"
    )
    decay_scale = group.get("decay_scale", "lr")
    check_argument(
        "decay_scale", repr(decay_scale), decay_scale in DECAY_SCALES, f"choose from {DECAY_SCALES}"
    )
    for name in ("lambda_norm", "max_lr"):
        value = group.get(name)
        if value is not None:
            valid = math.isfinite(value) and value >= 0
            check_argument(name, value, valid, "must be finite and >= 0")
    period = group.get("decay_period")
    if period is not None:
        check_argument("decay_period", period, period > 0, "must be > 0 steps")
    if group.get("lambda_norm") is not None and callable(group["weight_decay"]):
        raise ValueError(
            "Invalid lambda_norm value: give either lambda_norm or a weight_decay schedule"
        )


class DecayOptimizer(torch.optim.Optimizer):
    """Base class: decay options shared by all four optimizers, and the step template.

    Args:
        skip_nonfinite: when True, a step in which any gradient holds NaN or Inf changes
            nothing (parameters, moments, step counts) and increments ``skipped_steps``.
            When False (default) the step behaves exactly as torch.optim's does.

    Every param group also records ``construction_lr`` (the lr when it was added: the peak
    lr of last resort for ``decay_scale="schedule"``/``"corrected"``) and ``decay_steps``
    (the steps it has taken: the argument of a ``weight_decay`` schedule). With
    ``decay_to="init"`` each parameter's value at that moment is kept in its state as
    ``init_param`` (θ₀; saved in the state dict).
    """

    #: State keys this optimizer creates lazily, in torch's names (documentation and tests).
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, *, skip_nonfinite: bool = False):
        check_params_argument(params)
        super().__init__(params, defaults)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_group(group)
        lr = group["lr"]
        group.setdefault("construction_lr", as_float(lr))
        group.setdefault("decay_steps", 0)
        if group.get("decay_to") == "init":
            for p in group["params"]:
                self.state[p].setdefault("init_param", p.detach().clone())

    @torch.no_grad()
    def reset_decay_reference(self) -> None:
        """Take the parameters' current values as θ₀ for ``decay_to="init"`` (e.g. after
        loading pretrained weights into a model whose optimizer already exists)."""
        for group in self.param_groups:
            if group.get("decay_to") == "init":
                for p in group["params"]:
                    self.state[p]["init_param"] = p.detach().clone()

    def _decay_terms(self, group: dict, params: list[Tensor]) -> tuple[float, list[Tensor | None]]:
        """Advance the group's step count; return this step's λ and each parameter's θ₀."""
        group["decay_steps"] += 1
        weight_decay = weight_decay_at(group, group["decay_steps"])
        if group.get("decay_to") == "init":
            references = [self.state[p]["init_param"] for p in params]
        else:
            references = [None] * len(params)
        return weight_decay, references

    def _decoupled_rate(self, group: dict, weight_decay: float) -> float | Tensor:
        """This step's decoupled rate c for the group's ``decay_scale`` (``decay.py``)."""
        if weight_decay == 0:  # no decay op at all, as torch's `if weight_decay != 0`
            return 0.0
        scale = group["decay_scale"]
        peak_lr = self._peak_lr(group) if scale in ("schedule", "corrected") else None
        return decay_rate(weight_decay, group["lr"], decay_scale=scale, peak_lr=peak_lr)

    def _peak_lr(self, group: dict) -> float:
        """α: the group's ``max_lr`` if set, else torch schedulers' ``initial_lr``, else the lr
        at construction."""
        for key in ("max_lr", "initial_lr", "construction_lr"):
            if group.get(key) is not None:
                return as_float(group[key])
        return as_float(group["lr"])

    # -- hooks for subclasses ------------------------------------------------------------
    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    # -- the step template ---------------------------------------------------------------
    def _params_with_grad(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:  # never touched, as in torch: no decay without a gradient
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of "
                    f"shape {tuple(p.shape)}); use torch.optim.SparseAdam or a dense embedding"
                )
            params.append(p)
            grads.append(grad)
        return params, grads

    def _all_grads_finite(self) -> bool:
        flags = [
            torch.isfinite(p.grad).all()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        # A sharded (DTensor, FSDP2) gradient's flag is a pending reduction over its mesh, and
        # bool() of it would read this rank's shard only: ranks would then disagree on skipping
        # and their replicas diverge. full_tensor() reduces it, so every rank decides alike.
        flags = [f.full_tensor() if hasattr(f, "full_tensor") else f for f in flags]
        return bool(torch.stack(flags).all()) if flags else True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = [(group, *self._params_with_grad(group)) for group in self.param_groups]
        if self.skip_nonfinite and not self._all_grads_finite():
            self.skipped_steps += 1
            return loss
        for group, params, grads in gathered:
            if params:
                self._update_group(group, params, grads)
        return loss

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("skipped_steps", 0)
        for group in self.param_groups:
            group.setdefault("decay_to", "zero")
            if getattr(self, "decoupled", False):
                for key, default in (
                    ("decay_scale", "lr"),
                    ("lambda_norm", None),
                    ("decay_period", None),
                    ("max_lr", None),
                ):
                    group.setdefault(key, default)
            group.setdefault("construction_lr", as_float(group["lr"]))
            if "decay_steps" not in group:  # a torch.optim state dict: count from Adam's steps
                steps = [
                    float(self.state[p]["step"])
                    for p in group["params"]
                    if "step" in self.state.get(p, {})
                ]
                group["decay_steps"] = int(max(steps, default=0))
