"""Fast paths behind the same math as the reference loops (``adam_update``).

``fused_adam_update`` hands a whole parameter group to torch's fused Adam/AdamW kernels
(``torch._fused_adam_`` / ``torch._fused_adamw_``: one pass over memory per tensor; CPU
parameters for now) where they compute the same thing as our reference loop:

* Adam + L2 and AdamW in every ``decay_scale`` convention: the fused AdamW kernel applies
  ``θ ← θ·(1 − lr·λ')``, so a per-step rate c of any convention is passed as λ' = c / lr;
* not ``decay_to="init"``, complex parameters, or stacked per-run learning rates (these stay
  on the reference loop: :func:`can_fuse` says which).

Results agree with the reference loop to float rounding, not bit for bit (the kernel orders
the arithmetic differently); the tests hold float32 to 1e-6 relative after 100 steps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def can_fuse(
    params: list[Tensor],
    lr: float | Tensor,
    decay: float | Tensor,
    decoupled: bool,
    references: list[Tensor | None],
) -> bool:
    """True when the fused kernels compute exactly the reference loop's update."""
    if any(r is not None for r in references):
        return False
    if isinstance(lr, Tensor) and lr.numel() != 1:
        return False
    # CPU only for now: torch keeps a fused kernel's step counters on the parameter's device,
    # ours (like its reference path) on the CPU; CUDA is untested here.
    if any(torch.is_complex(p) or p.device.type != "cpu" for p in params):
        return False
    if decoupled and not isinstance(decay, Tensor) and decay != 0:
        return not isinstance(lr, Tensor) and lr > 0  # λ' = c / lr needs lr > 0
    return not (decoupled and isinstance(decay, Tensor))


def fused_adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """The step of :func:`decoupled.optim.adam.adam_update` through torch's fused kernels."""
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel_decay = (decay / lr if decay else 0.0) if decoupled else weight_decay
    groups: dict[tuple, list[int]] = {}
    for index, param in enumerate(params):
        groups.setdefault((param.device, param.dtype), []).append(index)
    for indices in groups.values():

        def pick(tensors: list[Tensor], indices: list[int] = indices) -> list[Tensor]:
            return [tensors[i] for i in indices]

        steps = pick(state_steps)
        torch._foreach_add_(steps, 1)
        kernel(
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else [],
            steps,
            amsgrad=amsgrad,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=kernel_decay,
            eps=eps,
            maximize=maximize,
            grad_scale=None,
            found_inf=None,
        )
