"""How weight decay enters a step: the two places it can go, and how big it is.

There are exactly two ways to apply a weight-decay coefficient λ (Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", ICLR 2019, arXiv 1711.05101):

* **L2 (coupled)** — add λ·θ to the gradient, ``g ← g + λ·θ``, *before* the optimizer's
  preconditioning. Adam then divides it by ``sqrt(v̂) + ε`` like any gradient. (optax's
  ``add_decayed_weights`` placed before ``scale_by_adam`` is the same thing.)
* **Decoupled** — shrink the weights directly, ``θ ← θ − c·θ = θ·(1 − c)``, *outside* the
  preconditioning, with a per-step rate ``c``. (optax's ``adamw`` is ``scale_by_adam``
  followed by ``add_decayed_weights``: the whole difference is the order of two steps.)

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

Note the trap in the default ``"lr"`` convention (pytorch issue 38853, optax issue 292):
changing the learning rate silently changes how strongly the weights decay.
"""

from __future__ import annotations

from torch import Tensor

DECAY_SCALES = ("lr", "schedule", "constant", "corrected")


def decay_rate(
    weight_decay: float,
    lr: float | Tensor,
    *,
    decay_scale: str = "lr",
    peak_lr: float | None = None,
) -> float | Tensor:
    """The per-step shrink ``c`` of decoupled decay, ``θ ← θ·(1 − c)``, for a convention.

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
    if peak_lr is None or peak_lr <= 0:
        raise ValueError(f"decay_scale={decay_scale!r} needs a positive peak lr, got {peak_lr}")
    if decay_scale == "schedule":
        return (lr / peak_lr) * weight_decay
    if decay_scale == "corrected":
        return (lr * lr / peak_lr) * weight_decay
    raise ValueError(f"Invalid decay_scale value: {decay_scale!r} (choose from {DECAY_SCALES})")


def apply_decoupled_decay_(param: Tensor, rate: float | Tensor) -> None:
    """Decoupled weight decay, in place: ``θ ← θ·(1 − c)`` (the paper's Algorithms 1 and 2)."""
    param.mul_(1 - rate)


def add_l2_penalty(grad: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    """L2 regularization: the gradient of ``f + (λ/2)‖θ‖²``, i.e. ``g + λ·θ`` (a new tensor)."""
    return grad.add(param, alpha=weight_decay)
