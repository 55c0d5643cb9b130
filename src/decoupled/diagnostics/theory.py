r"""What theory predicts for weights in equilibrium, and the angle a step turns a weight by.

Equilibrium of scale-invariant weights (Kosson, Messmer & Jaggi, "Rotational Equilibrium: How
Weight Decay Balances Learning Across Neural Networks", ICML 2024, arXiv 2305.17212; SCIENCE.md
§4). When the loss does not change if a tensor θ is scaled (a weight feeding a normalization
layer), its gradient is orthogonal to θ, so updates only make ‖θ‖ grow while decay only
shrinks it. Both balance at an equilibrium norm, and there the expected *angular update*
(the angle between θ_{t−1} and θ_t) is set by the optimizer's hyperparameters alone — not by
the layer, its size or its gradient scale.

The derivation, in the "random walk" regime that the paper assumes (gradients of successive
steps uncorrelated, i.e. noise-dominated): with per-step decoupled rate ``c`` the decay removes
``2c‖θ‖²`` from ‖θ‖² each step; the updates add the squared length of the *total* displacement
each gradient eventually causes (momentum spreads one gradient over many steps, and these
pieces all point the same way). Equating the two gives ‖θ̂‖; dividing the RMS length of one
step's update by ‖θ̂‖ gives the angular update:

===========  =========================================  =========================================
optimizer    expected angular update per step           at equilibrium (d = numel)
===========  =========================================  =========================================
AdamW        sqrt(2c·(1−β1)/(1+β1))  (paper, Table 1)   ‖θ̂‖ = γ·sqrt(d/(2c))
SGD + L2     sqrt(2γλ·(1−τ)/(1+μ))   (paper, Table 1)   ‖g‖/‖θ‖ = sqrt(2λ(1−μ)/(γ(1−τ)))
SGDW         sqrt(2c·(1−μ)/(1+μ))    (same derivation)  ‖g‖/‖θ‖ = (1−μ)·sqrt(2c)/(γ(1−τ))
Adam + L2    none: depends on each layer's gradient scale
===========  =========================================  =========================================

μ is the momentum, τ the dampening, ``c`` the decoupled rate of the step (γλ in torch's "lr"
convention). For AdamW, with v̂ tracking E[g²], it is g/sqrt(v̂) — one gradient, normalized —
that has unit RMS per element. Momentum puts a fraction (1−β1)·β1^k of it into the step k
steps later (k = 0, 1, …); the fractions sum to 1, so each gradient eventually moves θ by
γ·g/sqrt(v̂) in total: ‖θ‖² grows by γ²·d per step, decay removes 2c‖θ‖², and the equilibrium norm
‖θ̂‖ = γ·sqrt(d/(2c)) = sqrt(γ·d/(2λ)) in the "lr" convention does not depend on the gradient.
The one-step update m̂/sqrt(v̂) is smaller: averaging uncorrelated gradients, momentum leaves
it an RMS of sqrt((1−β1)/(1+β1)) per element, which is where that factor in the angular
update comes from (γ·sqrt(d·(1−β1)/(1+β1)) divided by ‖θ̂‖).

SGDW differs from SGD + L2 (the paper's SGDM row, which puts λθ into the momentum buffer):
with the decay outside the buffer, momentum amplifies the updates by 1/(1−μ) but not the
decay, which brings in the same (1−μ) factor as AdamW's β1. With μ = 0 both read sqrt(2γλ),
and ‖g‖/‖θ‖ → sqrt(2λ/γ) (Defazio et al. 2025, arXiv 2506.02285; SCIENCE.md §6).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def angle_between(before: Tensor, after: Tensor) -> float:
    """The angle in radians between two tensors seen as vectors, stable for tiny angles.

    See :func:`angle_of_update`; ``after − before`` is formed in float64 (exact for float32
    inputs). NaN when either tensor is zero.
    """
    before64 = before.detach().flatten().double()
    return angle_of_update(before64, after.detach().flatten().double() - before64)


def angle_of_update(before: Tensor, update: Tensor) -> float:
    """The angle φ between θ and θ + Δ (flat float64 tensors), accurate for tiny angles.

    ``φ = atan2(‖θ‖·‖Δ⊥‖, ⟨θ, θ + Δ⟩)`` with ``Δ⊥ = Δ − (⟨θ, Δ⟩/‖θ‖²)·θ``, the part of the
    update orthogonal to θ: the "cross" part ‖θ × (θ + Δ)‖ = ‖θ‖·‖Δ⊥‖ and the dot part of
    atan2 (W. Kahan, "How Futile are Mindless Assessments of Roundoff in Floating-Point
    Computation?", 2006, §12, recommends atan2 over acos). The usual
    ``acos(⟨a, b⟩/(‖a‖‖b‖))`` loses all precision near 0 — where per-step angular updates
    (1e-4 to 1e-2 rad) live — because cos is flat there. Δ⊥ is computed from the small Δ,
    not from θ + Δ, so its rounding error is relative to ‖Δ‖, not ‖θ‖.
    """
    squared_norm = float(before @ before)
    along = float(before @ update)
    if squared_norm == 0 or squared_norm + 2 * along + float(update @ update) <= 0:
        return math.nan  # a zero tensor has no direction
    orthogonal = update - (along / squared_norm) * before
    cross = math.sqrt(squared_norm) * float(torch.linalg.vector_norm(orthogonal))
    return math.atan2(cross, squared_norm + along)


def adamw_angular_update(decay_rate: float, beta1: float) -> float:
    """AdamW's equilibrium angular update, ``sqrt(2c·(1−β1)/(1+β1))`` radians per step.

    Kosson et al. 2024 (arXiv 2305.17212), Table 1, with c = γλ (the "lr" convention);
    about 0.23·sqrt(2γλ) at β1 = 0.9 (SCIENCE.md §4).
    """
    return math.sqrt(2 * decay_rate * (1 - beta1) / (1 + beta1))


def adamw_equilibrium_norm(lr: float, decay_rate: float, numel: int) -> float:
    """AdamW's equilibrium norm of a scale-invariant tensor: ``γ·sqrt(d/(2c))``.

    = sqrt(γ·d/(2λ)) when c = γλ (Kosson et al. 2024, Table 1: sqrt(ηC/(2λ)), C the number
    of elements). Assumes v̂ ≈ E[g²], so that each normalized gradient g/sqrt(v̂) has unit
    RMS per element (module docstring; the step m̂/sqrt(v̂) itself has the smaller RMS
    sqrt((1−β1)/(1+β1)) for uncorrelated gradients).
    """
    return lr * math.sqrt(numel / (2 * decay_rate)) if decay_rate > 0 else math.nan


def sgd_l2_angular_update(lr: float, weight_decay: float, momentum: float, dampening=0.0):
    """SGD with momentum μ and L2 (λθ in the buffer): ``sqrt(2γλ·(1−τ)/(1+μ))`` rad/step.

    Kosson et al. 2024, Table 1 (SGDM, τ = 0); SCIENCE.md §4. The dampening τ scales both
    the gradient and the L2 term inside the buffer.
    """
    return math.sqrt(2 * lr * weight_decay * (1 - dampening) / (1 + momentum))


def sgdw_angular_update(decay_rate: float, momentum: float) -> float:
    """SGDW (decay outside the momentum) with momentum μ: ``sqrt(2c·(1−μ)/(1+μ))`` rad/step.

    Derived as in the module docstring (the derivation of Kosson et al. 2024 with the decay
    moved out of the buffer); equals sqrt(2γλ) for μ = 0. Independent of the dampening.
    """
    return math.sqrt(2 * decay_rate * (1 - momentum) / (1 + momentum))


def sgd_l2_grad_to_weight(lr: float, weight_decay: float, momentum: float, dampening=0.0):
    """Equilibrium ``‖g‖/‖θ‖`` of SGD + L2: ``sqrt(2λ(1−μ)/(γ(1−τ)))``.

    From ‖θ̂‖² = γ(1−τ)·E‖g‖²/(2λ(1−μ)) (module docstring); with μ = 0 this is the
    sqrt(2λ/γ) of Defazio et al. 2025 (arXiv 2506.02285, SCIENCE.md §6).
    """
    return math.sqrt(2 * weight_decay * (1 - momentum) / (lr * (1 - dampening)))


def sgdw_grad_to_weight(lr: float, decay_rate: float, momentum: float, dampening=0.0):
    """Equilibrium ``‖g‖/‖θ‖`` of SGDW: ``(1−μ)·sqrt(2c)/(γ(1−τ))`` (module docstring)."""
    return (1 - momentum) * math.sqrt(2 * decay_rate) / (lr * (1 - dampening))


def equilibrium_steps(decay_rate: float) -> float:
    """Steps for ‖θ‖² to close 1 − 1/e of its gap to equilibrium: ``1/(2c)``.

    ‖θ‖² follows d‖θ‖²/dt = −2c‖θ‖² + const (module docstring), a relaxation with that time
    constant; predictions apply only to runs several times longer.
    """
    return 1 / (2 * decay_rate) if decay_rate > 0 else math.inf
