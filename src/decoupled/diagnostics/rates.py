r"""The effective weight-decay rate of each element in one optimizer step.

Definition: the *effective decay rate* r_i of element θ_i is the fraction of θ_i that the
weight-decay term removes in this step, read off the update rule:

* decoupled decay (AdamW, SGDW, ``with_decoupled_decay``'s classes): ``θ ← θ − c·θ``, so
  r_i = c for every element, with c the step's decoupled rate (γ_t·λ in torch's "lr"
  convention; ``decoupled.optim.decay``);
* cautious decoupled decay (``cautious=True``; Chen, Li, Liang et al., arXiv 2510.12402):
  r_i = c where the step's mask decayed θ_i (``u_i·(θ_i − θ₀_i) ≥ 0``), 0 elsewhere, so the
  mean over a tensor is c × the fraction of its elements decayed (:func:`cautious_mask_of`);
* Adam + L2: λθ is added to the gradient, averaged into m and divided by sqrt(v̂)+ε, so
  r_i = γ_t·λ / (sqrt(v̂_i) + ε) with v̂ = v_t/(1−β2^t) (v^max with amsgrad), the same
  denominator the update uses. The first-moment bias correction 1/(1−β1^t) cancels the EMA's
  weights, which sum to 1−β1^t (Loshchilov & Hutter 2019, arXiv 1711.05101, §2; SCIENCE.md
  §8, prediction 1);
* SGD + L2: λθ is added to the gradient and reaches θ through the momentum buffer
  b ← μb + (1 − τ)g (torch's convention; its first step stores g undamped), so after t steps
  the buffer holds λθ with total weight s_t = μ^(t−1) + (1 − τ)(1 − μ^(t−1))/(1 − μ), and
  r_i = γ_t·λ·s_t: 1 without momentum, (1 − τ)/(1 − μ) once t ≫ 1/(1 − μ) (10× at μ = 0.9),
  and 1 + μ·s_t with Nesterov's g + μb. This is the same footing as Adam's, whose
  bias-corrected EMA weights sum to 1: the whole L2 term the step applies, not the share of
  this step's gradient alone. torch.optim's SGD groups do not say which step it is; they are
  read as in the steady state.

What this leaves out: the buffer holds λθ of recent steps, not of this one, so r is exact while
θ changes slowly against the buffer's memory of 1/(1 − μ) steps (a zero-gradient run with
μ = 0.9 shrinks by 0.010009% per step at γλ = 1e-5, where r = 0.01%, but by 1.11% at
γλ = 1e-3, where r = 1%: the buffer's older θ are larger); and under Adam the L2 term also
enters v, so it feeds back on its own denominator. The definition measures the *rate* at which
the optimizer is set to decay each element now, which is what differs between L2 and
decoupled decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from decoupled.optim import SGD, Adam
from decoupled.optim.decay import cautious_mask, weight_decay_at

#: rank statistics and quantiles use at most this many elements per tensor (evenly spaced)
MAX_SAMPLE = 1 << 16


@dataclass(frozen=True)
class DecayKind:
    """How an optimizer applies weight decay: its family and whether decay is decoupled."""

    family: str  # "adam" | "sgd"
    decoupled: bool

    @property
    def label(self) -> str:
        return "decoupled" if self.decoupled else "L2"


def decay_kind(optimizer: torch.optim.Optimizer, group: dict | None = None) -> DecayKind:
    """The :class:`DecayKind` of a ``decoupled`` or ``torch.optim`` Adam/AdamW/SGD/SGDW."""
    group = group if group is not None else optimizer.param_groups[0]
    if getattr(type(optimizer), "base_optimizer", None) is not None:  # with_decoupled_decay
        return DecayKind("other", True)
    # AdamW subclasses Adam in decoupled and in recent torch, not in torch before 2.7
    if isinstance(optimizer, (Adam, torch.optim.Adam, torch.optim.AdamW)):
        family = "adam"
    elif isinstance(optimizer, (SGD, torch.optim.SGD)):
        family = "sgd"
    else:
        raise TypeError(
            f"weight-decay diagnostics support Adam, AdamW, SGD and SGDW (decoupled or "
            f"torch.optim), not {type(optimizer).__name__}"
        )
    if hasattr(type(optimizer), "decoupled"):  # decoupled's optimizers say it themselves
        is_decoupled = bool(type(optimizer).decoupled)
    else:  # torch.optim.AdamW (whose groups carry the flag since torch 2.7); SGD: only L2
        is_decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
            group.get("decoupled_weight_decay", False)
        )
    return DecayKind(family, is_decoupled)


def step_weight_decay(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """λ of the group's latest step (a scheduled λ or λ_norm resolved as the step did)."""
    if "decay_steps" in group:  # decoupled's optimizers count steps per group
        return float(weight_decay_at(group, max(int(group["decay_steps"]), 1)))
    return float(group["weight_decay"])


def step_decoupled_rate(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """c, the decoupled rate of the group's latest step (``θ ← θ − c·θ``)."""
    weight_decay = step_weight_decay(optimizer, group)
    if hasattr(optimizer, "decoupled_rate"):  # honours decay_scale ("lr", "schedule", ...)
        return float(optimizer.decoupled_rate(group, weight_decay))
    return float(group["lr"]) * weight_decay  # torch.optim.AdamW: always γ·λ


def cautious_mask_of(
    optimizer: torch.optim.Optimizer, group: dict, param: Tensor, before: Tensor
) -> Tensor | None:
    """Which elements the group's latest cautious step decayed (True), or None when its decay
    is not cautious. ``before`` is θ_{t−1}. The direction u is read back from the state the
    step left: AdamW's m_t (the sign of m̂/(sqrt(v̂)+ε)); SGDW's b_t, g + μ·b_t with Nesterov,
    g without momentum (g negated to maximize); ``with_decoupled_decay``'s classes keep the
    mask itself (``cautious_masks``)."""
    if not group.get("cautious"):
        return None
    masks = getattr(optimizer, "cautious_masks", None)
    if masks is not None:
        return masks.get(param)
    state = optimizer.state.get(param, {})
    reference = state.get("init_param") if group.get("decay_to") == "init" else None
    if "exp_avg" in state:
        direction = state["exp_avg"]
    else:
        grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
        grad = -grad if group.get("maximize") else grad
        buffer = state.get("momentum_buffer")
        if buffer is None or not group.get("momentum"):
            direction = grad
        else:
            buffer = buffer.to_dense() if buffer.is_sparse else buffer
            direction = grad + group["momentum"] * buffer if group.get("nesterov") else buffer
    return cautious_mask(direction.detach(), before, reference)


def _second_moment(optimizer, group: dict, param: Tensor) -> tuple[Tensor, float] | None:
    """(v or v^max with amsgrad, 1 − β2^t): what Adam's denominator is made of."""
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return None
    bias_correction2 = 1 - group["betas"][1] ** float(state["step"])
    second_moment = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    # compact (bfloat16) state is read in float32 at least, as the step computes with it
    wide = torch.promote_types(second_moment.dtype, torch.float32)
    return second_moment.detach().to(wide), bias_correction2


def grad_rms(optimizer: torch.optim.Optimizer, group: dict, param: Tensor) -> Tensor | None:
    """sqrt(v̂) per element, Adam's estimate of the gradient's RMS (None if no Adam state)."""
    moment = _second_moment(optimizer, group, param)
    if moment is None:
        return None
    second_moment, bias_correction2 = moment
    return (second_moment / bias_correction2).sqrt()


def median_grad_rms(optimizer: torch.optim.Optimizer, group: dict, param: Tensor) -> float:
    """The median of sqrt(v̂) over the tensor's elements (NaN without Adam state).

    sqrt is monotone, so this is sqrt(median(v)/(1 − β2^t)): no square root per element.
    """
    moment = _second_moment(optimizer, group, param)
    if moment is None:
        return math.nan
    second_moment, bias_correction2 = moment
    return math.sqrt(float(second_moment.median()) / bias_correction2)


def element_decay_rates(
    optimizer: torch.optim.Optimizer,
    param: Tensor,
    group: dict | None = None,
    *,
    with_grad_rms: bool = True,
    lr: float | None = None,
    before: Tensor | None = None,
) -> tuple[Tensor | float, Tensor | None]:
    """(r, sqrt(v̂)) for one parameter after a step: r per element (module docstring).

    ``r`` is a Python float when it is the same for every element (decoupled decay, SGD + L2,
    no decay) and a tensor shaped like ``param`` under Adam + L2. ``sqrt(v̂)`` is None for SGD.
    Call it between ``optimizer.step()`` and the scheduler's step, so that the group's lr is
    the one the step used. ``with_grad_rms=False`` skips sqrt(v̂) (returned as None) where the
    rate does not need it: decoupled decay. ``lr`` evaluates the rate as if the step had used
    that lr instead of the group's (e.g. the peak lr α, to see the shape at the end of a
    schedule that reaches 0). ``before`` (θ_{t−1}) gives cautious decay its mask: r = c·mask
    per element (a tensor); without it r = c, the rate of the decayed elements.
    """
    group = group if group is not None else _group_of(optimizer, param)
    if lr is not None:
        group = {**group, "lr": lr}
    kind = decay_kind(optimizer, group)
    if kind.decoupled:
        rms = grad_rms(optimizer, group, param) if with_grad_rms else None
        rate = step_decoupled_rate(optimizer, group)
        mask = None if before is None else cautious_mask_of(optimizer, group, param, before)
        if mask is not None:
            return mask.to(torch.promote_types(param.dtype, torch.float32)) * rate, rms
        return rate, rms
    rms = grad_rms(optimizer, group, param) if kind.family == "adam" else None
    weight_decay = step_weight_decay(optimizer, group)
    lr = float(group["lr"])
    if kind.family == "sgd":
        return lr * weight_decay * _sgd_gradient_share(group), rms
    if weight_decay == 0 or rms is None:
        return lr * weight_decay, rms
    return lr * weight_decay / (rms + group["eps"]), rms


def _sgd_gradient_share(group: dict) -> float:
    """The total weight s_t of the L2 term λθ in SGD's step t (module docstring): the step
    count is known for decoupled's optimizers (``decay_steps``, already counting this step);
    torch.optim's SGD groups are read as in the steady state, t → ∞."""
    momentum = group.get("momentum", 0.0)
    if momentum == 0:
        return 1.0
    damped = 1 - group.get("dampening", 0.0)
    steps = group.get("decay_steps")
    fresh = momentum ** (steps - 1) if steps else 0.0  # the first buffer, g itself, decayed
    in_buffer = fresh + damped * (1 - fresh) / (1 - momentum)
    return 1 + momentum * in_buffer if group.get("nesterov") else in_buffer


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("the parameter is not in this optimizer")


def sample_index(numel: int, limit: int = MAX_SAMPLE) -> Tensor | None:
    """None (take every element) or ``limit`` indices drawn at random, with replacement and a
    fixed seed: the same draw every time. Random rather than evenly spaced: a stride can line
    up with a dimension and pick one kernel tap or one column only."""
    if numel <= limit:
        return None
    return torch.randint(numel, (limit,), generator=torch.Generator().manual_seed(0))


def sample_elements(values: Tensor, limit: int = MAX_SAMPLE) -> Tensor:
    """The flattened tensor, or the elements at :func:`sample_index`."""
    flat = values.flatten()
    index = sample_index(flat.numel(), limit)
    return flat if index is None else flat[index.to(flat.device)]


def _to_numpy(values: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def _ranks_of_sorted(order: np.ndarray, ordered: np.ndarray) -> np.ndarray:
    """Average ranks (1..n, ties sharing their mean rank) from ``argsort`` and the sorted
    values. Without ties (the usual case for real values) they are the inverse permutation."""
    ranks = np.empty(len(ordered))
    tied = ordered[1:] == ordered[:-1]
    if not tied.any():
        ranks[order] = np.arange(1, len(ordered) + 1)
        return ranks
    starts_run = np.r_[True, ~tied]
    run_index = np.cumsum(starts_run) - 1
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.r_[run_starts[1:], len(ordered)]
    ranks[order] = ((run_starts + run_ends + 1) / 2)[run_index]  # 1-based ranks s+1 .. e
    return ranks


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as ``scipy.stats.rankdata``).

    numpy, not torch: for the few thousand elements of a sample, numpy's single-threaded
    sort is several times faster than torch's on a busy CPU.
    """
    order = np.argsort(values)
    return _ranks_of_sorted(order, values[order])


def _rank_correlation(rank_x: np.ndarray, rank_y: np.ndarray) -> float:
    rank_x = rank_x - rank_x.mean()
    rank_y = rank_y - rank_y.mean()
    return float(rank_x @ rank_y / math.sqrt((rank_x @ rank_x) * (rank_y @ rank_y)))


def spearman(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's r of average ranks); NaN when either side is
    constant, where it is undefined."""
    x, y = _to_numpy(x), _to_numpy(y)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return _rank_correlation(average_ranks(x), average_ranks(y))


def _percentiles(ordered: np.ndarray, fractions) -> list[float]:
    """Percentiles of sorted values by linear interpolation between order statistics
    (numpy's and torch's default, "linear")."""
    positions = np.asarray(fractions) * (len(ordered) - 1)
    below = np.floor(positions).astype(int)
    above = np.minimum(below + 1, len(ordered) - 1)
    weight = positions - below
    return (ordered[below] + (ordered[above] - ordered[below]) * weight).tolist()


def summarize_rates(rates: Tensor | float, rms: Tensor | None) -> dict[str, float]:
    """Mean, coefficient of variation, 5/50/95th percentiles of r across elements, and its
    Spearman correlation with sqrt(v̂).

    A uniform rate has CV exactly 0 (NaN if it is 0: no decay) and no rank correlation (NaN).
    Percentiles and the correlation use at most ``MAX_SAMPLE`` elements
    (:func:`sample_elements`); one sort serves both, as the monitor runs this every few steps.
    """
    if not isinstance(rates, Tensor):
        rate = float(rates)
        return {
            "rate_mean": rate,
            "rate_cv": 0.0 if rate > 0 else math.nan,
            "rate_p5": rate,
            "rate_p50": rate,
            "rate_p95": rate,
            "rate_grad_rms_spearman": math.nan,
        }
    flat = rates.detach().flatten()
    # mean and spread over every element, accumulated in float64 without a float64 copy
    mean = float(flat.sum(dtype=torch.float64)) / flat.numel()
    std = float(torch.linalg.vector_norm(flat - mean, dtype=torch.float64)) / flat.numel() ** 0.5
    sample = _to_numpy(sample_elements(flat))
    rms_sample = None if rms is None else _to_numpy(sample_elements(rms))
    order = np.argsort(sample)
    ordered = sample[order]
    p5, p50, p95 = _percentiles(ordered, (0.05, 0.5, 0.95))
    correlation = math.nan
    if rms_sample is not None and ordered[0] != ordered[-1] and np.any(rms_sample != rms_sample[0]):
        correlation = _rank_correlation(_ranks_of_sorted(order, ordered), average_ranks(rms_sample))
    return {
        "rate_mean": mean,
        "rate_cv": std / mean if mean > 0 else math.nan,
        "rate_p5": p5,
        "rate_p50": p50,
        "rate_p95": p95,
        "rate_grad_rms_spearman": correlation,
    }
