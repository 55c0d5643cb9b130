r"""Adam with L2 regularization and AdamW with decoupled weight decay: one core, one switch.

The functional core :func:`adam_update` is the readable reference: a loop over tensors whose
operations are the same, in the same order, as torch.optim's single-tensor Adam
(``torch/optim/adam.py``, ``_single_tensor_adam``), so that on the same inputs both produce
bit-identical results. Faster paths (``_kernels.py``) are tested against this loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from decoupled.optim._base import (
    DecayOptimizer,
    DecayTerms,
    as_float,
    check_argument,
    decay_defaults,
    is_zero,
    step_value,
    torch_implementation_options,
)
from decoupled.optim._checks import check_tensor_hyperparameters, checked_betas
from decoupled.optim._compact import CompactMoments, check_state_dtype
from decoupled.optim._compensated import (
    REMAINDER,
    check_compensate,
    check_remainder,
    compensates,
    init_remainder,
    master,
    store_,
)
from decoupled.optim._int8 import (
    INT8,
    SCALE_SUFFIX,
    Int8Moments,
    check_coded,
    decode,
    is_coded,
    new_moments,
    recast_moments_,
)
from decoupled.optim._kernels import choose_adam_update
from decoupled.optim._layout import in_layout_of
from decoupled.optim._loaded_state import check_like_param, check_step, refuse
from decoupled.optim._triton import (
    check_capturable,
    check_triton_option,
    on_device_steps,
)
from decoupled.optim.decay import (
    add_l2_penalty,
    apply_cautious_decay_,
    apply_decoupled_decay_,
    unscale_,
)

__all__ = ["Adam", "AdamW", "adam_update"]


def adam_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    references: list[Tensor | None] | None = None,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    decay_rate: float | Tensor = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    differentiable: bool = False,
    grad_scale: Tensor | None = None,
    coded_states: list[dict] | None = None,
    remainders: list[Tensor | None] | None = None,
    cautious: bool = False,
    first_position: int = 0,
) -> None:
    """One Adam step over a list of tensors, in place (the algorithm box of :class:`Adam`).

    Args:
        lr: γ_t, the learning rate of this step.
        beta1, beta2: numbers or 0-dim tensors (read at each step, as torch reads them).
        differentiable: compute the bias corrections and the update with tensor operations
            that autograd records (torch's ``differentiable=True`` branch of
            ``_single_tensor_adam``, the same operations in the same order), so that
            gradients flow through the step to θ, the hyperparameter tensors and the state.
        grad_scale: GradScaler's loss scale: the gradients are divided by it first, in place
            (``g ← g/scale``, as torch's fused kernels do); None: they are unscaled already.
        weight_decay: λ of the L2 penalty; used only when ``decoupled`` is False.
        decoupled: False for Adam + L2, True for AdamW.
        decay_rate: the per-step decoupled rate ``c`` (``θ ← θ − c·(θ − θ₀)``, see ``decay.py``);
            used only when ``decoupled`` is True.
        references: θ₀ per parameter for decay toward a reference (None entries: toward 0).
        coded_states: with 8-bit moments (``state_dtype="int8"``, ``_int8.py``), each
            parameter's state dict, whose codes and scales are decoded before the step and
            written after it; ``exp_avgs``/``exp_avg_sqs`` then hold the codes.
        remainders: compensated bfloat16/float16 θ (``_compensated.py``): per parameter its
            int8 remainder (None: not compensated). The step then runs in float32 on the
            master weight θ + remainder, and writes both back.
        cautious: cautious weight decay (with ``decoupled``): decay only where the update
            direction m̂/(sqrt(v̂)+ε), whose sign is that of m_t, agrees in sign with θ − θ₀
            (``decay.cautious_mask``); the decay then follows the moments' update, which does
            not read θ, so with every mask entry True the step equals AdamW's bit for bit.
        first_position: the position of ``params[0]`` among the optimizer's parameters: the
            stochastic rounding of bfloat16/int8 moments and of compensated θ keys tensor i
            by ``first_position + i`` (with the step), so that tensors of different groups
            draw different bits.
    """
    references = references or [None] * len(params)
    unscale_(grads, grad_scale)
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        step_t += 1
        remainder = remainders[i] if remainders is not None else None
        reference = references[i]
        if remainder is not None:  # compensated θ: step the float32 master weight
            stored_param, param, grad = param, master(param, remainder), grad.float()
            reference = reference.float() if reference is not None else None

        # ---- the only place Adam and AdamW differ -----------------------------------
        if decoupled:
            if not (cautious or is_zero(decay_rate)):
                apply_decoupled_decay_(param, decay_rate, reference)  # AdamW:  θ ← θ·(1 − γλ)
        elif not is_zero(weight_decay):
            grad = add_l2_penalty(grad, param, weight_decay, reference)  # Adam:  g ← g + λθ
        # ------------------------------------------------------------------------------

        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        if torch.is_complex(param):
            if reference is not None:
                reference = torch.view_as_real(reference)
            grad, exp_avg, exp_avg_sq = (torch.view_as_real(t) for t in (grad, exp_avg, exp_avg_sq))
            if amsgrad:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
            param = torch.view_as_real(param)
        compact = None
        coded = coded_states is not None and is_coded(coded_states[i], "exp_avg")
        if coded:  # int8 state: compute in θ's dtype (_int8.py)
            compact = Int8Moments(coded_states[i], param.dtype)
            exp_avg, exp_avg_sq = compact.values
        elif exp_avg.dtype != param.dtype:  # bfloat16 state: compute in θ's dtype (_compact.py)
            moments = [exp_avg, exp_avg_sq] + ([max_exp_avg_sq] if amsgrad else [])
            compact = CompactMoments(moments, param.dtype)
            exp_avg, exp_avg_sq, max_exp_avg_sq = (compact.values + [None])[:3]

        # a tensor β1 as lerp's weight must have θ's dtype (torch converts it the same way)
        device_beta1 = beta1.to(param.device, param.dtype) if isinstance(beta1, Tensor) else beta1
        exp_avg.lerp_(grad, 1 - device_beta1)  # m ← β1·m + (1 − β1)·g
        if differentiable and isinstance(beta2, Tensor) and beta2.requires_grad:
            exp_avg_sq.lerp_(torch.square(grad), weight=1 - beta2)  # the same v, a path to β2
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β2·v + (1−β2)·g²
        if decoupled and cautious and not is_zero(decay_rate):  # AdamW + CWD: after m_t
            apply_cautious_decay_(param, decay_rate, reference, exp_avg)

        if differentiable:
            _differentiable_update(
                param, exp_avg, exp_avg_sq, max_exp_avg_sq, step_t, lr, beta1, beta2, eps
            )
            continue
        step = step_value(step_t)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5

        if amsgrad:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq
        else:
            second_moment = exp_avg_sq
        if coded:  # sqrt(v̂) as v's root times the inverse (_int8.py, Arithmetic)
            denom = (second_moment.sqrt() * (1 / bias_correction2_sqrt)).add_(eps)
        else:
            denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)  # sqrt(v̂) + ε
        if isinstance(step_size, Tensor) and step_size.dim() > 0:  # one lr per stacked run
            param.sub_(step_size * exp_avg / denom)
        else:
            param.addcdiv_(exp_avg, denom, value=-step_size)  # θ ← θ − γ·m̂ / (sqrt(v̂) + ε)
        if compact is not None:
            compact.store(step, position=first_position + i)
        if remainder is not None:
            store_(stored_param, remainder, param, step, position=first_position + i)


def _differentiable_update(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step_t: Tensor,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
) -> None:
    """θ ← θ − γ·m̂/(sqrt(v̂) + ε) in tensor operations autograd records: torch's
    ``differentiable`` branch (``torch/optim/adam.py``, ``_single_tensor_adam``), whose
    arrangement ``sqrt(v)/(sqrt(1−β2^t)·(−γ/(1−β1^t))) + ε/(−γ/(1−β1^t))`` keeps the step size a
    tensor; clones keep the saved values of in-place updates intact for the backward pass."""

    def power(beta: float | Tensor) -> Tensor:
        needs_grad = isinstance(beta, Tensor) and beta.requires_grad
        return beta ** (step_t.clone() if needs_grad else step_t)

    bias_correction1 = 1 - power(beta1)
    bias_correction2 = 1 - power(beta2)
    step_size_neg = (lr / bias_correction1).neg()
    bias_correction2_sqrt = bias_correction2.sqrt()
    second_moment = exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq.clone(), exp_avg_sq))
        second_moment = max_exp_avg_sq
    denom = (second_moment.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(
        eps / step_size_neg
    )
    param.addcdiv_(exp_avg.clone(), denom)


_ALGORITHM = r"""The algorithm; the boxed lines are the whole difference between Adam and AdamW
    (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2, with torch's lr-scaled decay):

    .. math::
       \begin{aligned}
       &g_t \leftarrow \nabla f_t(\theta_{t-1})\quad(\text{negated if maximize})\\
       &\boxed{\textbf{Adam: } g_t \leftarrow g_t + \lambda\,\theta_{t-1}}
        \qquad\boxed{\textbf{AdamW: } \theta_{t-1} \leftarrow \theta_{t-1}\,(1 - \gamma_t\lambda)}\\
       &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1)\,g_t \qquad
        v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2\\
       &\hat m_t \leftarrow m_t/(1-\beta_1^t) \qquad
        \hat v_t \leftarrow v^{\max}_t/(1-\beta_2^t)\ \text{if amsgrad else}\ v_t/(1-\beta_2^t)\\
       &\theta_t \leftarrow \theta_{t-1} - \gamma_t\,\hat m_t/(\sqrt{\hat v_t}+\epsilon)
       \end{aligned}

    where :math:`v^{\max}_t = \max(v^{\max}_{t-1}, v_t)`. With ``cautious=True`` (AdamW only;
    cautious weight decay, Chen, Li, Liang et al., arXiv 2510.12402) the decay line moves after
    the moments and masks each coordinate by the sign agreement of the update direction
    :math:`u_t = \hat m_t/(\sqrt{\hat v_t}+\epsilon)` (the sign of :math:`m_t`) and the decayed
    quantity (θ₀ = 0 unless ``decay_to="init"``; c_t = γ_tλ in the default convention):

    .. math::
       \boxed{\textbf{AdamW + CWD: } \theta_{t-1} \leftarrow \theta_{t-1} -
        \mathbb{I}\big(u_t \odot (\theta_{t-1}-\theta_0) \ge 0\big) \odot
        c_t\,(\theta_{t-1}-\theta_0)}"""


class Adam(DecayOptimizer):
    r"""Adam with L2 regularization (``weight_decay`` is added to the gradient).

    A drop-in for ``torch.optim.Adam``: same arguments, same state keys (``step``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), bit-identical results on the CPU with
    ``fused=False`` (the default fast path agrees to float rounding; where and why it rounds
    otherwise is told in ``_kernels.py``'s module docstring).
    :class:`AdamW` is this class with the decay moved out of the gradient.

    {algorithm}

    Because Adam's L2 term passes through the division by ``sqrt(v̂) + ε``, each weight is
    shrunk by about ``γλ / (sqrt(v̂) + ε)`` per step: weights with large gradients are hardly
    regularized (the paper's Proposition 2: no L2 coefficient reproduces AdamW).

    Args:
        params: iterable of tensors or of dicts defining parameter groups.
        lr: learning rate γ (float or 0-dim tensor), default 1e-3.
        betas: (β1, β2), decay rates of the first and second moment, each in [0, 1): two
            numbers or two one-element tensors (kept as tensors, read at each step).
        eps: ε ≥ 0 (0 warns) added to ``sqrt(v̂)``, in the units of the gradient.
        weight_decay: λ, the L2 coefficient (Adam, default 0) or the decoupled decay rate
            per unit of lr (AdamW, default 1e-2), both in units of 1/parameter-scale.
            A callable ``step -> λ`` (step counted from 1) schedules it.
        amsgrad: use the running maximum of ``v`` (Reddi et al. 2018).
        decay_to: ``"zero"`` (ordinary decay) or ``"init"``: decay toward the parameters'
            values at construction, θ₀ (L2-SP, arXiv 1802.01483), kept in the state dict.
        maximize: ascend instead of descend.
        skip_nonfinite: skip (and count in ``skipped_steps``) any step with a NaN/Inf gradient.
        fused: which implementation steps (``_kernels.py``). ``None`` (default): the fastest
            that computes this update — a one-pass C++ kernel for float32 CPU parameters
            (about 5x torch's default single-tensor step, at or above its ``fused=True``),
            torch's fused kernels, else the reference loop — equal to the reference up to
            float rounding. ``False``: the reference loop, bit-identical to torch.optim's
            single-tensor path. ``True``: as ``None``, and torch's fused kernels also for
            bfloat16/float16 parameters.
        triton: the one-pass Triton kernel (``_triton.py``). ``None`` (default): for CUDA
            parameters when triton is installed; ``True``: always (CPU tensors only under
            ``TRITON_INTERPRET=1``); ``False``: never. Its step counters live on the
            parameters' device.
        state_dtype: ``torch.bfloat16`` keeps ``exp_avg``/``exp_avg_sq`` (and
            ``max_exp_avg_sq``) in bfloat16 with stochastic rounding: 4 instead of 8 bytes
            of state per parameter and 20 instead of 28 bytes moved per float32 step
            (``_compact.py``). ``"int8"`` (or ``torch.int8``): 8-bit blockwise codes with one
            float32 scale per 256 elements (``exp_avg``/``exp_avg_sq`` hold the codes,
            ``exp_avg_scale``/``exp_avg_sq_scale`` the scales; not with amsgrad; the C++
            kernel, the Triton kernel or the reference loop steps; ``_int8.py``). ``None``
            (default): the parameters' dtype, as torch.
        compensate: for bfloat16/float16 parameters, keep an int8 remainder per element
            (``param_remainder`` in the state) so that the decay and the update are computed
            in float32 on the master weight θ + remainder and small updates are not rounded
            away (``_compensated.py``). ``None`` (default) and ``True``: on for such
            parameters (on the CPU the C++ kernel steps them, with bfloat16 or int8 moments,
            on CUDA the Triton kernel, else the reference loop); ``False``: plain bfloat16
            updates, bit-identical to torch.optim, on the fast paths.
        foreach, capturable, differentiable: torch.optim's switches: ``foreach=False``
            (torch's single-tensor loop) means ``fused=False``; ``differentiable=True`` lets
            autograd record the step (the reference loop, as torch's: gradients reach θ,
            tensor lr/betas/weight_decay and the state); ``capturable=True`` (CUDA graphs)
            steps through the Triton kernel with no host synchronization: step counters, lr
            (a float or a tensor on the device), bias corrections, the decay rate and the
            ``skip_nonfinite`` decision stay on the device (``skipped_steps`` becomes a
            device tensor; a ``weight_decay`` schedule is still read on the host).
    """

    decoupled = False
    family = ("Adam", "AdamW")
    state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | Callable[[int], float] = 0.0,
        amsgrad: bool = False,
        *,
        decay_to: str = "zero",
        maximize: bool = False,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
        compensate: bool | None = None,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        triton: bool | None = None,
        cautious: bool = False,
        **decoupled_options,  # AdamW's: decay_scale, max_lr, lambda_norm, decay_period
    ) -> None:
        state_dtype = check_state_dtype(state_dtype)
        check_tensor_hyperparameters(lr, betas, foreach=foreach, capturable=capturable)
        fused = torch_implementation_options(fused, foreach, capturable, differentiable)
        check_triton_option(triton, fused, capturable)
        compensate = check_compensate(compensate)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "fused": fused,
            "triton": triton,
            "capturable": bool(capturable),
            "state_dtype": state_dtype,
            "compensate": compensate,
            "differentiable": bool(differentiable),
            **decay_defaults(decoupled=self.decoupled, decay_to=decay_to, **decoupled_options),
            # Adam's groups keep torch's keys; cautious=True is refused in _check_group
            **({"cautious": cautious} if self.decoupled or cautious else {}),
        }
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        eps = as_float(group["eps"], "eps")
        check_argument("eps", group["eps"], math.isfinite(eps) and eps >= 0, "must be >= 0")
        if eps == 0:  # torch accepts it; an element whose gradients were all 0 becomes 0/0
            warnings.warn(
                "eps=0: a weight whose gradient has been 0 at every step gets 0/0 = NaN",
                stacklevel=4,
            )
        group["betas"] = checked_betas(group["betas"])
        if "state_dtype" in group:  # a group's own, as the constructor's: names become dtypes
            group["state_dtype"] = check_state_dtype(group["state_dtype"])
        if group.get("state_dtype") == INT8 and group.get("amsgrad"):
            raise ValueError(
                "Invalid state_dtype value: int8 with amsgrad=True (the running maximum of v "
                "is not kept in 8 bits: use state_dtype=torch.bfloat16 with amsgrad)"
            )

    def load_state_dict(self, state_dict: dict) -> None:
        """As :class:`DecayOptimizer`'s, except that every saved state tensor keeps its dtype:
        torch would cast each to θ's dtype (int8 codes, their float32 block scales and
        bfloat16 moments of a float16 θ included), losing small values, and a checkpoint
        saved again before the next step would hold float codes. The next step converts
        them to this optimizer's ``state_dtype`` and compensation (``_init_state``). A group
        saved with ``amsgrad`` is refused, before anything changes, where this optimizer keeps
        int8 moments."""
        for index, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            if saved.get("amsgrad") and group.get("state_dtype") == INT8:
                raise ValueError(
                    f"Invalid param group {index} of the checkpoint: amsgrad = True (this "
                    "optimizer keeps int8 moments, which cannot hold amsgrad's running maximum; "
                    "load it into one with state_dtype=torch.bfloat16 or None)"
                )
        super().load_state_dict(state_dict)

    def _saved_state_kept_as_is(self, state_dict: dict) -> list[tuple[Tensor, str, Tensor]]:
        """Every saved state tensor but the step count: ``_init_state`` converts them."""
        return [
            (param, key, value)
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
            for index, param in zip(saved_group["params"], group["params"])
            for key, value in state_dict["state"].get(index, {}).items()
            if key != "step" and isinstance(value, Tensor)
        ]

    def _lay_out_state_like(self, param: Tensor) -> None:
        """As :class:`DecayOptimizer`'s; coded moments laid out unlike ``param`` are decoded
        first (their block scales follow the codes' memory order, which the copy changes) and
        coded again at the next step."""
        state = self.state.get(param, {})
        for key in self.state_keys[1:]:
            coded = key in state and is_coded(state, key)
            if coded and in_layout_of(param, state[key]) is not state[key]:
                state[key] = decode(state[key], state.pop(key + SCALE_SUFFIX), key)
        super()._lay_out_state_like(param)

    def _check_loaded_state(self, where: str, param: Tensor, group: dict, state: dict) -> None:
        super()._check_loaded_state(where, param, group, state)
        if "step" not in state:  # no step taken yet: moments are created at the first one
            saved = [key for key in self.state_keys[1:] if key in state]
            if saved:  # they would be replaced by zeros at the next step
                refuse(where, "step", "missing", f"required with the saved {saved[0]}")
            return
        check_step(where, state["step"])
        required = self.state_keys[1 : 4 if group.get("amsgrad") else 3]
        for key in self.state_keys[1:]:
            if key in state and is_coded(state, key):
                check_coded(where, key, state, param)
            elif key in state:
                nonnegative = key != "exp_avg"  # v and max(v) are averages of g²
                check_like_param(where, key, state[key], param, nonnegative=nonnegative)
            elif key in required:
                refuse(where, key, "missing", "required once a step has been taken")
        if REMAINDER in state:
            check_remainder(where, state[REMAINDER], param)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("fused", None)
            group.setdefault("triton", None)
            group.setdefault("capturable", False)
            group.setdefault("state_dtype", None)
            group.setdefault("compensate", False)  # pickled before compensation existed
            for p in group["params"]:
                state_p = self.state.get(p, {})
                if "step" in state_p and not torch.is_tensor(state_p["step"]):  # torch < 1.12
                    state_p["step"] = torch.tensor(float(state_p["step"]), dtype=torch.float32)

    def _init_state(self, group: dict, param: Tensor, device_steps: bool = False) -> dict:
        state = self.state[param]
        dtype = group["state_dtype"] or param.dtype
        # the Triton path reads step counts on the device (as torch's capturable); the others
        # on the CPU (as torch's default), wherever a loaded state dict put them
        step = state.get("step")
        if device_steps or (torch.is_tensor(step) and not step.is_cpu):  # is_cpu: cheap
            on_device_steps(state, param.device if device_steps else torch.device("cpu"))
        coded = "step" in state and is_coded(state, "exp_avg")
        if "step" in state and state["exp_avg"].dtype == dtype and coded == (dtype == INT8):
            init_remainder(group.get("compensate"), param, state)  # after a load: cast to int8
            return state  # every step after the first
        if torch.is_complex(param):
            dtype = param.dtype
        keys = self.state_keys[1 : 4 if group["amsgrad"] else 3]
        if "step" not in state:  # (state may already hold init_param)
            # float32 CPU step counter, exactly as torch.optim.Adam keeps it
            state["step"] = torch.tensor(
                0.0, dtype=torch.float32, device=param.device if device_steps else None
            )
            if dtype == INT8:
                state.update(new_moments(param, keys))
            else:
                for key in keys:
                    state[key] = torch.zeros_like(param, dtype=dtype)
        else:
            # a loaded state dict (torch casts moments to θ's dtype, codes included) or a
            # changed state_dtype
            recast_moments_(state, self.state_keys[1:], dtype)
        init_remainder(group.get("compensate"), param, state)
        return state

    def _update_group(
        self,
        group: dict,
        params: list[Tensor],
        grads: list[Tensor],
        decay: DecayTerms,
        *,
        first_position: int = 0,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> None:
        differentiable = group.get("differentiable", False)
        coded = group["state_dtype"] == INT8
        # differentiable steps record torch's operations on θ itself: not compensated
        compensate = group.get("compensate")
        compensated = not differentiable and any(compensates(compensate, p) for p in params)
        # tensor betas: the reference loop raises them to the step count in float32 tensor
        # arithmetic, which the fast paths (bias corrections from numbers) do not reproduce
        tensor_betas = any(isinstance(beta, Tensor) for beta in group["betas"])
        update = choose_adam_update(
            False if differentiable or tensor_betas else group["fused"],
            adam_update,
            params,
            grads,
            lr=group["lr"],
            decay_rate=decay.rate,
            decoupled=self.decoupled,
            references=decay.references,
            compact=group["state_dtype"] is not None,
            triton=group.get("triton"),
            cautious=group.get("cautious", False),
            compensated=compensated,
        )
        on_device = update.__name__ == "triton_adam_update"
        states = [self._init_state(group, p, on_device) for p in params]
        remainders = [s.get(REMAINDER) for s in states]
        beta1, beta2 = group["betas"]
        if update is not adam_update:  # the fast paths take numbers, read at each step
            beta1, beta2 = as_float(beta1, "betas[0]"), as_float(beta2, "betas[1]")
        update(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=decay.weight_decay,
            decoupled=self.decoupled,
            decay_rate=decay.rate,
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            references=decay.references,
            cautious=group.get("cautious", False),
            first_position=first_position,
            **({"differentiable": True} if differentiable else {}),
            **({"coded_states": states} if coded else {}),
            **({"remainders": remainders} if compensated else {}),
            **({"grad_scale": grad_scale} if grad_scale is not None else {}),
            **({"found_inf": found_inf} if found_inf is not None else {}),
        )

    def _check_step(self, group: dict, grads: list[Tensor], decay: DecayTerms) -> None:
        check_capturable(group, grads)
        # betas changed in param_groups after construction: torch would step with them (a
        # β2 outside [0, 1) makes v negative, θ NaN); checked here, before any group changes.
        # A pair of tensors is not read (on a device that would wait for it).
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and all(isinstance(b, Tensor) for b in betas)):
            checked_betas(betas)


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay, ``θ ← θ·(1 − γλ)`` outside the scaling.

    A drop-in for ``torch.optim.AdamW`` (same defaults, ``weight_decay=1e-2``; same state;
    bit-identical on the CPU with ``fused=False``).

    {algorithm}

    By default (``decay_scale="lr"``), like torch, optax and Keras, the decay is multiplied by
    the current lr γ_t — unlike the paper, which multiplies it by the schedule multiplier
    η_t = γ_t/α only: changing the learning rate then changes the effective decay.

    Args (besides :class:`Adam`'s):
        decay_scale: how λ becomes the per-step rate c — ``"lr"`` (γ_t·λ, torch),
            ``"schedule"`` ((γ_t/α)·λ, the paper), ``"constant"`` (λ), ``"corrected"``
            ((γ_t²/α)·λ, AdamC). See ``decoupled.optim.decay``. Default: ``"lr"``, or
            ``"schedule"`` when ``lambda_norm`` is given (the units of the paper's λ_norm).
        max_lr: α for ``"schedule"``/``"corrected"``; default: the ``initial_lr`` that torch's
            lr schedulers record, else the lr at construction.
        lambda_norm: the paper's normalized weight decay; λ = λ_norm/sqrt(decay_period)
            replaces ``weight_decay`` (Appendix B.1; :func:`decoupled.normalized_weight_decay`).
            The paper's values (0.025–0.05) are multiplied by the schedule multiplier η_t,
            hence the ``"schedule"`` default; with ``decay_scale="lr"`` they would decay
            about 1/α times too weakly.
        decay_period: steps in the run (or in the current warm-restart period, which
            ``decoupled.schedules.CosineWarmRestarts`` sets by itself), for ``lambda_norm``.
        cautious: cautious weight decay (arXiv 2510.12402): decay coordinate i only where
            ``u_i·(θ_i − θ₀_i) ≥ 0``, u = m̂/(sqrt(v̂)+ε) the update direction (the box above);
            no new hyperparameter: it takes AdamW's λ. Default False.
    """

    decoupled = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | Callable[[int], float] = 1e-2,
        amsgrad: bool = False,
        *,
        decay_scale: str | None = None,
        decay_to: str = "zero",
        max_lr: float | None = None,
        lambda_norm: float | None = None,
        decay_period: int | None = None,
        maximize: bool = False,
        skip_nonfinite: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
        compensate: bool | None = None,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        triton: bool | None = None,
        cautious: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            decay_to=decay_to,
            maximize=maximize,
            skip_nonfinite=skip_nonfinite,
            fused=fused,
            state_dtype=state_dtype,
            compensate=compensate,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            triton=triton,
            cautious=cautious,
            decay_scale=decay_scale,
            max_lr=max_lr,
            lambda_norm=lambda_norm,
            decay_period=decay_period,
        )


for _cls in (Adam, AdamW):
    _cls.__doc__ = _cls.__doc__.replace("{algorithm}", _ALGORITHM)
