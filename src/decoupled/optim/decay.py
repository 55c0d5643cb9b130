"""How weight decay enters a step: the two places it can go, and how big it is.

There are exactly two ways to apply a weight-decay coefficient λ (Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019, arXiv 1711.05101):

* **L2 (coupled)** — add λ·(θ − θ₀) to the gradient *before* the optimizer's preconditioning;
  Adam then divides it by ``sqrt(v̂) + ε`` like any gradient. (optax: ``add_decayed_weights``
  placed before ``scale_by_adam``.)
* **Decoupled** — move the weights directly, ``θ ← θ − c·(θ − θ₀)``, *outside* the
  preconditioning, with a per-step rate ``c``. (optax's ``adamw`` is ``scale_by_adam``
  followed by ``add_decayed_weights``: the whole difference is the order of two steps.)

θ₀ is 0 (``decay_to="zero"``, ordinary decay) or the parameters when the optimizer was built
(``decay_to="init"``, L2-SP-style fine-tuning: Li, Grandvalet & Davoine 2018, arXiv 1802.01483).

The per-step rate ``c`` depends on a convention, the ``decay_scale`` switch
(``SCIENCE.md`` §2). γ_t is the current lr, α the peak lr:

==============  ======================  =================================================
decay_scale     c (per step)            used by
==============  ======================  =================================================
``"lr"``        γ_t · λ                 torch.optim.AdamW, optax.adamw, Keras, timm
``"schedule"``  (γ_t / α) · λ           the paper (η_t·λ), Composer's DecoupledAdamW
``"constant"``  λ                       TensorFlow Addons' DecoupledWeightDecayExtension
``"corrected"`` (γ_t² / α) · λ          AdamC (Defazio et al. 2025, arXiv 2506.02285)
==============  ======================  =================================================

The trap in the default ``"lr"`` convention (pytorch issue 38853, optax issue 292): changing
the learning rate silently changes how strongly the weights decay. With ``"schedule"`` it
does not: α and γ_t scale together, and ``c = η_t·λ`` depends on the schedule's shape only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from decoupled.optim._layout import overlapping

DECAY_SCALES = ("lr", "schedule", "constant", "corrected")
DECAY_TARGETS = ("zero", "init")


def decay_rate(
    weight_decay: float,
    lr: float | Tensor,
    *,
    decay_scale: str = "lr",
    peak_lr: float | None = None,
) -> float | Tensor:
    """The per-step rate ``c`` of decoupled decay, ``θ ← θ − c·(θ − θ₀)``.

    Args:
        weight_decay: λ, in the units of ``decay_scale``.
        lr: the current learning rate γ_t (after any schedule).
        decay_scale: one of ``DECAY_SCALES`` (table in the module docstring).
        peak_lr: α, the schedule's peak lr; required by ``"schedule"`` and ``"corrected"``.
    """
    if decay_scale == "lr":
        return lr * weight_decay  # the same float product torch.optim.AdamW computes
    if decay_scale == "constant":
        return weight_decay
    if decay_scale not in DECAY_SCALES:
        raise ValueError(f"Invalid decay_scale value: {decay_scale!r} (choose from {DECAY_SCALES})")
    if peak_lr is None or (not isinstance(peak_lr, Tensor) and not peak_lr > 0):
        raise ValueError(f"decay_scale={decay_scale!r} needs a positive peak lr, got {peak_lr}")
    if decay_scale == "schedule":
        return (lr / peak_lr) * weight_decay
    return (lr * lr / peak_lr) * weight_decay  # "corrected"


def _rate_per_unit(decay_scale: str, lr: float, peak_lr: float) -> float:
    """``c / λ`` for a convention: what one unit of λ is worth per step at this lr."""
    return float(decay_rate(1.0, lr, decay_scale=decay_scale, peak_lr=peak_lr))


_L2_REFUSAL = (
    "L2 regularization cannot be converted to decoupled weight decay for Adam: Adam divides the "
    "L2 term λθ by sqrt(v̂)+ε element by element, so the equivalent decoupled rate differs per "
    "weight and changes every step; no single λ reproduces it (Loshchilov & Hutter 2019, "
    "Proposition 2). For plain SGD without momentum, L2 λ equals decoupled λ in the 'lr' "
    "convention (Proposition 1)."
)


def convert_weight_decay(
    value: float, src: str, dst: str, lr: float, max_lr: float | None = None
) -> float:
    """The λ in convention ``dst`` that decays as much per step, at lr γ, as ``value`` in ``src``.

    ``c = value · u(src) = λ_dst · u(dst)``, with ``u`` the per-unit rate of each convention
    (module table): e.g. ``λ_lr = λ_schedule / α`` and ``λ_constant = α·λ_lr`` at γ = α.

    Args:
        value: λ in convention ``src``.
        src, dst: conventions from ``DECAY_SCALES``; ``"l2"`` (Adam's coupled decay) is refused
            with the reason.
        lr: γ, the learning rate at which both must agree.
        max_lr: α, the peak lr of the schedule (default: ``lr``, i.e. converting at the peak).
    """
    for name, convention in (("src", src), ("dst", dst)):
        if convention == "l2" and src != dst:
            raise ValueError(_L2_REFUSAL)
        if convention not in DECAY_SCALES and convention != "l2":
            raise ValueError(f"Invalid {name} value: {convention!r} (choose from {DECAY_SCALES})")
    if src == dst:
        return float(value)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid lr value: {lr} (must be finite and > 0)")
    peak_lr = lr if max_lr is None else max_lr
    if not (math.isfinite(peak_lr) and peak_lr > 0):
        raise ValueError(f"Invalid max_lr value: {max_lr} (must be finite and > 0)")
    return value * _rate_per_unit(src, lr, peak_lr) / _rate_per_unit(dst, lr, peak_lr)


def weight_decay_at(group: dict, step: int) -> float:
    """λ for this step of a parameter group: a number, a schedule ``step -> λ``, or λ_norm.

    With ``lambda_norm`` set, λ = λ_norm / sqrt(decay_period), decay_period being the number
    of steps in the current run or warm-restart period: the paper's λ_norm·sqrt(b/(N·T)),
    since N·T/b is that number of steps (``decoupled.rules.normalized_weight_decay``). A group
    given its own ``weight_decay=0``, such as ``param_groups``' no-decay group, has its
    ``lambda_norm`` cleared when it is added (``_base.py``), so it stays undecayed.
    """
    lambda_norm = group.get("lambda_norm")
    if lambda_norm is not None:
        period = group.get("decay_period")
        if not period:
            raise ValueError(
                "lambda_norm needs the length of the run in steps: pass decay_period=... or "
                "drive the optimizer with decoupled.schedules.CosineWarmRestarts, which sets it"
            )
        return lambda_norm / math.sqrt(period)
    weight_decay: float | Callable[[int], float] = group["weight_decay"]
    if callable(weight_decay):
        value = float(weight_decay(step))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"Invalid weight_decay value: {value} returned by the schedule at step {step}"
            )
        return value
    return weight_decay


def apply_decoupled_decay_(param: Tensor, rate: float | Tensor, reference: Tensor | None) -> None:
    """Decoupled decay in place: ``θ ← θ·(1 − c)``, or ``θ ← θ − c·(θ − θ₀)`` toward a reference."""
    if reference is None:
        param.mul_(1 - rate)
    else:
        param.lerp_(reference, rate)  # θ + c·(θ₀ − θ)


def cautious_mask(direction: Tensor, param: Tensor, reference: Tensor | None) -> Tensor:
    """Where cautious weight decay decays: ``u_i·(θ_i − θ₀_i) ≥ 0`` (True: decay).

    Chen, Li, Liang et al., "Cautious Weight Decay", arXiv 2510.12402: the indicator
    I(u ⊙ θ ≥ 0), with ``u`` the direction the step subtracts from θ (before the lr) and θ₀
    the decay target. Zero counts as agreeing. The test compares signs, not the float
    product, so that a product too small for the dtype (it would round to ±0 and pass) cannot
    change it; a NaN on either side fails it. The C++ kernel tests the same signs.
    """
    offset = param if reference is None else param - reference
    return torch.sign(direction) * torch.sign(offset) >= 0


def apply_cautious_decay_(
    param: Tensor, rate: float | Tensor, reference: Tensor | None, direction: Tensor
) -> None:
    """Cautious decoupled decay in place: ``θ ← where(mask, decayed θ, θ)``, the decayed θ
    computed by the same operation as :func:`apply_decoupled_decay_` (so with every mask entry
    True the result is bit-identical to it), the mask from :func:`cautious_mask`."""
    if direction.is_sparse:  # SGDW's sparse momentum buffer: its absent rows are zeros
        direction = direction.to_dense()
    mask = cautious_mask(direction, param, reference)
    if reference is None:
        decayed = param * (1 - rate)
    else:
        decayed = param.lerp(reference, rate)
    param.copy_(torch.where(mask, decayed, param))


def check_cautious(group: dict, decoupled: bool, family: tuple[str, str]) -> None:
    """``cautious`` is a bool, and only for decoupled decay: L2 has no decay term to mask."""
    cautious = group.get("cautious", False)
    if not isinstance(cautious, bool):
        raise ValueError(f"Invalid cautious value: {cautious!r} (must be True or False)")
    if cautious and not decoupled:
        l2, decoupled_name = family
        raise ValueError(
            f"Invalid cautious value: True ({l2} adds weight decay to the gradient; cautious "
            f"masking needs decoupled decay: use {decoupled_name})"
        )


def add_l2_penalty(
    grad: Tensor, param: Tensor, weight_decay: float, reference: Tensor | None
) -> Tensor:
    """L2 regularization, the gradient of ``f + (λ/2)‖θ − θ₀‖²``: ``g + λ·(θ − θ₀)`` (new).

    ``weight_decay`` may be a tensor broadcasting against θ (one λ per stacked run)."""
    offset = param if reference is None else param - reference
    if isinstance(weight_decay, Tensor):
        if weight_decay.requires_grad and reference is None:
            offset = param.clone()  # the backward pass needs θ as it was before the update
        return grad.addcmul(offset, weight_decay)
    return grad.add(offset, alpha=weight_decay)


def unscale_(grads: list[Tensor], grad_scale: Tensor | None) -> None:
    """GradScaler's loss scale divided out of the gradients in place, ``g ← g/scale``: what
    torch's fused Adam/SGD kernels do with the ``grad_scale`` GradScaler hands them (the
    scales GradScaler uses are powers of two, so this equals its own ``g·(1/scale)``)."""
    if grad_scale is not None:
        for grad in grads:
            grad.div_(grad_scale.to(grad.device))


def unscale_shared_(
    grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None = None
) -> Tensor | None:
    """The scale left for a group's update to divide out. The kernels divide each gradient as
    they read it, chunk by chunk, in parallel, so gradients that overlap in memory (one
    ``.grad`` tensor given to two parameters) would be divided by two threads at once, and
    once per chunk, where the reference loop divides each entry once (as torch's loops, and
    torch's fused kernels in their order). Such a list is unscaled here, as the loop does
    it, and None returned; any other list keeps its ``grad_scale`` for the update's own pass.
    ``found_inf``: a device flag (capturable steps); where set, the division is by 1, so that
    a skipped step leaves the gradients scaled, as the kernels do."""
    if grad_scale is None:
        return None
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # DTensor: its shard
    if not overlapping([g for g in local if g.layout == torch.strided]):
        return grad_scale
    if found_inf is not None:
        skipped = found_inf.to(grad_scale.device) != 0
        grad_scale = torch.where(skipped, torch.ones_like(grad_scale), grad_scale)
    unscale_(grads, grad_scale)
    return None
