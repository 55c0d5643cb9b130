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


def check_lr(lr: float | Tensor) -> None:
    lr_value = as_float(lr)
    check_argument("lr", lr, math.isfinite(lr_value) and lr_value >= 0, "must be finite and >= 0")


def check_weight_decay(weight_decay: float) -> None:
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


class DecayOptimizer(torch.optim.Optimizer):
    """Base class: a torch Optimizer whose ``step`` may skip non-finite gradients.

    Args:
        skip_nonfinite: when True, a step in which any gradient holds NaN or Inf changes
            nothing (parameters, moments, step counts) and increments ``skipped_steps``.
            When False (default) the step behaves exactly as torch.optim's does.
    """

    #: State keys this optimizer creates lazily, in torch's names (documentation and tests).
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, *, skip_nonfinite: bool = False):
        check_params_argument(params)
        super().__init__(params, defaults)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0

    # -- hooks for subclasses ------------------------------------------------------------
    def _update_group(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    # -- the step template ---------------------------------------------------------------
    def _params_with_grad(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:  # never touched, as in torch: no decay without a gradient
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of "
                    f"shape {tuple(p.shape)}); use torch.optim.SparseAdam or a dense embedding"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _all_grads_finite(self) -> bool:
        flags = [
            torch.isfinite(p.grad).all()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
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
