r"""Decoupled weight decay for any torch optimizer: ``with_decoupled_decay(OptimizerClass)``.

The class factory returns a subclass of ``OptimizerClass`` whose ``weight_decay`` moves the
weights directly, outside the base optimizer's update (Loshchilov & Hutter, "Decoupled Weight
Decay Regularization", arXiv 1711.05101; the factory follows TensorFlow Addons'
``extend_with_decoupled_weight_decay``):

.. math::
   \theta_t = \mathrm{base\_step}(\theta_{t-1}) - m_t \odot c_t\,(\theta_{t-1} - \theta_0)

with c_t the per-step rate of the ``decay_scale`` convention (``decay.py``: γ_t·λ by
default), θ₀ = 0 unless ``decay_to="init"``, and m_t = 1, or with ``cautious=True`` the
cautious mask (arXiv 2510.12402) ``u ⊙ (θ_{t−1} − θ₀) ≥ 0`` where u = θ_{t−1} −
base_step(θ_{t−1}) is the base step's own change. The base's L2 term is switched off: its
groups read ``weight_decay = 0`` while it steps (a base that has no ``weight_decay`` argument
is refused). Where the base's update does not read θ (RMSprop, Adagrad, NAdam, RAdam, Lion),
this equals decaying first, ``θ·(1 − c)``, then stepping, to float rounding: for NAdam and
RAdam, their own ``decoupled_weight_decay=True``; for torch's Adafactor, whose step size
follows ‖θ‖, it differs from Adafactor's own decay by O(c) per step.

The group key ``weight_decay`` holds λ (a number or a schedule ``step -> λ``), as for
``decoupled.AdamW``; the state dict keeps it there, with θ₀ under ``decay_references``. A plain
``OptimizerClass`` loading that dict would read λ as its L2 coefficient.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from decoupled.optim._base import (
    DecayOptimizer,
    DecayTerms,
    _given_group_declines_lambda_norm,
    as_float,
    is_zero,
)
from decoupled.optim._checks import check_group
from decoupled.optim.decay import cautious_mask, check_cautious, weight_decay_at

__all__ = ["with_decoupled_decay"]

#: the options the subclass adds to the base's, with their defaults
DECAY_OPTIONS = {
    "decay_scale": None,
    "decay_to": "zero",
    "max_lr": None,
    "lambda_norm": None,
    "decay_period": None,
    "cautious": False,
}


def with_decoupled_decay(optimizer_class: type) -> type:
    """A subclass of ``optimizer_class`` (a ``torch.optim.Optimizer``) with decoupled weight
    decay (module docstring). It takes the base's arguments, its ``weight_decay`` being λ of
    the decoupled decay (default: the base's default), plus ``decay_scale``, ``max_lr``,
    ``lambda_norm``, ``decay_period`` and ``decay_to`` as in :class:`decoupled.AdamW`,
    ``cautious`` (cautious weight decay) and ``skip_nonfinite``.

    >>> RMSpropW = with_decoupled_decay(torch.optim.RMSprop)
    >>> optimizer = RMSpropW(model.parameters(), lr=1e-3, weight_decay=0.1)
    """
    if not (
        isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
    ):
        raise TypeError(
            f"Invalid OptimizerClass value: {optimizer_class!r} (must be a subclass of "
            "torch.optim.Optimizer, such as torch.optim.RMSprop)"
        )
    name = optimizer_class.__name__
    if issubclass(optimizer_class, DecayOptimizer):
        raise ValueError(
            f"Invalid OptimizerClass value: decoupled.{name} (its decay options are built in: "
            "use decoupled.AdamW or decoupled.SGDW)"
        )
    signature = inspect.signature(optimizer_class.__init__)
    parameter = signature.parameters.get("weight_decay")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise ValueError(
            f"Invalid OptimizerClass value: {name} (it has no weight_decay argument with a "
            "default, so its own decay cannot be turned off; with_decoupled_decay needs one)"
        )
    namespace = {
        "__doc__": f"{name} with decoupled weight decay (``decoupled.with_decoupled_decay``).",
        "__module__": __name__,
        "__qualname__": f"DecoupledDecay{name}",
        "base_optimizer": optimizer_class,
        "_base_signature": signature,
        "_base_weight_decay": parameter.default,
    }
    return type(f"DecoupledDecay{name}", (_DecoupledDecay, optimizer_class), namespace)


class _DecoupledDecay:
    """The methods the factory's classes put in front of their base optimizer's."""

    decoupled = True  # what the diagnostics read (``decay_kind``)
    family = ("L2", "decoupled weight decay")
    base_optimizer: type
    _base_signature: inspect.Signature
    _base_weight_decay: Any

    # c, the peak lr and its checks: AdamW's own code
    decoupled_rate = DecayOptimizer.decoupled_rate
    peak_lr = DecayOptimizer.peak_lr
    _peak_lr_source = DecayOptimizer.__dict__["_peak_lr_source"]
    _check_below_peak = DecayOptimizer._check_below_peak
    _all_grads_finite = DecayOptimizer._all_grads_finite

    def __init__(
        self,
        params,
        *args,
        decay_scale: str | None = None,
        decay_to: str = "zero",
        max_lr: float | None = None,
        lambda_norm: float | None = None,
        decay_period: int | None = None,
        cautious: bool = False,
        skip_nonfinite: bool = False,
        **kwargs,
    ) -> None:
        bound = self._base_signature.bind(self, params, *args, **kwargs)
        weight_decay = bound.arguments.get("weight_decay", self._base_weight_decay)
        bound.arguments["weight_decay"] = 0.0  # the base's own L2 term: off
        lr = bound.arguments.get("lr", self._base_signature.parameters.get("lr"))
        lr = getattr(lr, "default", lr)
        options = {
            "weight_decay": weight_decay,
            "decay_scale": decay_scale,
            "decay_to": decay_to,
            "max_lr": max_lr,
            "lambda_norm": lambda_norm,
            "decay_period": decay_period,
            "cautious": cautious,
        }
        self._check_options({**_completed(dict(options)), "lr": 1e-3 if lr is None else lr})
        self._decay_options = options
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0
        self.decay_references: dict[Tensor, Tensor] = {}  # θ₀ per parameter (decay_to="init")
        #: the latest cautious step's mask per parameter (True: decayed), for DecayMonitor
        self.cautious_masks: dict[Tensor, Tensor] = {}
        super().__init__(*bound.args[1:], **bound.kwargs)
        self.defaults.update(options)
        cautious_groups = [group for group in self.param_groups if group["cautious"]]
        if cautious_groups and not any(map(_decays, cautious_groups)):
            raise ValueError(
                "Invalid cautious value: True with weight_decay=0 in every group (cautious "
                "masking needs a decay to mask: give weight_decay > 0 or lambda_norm)"
            )

    def _check_options(self, group: dict) -> None:
        check_group(group, decoupled=True)
        check_cautious(group, True, self.family)

    def add_param_group(self, param_group: dict) -> None:
        declines = _given_group_declines_lambda_norm(param_group)
        given = dict(param_group)
        for key, value in self._decay_options.items():
            given.setdefault(key, value)
        super().add_param_group(given)
        group = _completed(self.param_groups[-1])
        if declines:
            group["lambda_norm"] = None
        try:
            check_group(group, decoupled=True)
            check_cautious(group, True, self.family)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        group.setdefault("construction_lr", as_float(group["lr"]))
        group.setdefault("decay_steps", 0)
        if group["decay_to"] == "init":
            for p in group["params"]:
                self.decay_references.setdefault(p, p.detach().clone())

    @torch.no_grad()
    def reset_decay_reference(self) -> None:
        """Take the parameters' current values as θ₀ for ``decay_to="init"``."""
        for group in self.param_groups:
            if group["decay_to"] == "init":
                for p in group["params"]:
                    self.decay_references[p] = p.detach().clone()

    def _decay_terms(self, group: dict, params: list[Tensor]) -> DecayTerms:
        """This step's λ, c and θ₀ per parameter (as ``DecayOptimizer._decay_terms``)."""
        weight_decay = weight_decay_at(group, group["decay_steps"] + 1)
        rate = self.decoupled_rate(group, weight_decay)
        init = group["decay_to"] == "init"
        return DecayTerms(weight_decay, rate, [self.decay_references[p] if init else None
                                               for p in params])  # fmt: skip

    def _base_step(self) -> None:
        """The base optimizer's step with its L2 term off, without the step hooks a second
        time (they run once, around this whole step)."""
        step = self.base_optimizer.step
        step = step.__wrapped__ if getattr(step, "hooked", False) else step
        weight_decays = [group["weight_decay"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["weight_decay"] = 0.0
            step(self)
        finally:
            for group, weight_decay in zip(self.param_groups, weight_decays):
                group["weight_decay"] = weight_decay

    def step(self, closure: Callable[[], Any] | None = None):
        """The base's step, then the decoupled decay of the weights it moved (θ_{t−1} read
        before the step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite and not self._all_grads_finite():
            self.skipped_steps += 1
            return loss
        planned = []  # every group's terms first: a bad λ or lr raises before any change
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            planned.append((group, params, self._decay_terms(group, params)))
        with torch.no_grad():
            previous = [
                [p.detach().clone() for p in params] if not is_zero(terms.rate) else []
                for _, params, terms in planned
            ]
        self._base_step()
        with torch.no_grad():
            for (group, params, terms), before in zip(planned, previous):
                for param, old, reference in zip(params, before, terms.references):
                    mask = _decay_after_(param, old, terms.rate, reference, group["cautious"])
                    if mask is not None:
                        self.cautious_masks[param] = mask
                group["decay_steps"] += 1
        return loss

    def state_dict(self) -> dict:
        """The base's, with θ₀ under ``decay_references`` (by parameter index, as torch
        numbers ``state``); a λ schedule is saved as its latest value, as ``AdamW`` does."""
        state = super().state_dict()
        for saved, group in zip(state["param_groups"], self.param_groups):
            if callable(group["weight_decay"]):
                saved["weight_decay"] = weight_decay_at(group, max(group["decay_steps"], 1))
                saved["weight_decay_schedule"] = True
        if self.decay_references:
            index = {id(p): i for i, p in enumerate(_all_params(self))}
            state["decay_references"] = {
                index[id(p)]: ref.clone() for p, ref in self.decay_references.items()
            }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As the base's; a group keeps its λ schedule when the checkpoint saved one, θ₀ come
        back from ``decay_references``, and a dict saved by the plain base gets this
        optimizer's decay options."""
        state_dict = dict(state_dict)
        references = state_dict.pop("decay_references", {})
        schedules = [group["weight_decay"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, local in zip(self.param_groups, schedules):
            if group.pop("weight_decay_schedule", False) and callable(local):
                group["weight_decay"] = local
        params = _all_params(self)
        for i, reference in references.items():
            self.decay_references[params[int(i)]] = reference.to(params[int(i)])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        options = self.__dict__.get("_decay_options", DECAY_OPTIONS)
        for group in self.param_groups:
            for key, value in options.items():
                if key != "weight_decay":
                    group.setdefault(key, value)
            _completed(group)
            group.setdefault("construction_lr", as_float(group["lr"]))
            group.setdefault("decay_steps", 0)


def _decays(group: dict) -> bool:
    """Whether a group has a decay at all (a schedule counts: it may be positive later)."""
    weight_decay = group["weight_decay"]
    return group.get("lambda_norm") is not None or callable(weight_decay) or weight_decay != 0


def _completed(group: dict) -> dict:
    """``decay_scale`` filled in as ``DecayOptimizer._completed`` does."""
    if group.get("decay_scale") is None:
        group["decay_scale"] = "schedule" if group.get("lambda_norm") is not None else "lr"
    return group


def _all_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _decay_after_(
    param: Tensor, before: Tensor, rate: float | Tensor, reference: Tensor | None, cautious: bool
) -> Tensor | None:
    """θ ← θ − m·c·(θ_{t−1} − θ₀) after the base step (module docstring); ``before`` is
    θ_{t−1}. With ``cautious`` the mask compares the base step's change u = θ_{t−1} − θ with
    θ_{t−1} − θ₀ (``decay.cautious_mask``), and is returned."""
    if is_zero(rate):
        return None
    if torch.is_complex(param):  # the mask compares real and imaginary parts one by one
        param, before = torch.view_as_real(param), torch.view_as_real(before)
        reference = None if reference is None else torch.view_as_real(reference)
    offset = before if reference is None else before - reference
    decay = offset * rate
    mask = None
    if cautious:
        mask = cautious_mask(before - param, before, reference)
        decay = torch.where(mask, decay, 0.0)
    param.sub_(decay)
    return mask
