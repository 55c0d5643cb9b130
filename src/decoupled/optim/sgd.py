r"""SGD with L2 regularization and SGDW with decoupled weight decay: one core, one switch.

:func:`sgd_update` performs the same operations in the same order as torch.optim's
single-tensor SGD (``torch/optim/sgd.py``, ``_single_tensor_sgd``), so results are
bit-identical on the CPU. Faster paths (``_kernels.py``) are tested against this loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

from torch import Tensor

from decoupled.optim._base import (
    DecayOptimizer,
    DecayTerms,
    as_float,
    check_argument,
    decay_defaults,
    is_zero,
    torch_implementation_options,
)
from decoupled.optim._compensated import (
    REMAINDER,
    check_compensate,
    check_remainder,
    master,
    store_,
)
from decoupled.optim._kernels import choose_sgd_update
from decoupled.optim._loaded_state import check_like_param
from decoupled.optim._sgd_compensation import (
    compensation_state,
    drop_unused_remainders,
    saved_float32_buffers,
)
from decoupled.optim._triton import check_triton_option
from decoupled.optim.decay import (
    add_l2_penalty,
    apply_cautious_decay_,
    apply_decoupled_decay_,
    unscale_,
)

__all__ = ["SGD", "SGDW", "sgd_update"]


def check_no_sparse_l2(grads: list[Tensor], weight_decay: float, decoupled: bool) -> None:
    """Refuse sparse gradients with an L2 ``weight_decay``: the term λθ is dense (torch.optim.SGD
    fails there too, in ``grad.add(param)``: sparse + dense)."""
    if not decoupled and not is_zero(weight_decay) and any(g.is_sparse for g in grads):
        raise RuntimeError(
            f"SGD does not support sparse gradients with weight_decay={weight_decay}: the L2 "
            "term λθ is dense (as in torch.optim.SGD); use weight_decay=0, or SGDW"
        )


def sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    references: list[Tensor | None] | None = None,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled: bool,
    decay_rate: float | Tensor = 0.0,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    cautious: bool = False,
    remainders: list[Tensor | None] | None = None,
    step: float = 1.0,
    first_position: int = 0,
) -> None:
    """One SGD step over a list of tensors, in place; new momentum buffers are written back
    into ``momentum_buffers`` (the algorithm box of :class:`SGD`). Gradients may be sparse
    (then so are new momentum buffers, as in torch), except with an L2 ``weight_decay``.

    Args:
        weight_decay: λ of the L2 penalty; used only when ``decoupled`` is False.
        decay_rate: the per-step decoupled rate ``c`` (see ``decay.py``); used when
            ``decoupled``.
        references: θ₀ per parameter for decay toward a reference (None entries: toward 0).
        grad_scale: GradScaler's loss scale, divided out of the gradients first, in place.
        cautious: cautious weight decay (with ``decoupled``): decay only where the direction
            d_t the step subtracts (b_t; g + μ·b_t with Nesterov; g without momentum) agrees
            in sign with θ − θ₀ (``decay.cautious_mask``); the decay then follows the
            buffer's update, which does not read θ, so with every mask entry True the step
            equals SGDW's bit for bit.
        remainders: compensated bfloat16/float16 θ (``_compensated.py``): per parameter its
            int8 remainder (None: not compensated). The step then runs in float32 on the
            master weight θ + remainder, with a float32 momentum buffer
            (``_sgd_compensation.py``), and writes θ and the remainder back.
        step: the group's step count (1 at the first step): keys the remainders' stochastic
            rounding, so that it draws new bits at each step.
        first_position: the position of ``params[0]`` among the optimizer's parameters
            (tensor i's remainder is keyed by ``first_position + i``, as in ``adam_update``).
    """
    check_no_sparse_l2(grads, weight_decay, decoupled)
    unscale_(grads, grad_scale)
    references = references or [None] * len(params)
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        remainder = remainders[i] if remainders is not None else None
        reference = references[i]
        if remainder is not None:  # compensated θ: step the float32 master weight
            stored_param, param, grad = param, master(param, remainder), grad.float()
            reference = reference.float() if reference is not None else None

        # ---- the only place SGD and SGDW differ -------------------------------------
        if decoupled:
            if not (cautious or is_zero(decay_rate)):
                apply_decoupled_decay_(param, decay_rate, reference)  # SGDW:  θ ← θ·(1 − γλ)
        elif not is_zero(weight_decay):
            grad = add_l2_penalty(grad, param, weight_decay, reference)  # SGD:  g ← g + λθ
        # ------------------------------------------------------------------------------

        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = grad.detach().clone()  # b_1 = g_1, as torch does
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        if decoupled and cautious and not is_zero(decay_rate):  # SGDW + CWD: after b_t
            apply_cautious_decay_(param, decay_rate, reference, grad)

        # one lr per stacked run, or a tensor lr that autograd differentiates (as torch)
        if isinstance(lr, Tensor) and (lr.dim() > 0 or lr.requires_grad):
            param.addcmul_(grad, lr, value=-1)
        else:
            param.add_(grad, alpha=-lr)
        if remainder is not None:
            store_(stored_param, remainder, param, step, position=first_position + i)


class SGD(DecayOptimizer):
    r"""Stochastic gradient descent with momentum and L2 regularization.

    A drop-in for ``torch.optim.SGD`` (same arguments, state key ``momentum_buffer``,
    bit-identical on the CPU with ``fused=False``). :class:`SGDW` differs only in the boxed line
    (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 1):

    .. math::
       \begin{aligned}
       &g_t \leftarrow \nabla f_t(\theta_{t-1})\quad(\text{negated if maximize})\\
       &\boxed{\textbf{SGD: } g_t \leftarrow g_t + \lambda\,\theta_{t-1}}
        \qquad\boxed{\textbf{SGDW: } \theta_{t-1} \leftarrow \theta_{t-1}\,(1 - \gamma_t\lambda)}\\
       &b_t \leftarrow g_t\ (t = 1), \quad b_t \leftarrow \mu\,b_{t-1} + (1-\tau)\,g_t\ (t > 1)\\
       &d_t \leftarrow g_t + \mu\,b_t\ \text{if nesterov else}\ b_t\ \text{(}d_t = g_t
        \text{ when } \mu = 0\text{)}\\
       &\theta_t \leftarrow \theta_{t-1} - \gamma_t\,d_t
       \end{aligned}

    With ``cautious=True`` (SGDW only; cautious weight decay, Chen, Li, Liang et al., arXiv
    2510.12402) the decay line moves after d_t and masks each coordinate by the sign
    agreement of d_t and the decayed quantity (θ₀ = 0 unless ``decay_to="init"``):

    .. math::
       \boxed{\textbf{SGDW + CWD: } \theta_{t-1} \leftarrow \theta_{t-1} -
        \mathbb{I}\big(d_t \odot (\theta_{t-1}-\theta_0) \ge 0\big) \odot
        c_t\,(\theta_{t-1}-\theta_0)}

    For plain SGD, decoupled decay λ equals L2 with the same λ in the default ``"lr"``
    convention (both shrink θ by γλ per step; the paper's Proposition 1 writes the decoupled
    rate as λ/α because its decay is not multiplied by the lr); with momentum the two differ
    because L2's term also accumulates in the buffer.

    Args:
        params: iterable of tensors or of dicts defining parameter groups.
        lr: learning rate γ (float or 0-dim tensor), default 1e-3.
        momentum: μ ≥ 0. dampening: τ, the buffer's dampening.
        weight_decay: λ ≥ 0 (L2 coefficient for SGD; decay per unit of lr for SGDW), or a
            callable ``step -> λ`` (step counted from 1).
        nesterov: Nesterov momentum (needs μ > 0 and τ = 0).
        decay_to: ``"zero"`` or ``"init"`` (decay toward θ₀, the values at construction).
        maximize: ascend instead of descend.
        skip_nonfinite: skip (and count in ``skipped_steps``) any step with a NaN/Inf gradient.
        fused: ``None`` (default): float32 CPU parameters step through a one-pass C++ kernel
            (``_kernels.py``), bit-identical to the reference on CPUs with fused multiply-add
            instructions (``_kernels.py``'s module docstring says why); ``False``: the
            reference loop, bit-identical to torch.optim's single-tensor path.
        triton: the one-pass Triton kernel (``_triton.py``). ``None`` (default): for CUDA
            parameters when triton is installed; ``True``: always (CPU tensors only under
            ``TRITON_INTERPRET=1``); ``False``: never.
        compensate: for bfloat16/float16 parameters, keep an int8 remainder per element
            (``param_remainder`` in the state) so that the decay and the update are computed
            in float32 on the master weight θ + remainder and small updates are not rounded
            away (``_compensated.py``); their momentum buffer is then float32. ``None``
            (default) and ``True``: on for such parameters (the Triton kernel on CUDA, the
            C++ kernel on the CPU, else the reference loop steps them); ``False``: plain
            low-precision updates with a buffer in θ's dtype, bit-identical to torch.optim.
        foreach, differentiable: torch.optim's switches: ``foreach=False`` means
            ``fused=False``; ``differentiable=True`` lets autograd record the step (reference
            loop, not compensated), as torch's.

    Sparse gradients (``nn.Embedding(sparse=True)``) are taken as by ``torch.optim.SGD``, through
    the reference loop, with sparse momentum buffers; like torch, SGD refuses them when an L2
    ``weight_decay`` is set (the term λθ is dense). SGDW's decoupled decay takes them: it
    shrinks every row, not only those with a gradient.
    """

    decoupled = False
    family = ("SGD", "SGDW")
    state_keys = ("momentum_buffer",)
    sparse_grads = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Callable[[int], float] = 0.0,
        nesterov: bool = False,
        *,
        decay_to: str = "zero",
        maximize: bool = False,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
        differentiable: bool = False,
        triton: bool | None = None,
        cautious: bool = False,
        compensate: bool | None = None,
        **decoupled_options,  # SGDW's: decay_scale, max_lr, lambda_norm, decay_period
    ) -> None:
        fused = torch_implementation_options(fused, foreach, False, differentiable)
        check_triton_option(triton, fused)
        compensate = check_compensate(compensate)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "fused": None if fused is None else bool(fused),
            "triton": triton,
            "differentiable": bool(differentiable),
            "compensate": compensate,
            **decay_defaults(decoupled=self.decoupled, decay_to=decay_to, **decoupled_options),
            # SGD's groups keep torch's keys; cautious=True is refused in _check_group
            **({"cautious": cautious} if self.decoupled or cautious else {}),
        }
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        momentum = as_float(group["momentum"], "momentum")
        dampening = as_float(group["dampening"], "dampening")
        valid = math.isfinite(momentum) and momentum >= 0
        check_argument("momentum", group["momentum"], valid, "must be finite and >= 0")
        if not 0 <= dampening <= 1:  # torch accepts any dampening; outside [0, 1] it is odd
            warnings.warn(
                f"dampening={dampening} is outside [0, 1]: each gradient enters the momentum "
                f"buffer with weight 1 - dampening = {1 - dampening}",
                stacklevel=4,
            )
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Invalid nesterov value: True with momentum={momentum}, dampening={dampening} "
                "(Nesterov momentum requires a momentum and zero dampening)"
            )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("fused", None)
            group.setdefault("triton", None)
            group.setdefault("compensate", False)  # pickled before compensation existed

    def _check_loaded_state(self, where: str, param: Tensor, group: dict, state: dict) -> None:
        super()._check_loaded_state(where, param, group, state)
        buffer = state.get("momentum_buffer")
        if buffer is not None:  # torch saves None when momentum is 0
            check_like_param(where, "momentum_buffer", buffer, param)
        if REMAINDER in state:
            check_remainder(where, state[REMAINDER], param)

    def load_state_dict(self, state_dict: dict) -> None:
        """As :class:`DecayOptimizer`'s; remainders loaded for θ that is not bfloat16/float16
        are dropped."""
        super().load_state_dict(state_dict)
        drop_unused_remainders(self.state, self.param_groups)

    def _saved_state_kept_as_is(self, state_dict: dict) -> list[tuple[Tensor, str, Tensor]]:
        """A float32 momentum buffer saved for a bfloat16/float16 parameter (a compensated
        one) stays float32, where torch would round it to θ's dtype (``_sgd_compensation.py``)."""
        return saved_float32_buffers(state_dict, self.param_groups)

    def _check_step(self, group: dict, grads: list[Tensor], decay: DecayTerms) -> None:
        check_no_sparse_l2(grads, decay.weight_decay, self.decoupled)

    def _update_group(
        self,
        group: dict,
        params: list[Tensor],
        grads: list[Tensor],
        decay: DecayTerms,
        *,
        first_position: int = 0,
        grad_scale: Tensor | None = None,
    ) -> None:
        momentum = group["momentum"]
        compensated = compensation_state(self.state, group, params)
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        update = choose_sgd_update(
            group["fused"],
            sgd_update,
            params,
            grads,
            group["lr"],
            group.get("triton"),
            compensated=compensated,
        )
        remainders = [self.state[p].get(REMAINDER) for p in params] if compensated else []
        update(
            params,
            grads,
            buffers,
            lr=group["lr"],
            references=decay.references,
            momentum=momentum,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            weight_decay=decay.weight_decay,
            decoupled=self.decoupled,
            decay_rate=decay.rate,
            maximize=group["maximize"],
            cautious=group.get("cautious", False),
            first_position=first_position,
            **({"remainders": remainders, "step": group["decay_steps"] + 1} if compensated else {}),
            **({"grad_scale": grad_scale} if grad_scale is not None else {}),
        )
        for p, buf in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buf


class SGDW(SGD):
    r"""SGDW: SGD with decoupled weight decay, ``θ ← θ·(1 − γλ)`` outside the momentum.

    The paper's Algorithm 1. Momentum follows torch's convention, ``θ ← θ − γ·b`` with the lr
    outside the buffer; the paper puts η_t·α inside it (the two agree while lr is constant).
    Default ``weight_decay`` is 0 as in :class:`SGD`; the box is in :class:`SGD`'s docstring.
    By default (``decay_scale="lr"``) the decay is multiplied by the current lr γ_t; the
    paper multiplies it by the schedule multiplier η_t (``decay_scale="schedule"``).

    Args (besides :class:`SGD`'s): ``decay_scale``, ``max_lr``, ``lambda_norm``,
    ``decay_period``, as in :class:`decoupled.AdamW` (``decay_scale`` defaults to ``"lr"``, or
    ``"schedule"`` when ``lambda_norm`` is given); ``cautious``: cautious weight decay
    (arXiv 2510.12402; the box in :class:`SGD`'s docstring), default False, with SGDW's λ.
    """

    decoupled = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Callable[[int], float] = 0.0,
        nesterov: bool = False,
        *,
        decay_scale: str | None = None,
        decay_to: str = "zero",
        max_lr: float | None = None,
        lambda_norm: float | None = None,
        decay_period: int | None = None,
        maximize: bool = False,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
        differentiable: bool = False,
        triton: bool | None = None,
        cautious: bool = False,
        compensate: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            decay_to=decay_to,
            maximize=maximize,
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            foreach=foreach,
            differentiable=differentiable,
            triton=triton,
            cautious=cautious,
            compensate=compensate,
            decay_scale=decay_scale,
            max_lr=max_lr,
            lambda_norm=lambda_norm,
            decay_period=decay_period,
        )
