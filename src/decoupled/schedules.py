"""Learning-rate schedules as torch ``LRScheduler``s (they drive torch.optim optimizers too).

* :class:`WarmupCosine` — linear warm-up, then cosine decay to ``eta_min``.
* :class:`CosineWarmRestarts` — SGDR/AdamWR cosine annealing with warm restarts
  (Loshchilov & Hutter, "SGDR", ICLR 2017, arXiv 1608.03983; AdamWR in arXiv 1711.05101):
  within period i of length T_i, ``η_t = η_min + ½(η_max − η_min)(1 + cos(π·T_cur/T_i))``,
  and ``T_{i+1} = T_mult·T_i``. Without warm-up its lr sequence equals torch's
  ``CosineAnnealingWarmRestarts`` stepped once per step. For parameter groups with
  ``lambda_norm`` it also sets ``decay_period = T_i``, so that the paper's normalized weight
  decay is recomputed for each period (Appendix B.2).

Both count in optimizer steps: call ``scheduler.step()`` after each ``optimizer.step()``.
"""

from __future__ import annotations

import math
import numbers

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def _steps(name: str, value: int, minimum: int) -> int:
    """``value`` as a Python int (NumPy integers accepted), or an error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Invalid {name} value: {value!r} (must be an integer >= {minimum})")
    return int(value)


def _cosine(base_lr: float, eta_min: float, position: int, length: int) -> float:
    """``η_min + (η_max − η_min)·(1 + cos(π·position/length))/2``, as torch writes it."""
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * position / length)) / 2


def _warmup(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0: ``γ·t/W`` for t < W (the first step has lr 0, as in HF's)."""
    return base_lr * step / warmup_steps


class WarmupCosine(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``eta_min`` at
    ``total_steps``; constant at ``eta_min`` afterwards.

    Args:
        optimizer: any torch optimizer; each group's lr at construction is its peak.
        warmup_steps: steps of linear warm-up (0 for none).
        total_steps: steps of the whole schedule, warm-up included.
        eta_min: the final learning rate (absolute, as in torch's CosineAnnealingLR).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        warmup_steps = _steps("warmup_steps", warmup_steps, 0)
        total_steps = _steps("total_steps", total_steps, max(warmup_steps, 1))
        if not (math.isfinite(eta_min) and eta_min >= 0):
            raise ValueError(f"Invalid eta_min value: {eta_min} (must be finite and >= 0)")
        self.warmup_steps, self.total_steps, self.eta_min = warmup_steps, total_steps, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        if t < self.warmup_steps:
            return [_warmup(base, t, self.warmup_steps) for base in self.base_lrs]
        decay_steps = self.total_steps - self.warmup_steps
        position = min(t - self.warmup_steps, decay_steps)
        if decay_steps == 0:
            return [self.eta_min for _ in self.base_lrs]
        return [_cosine(base, self.eta_min, position, decay_steps) for base in self.base_lrs]


class CosineWarmRestarts(LRScheduler):
    """Cosine annealing with warm restarts (SGDR / AdamWR), counted in steps.

    Args:
        optimizer: any torch optimizer; each group's lr at construction is η_max.
        T_0: steps in the first period.
        T_mult: growth factor of the period (T_0=100, T_mult=2: restarts at 100, 300, 700…).
        eta_min: η_min, the lr at the end of each period.
        warmup_steps: optional linear warm-up before the first period begins.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: int,
        T_mult: int = 1,
        eta_min: float = 0.0,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        T_0, T_mult = _steps("T_0", T_0, 1), _steps("T_mult", T_mult, 1)
        warmup_steps = _steps("warmup_steps", warmup_steps, 0)
        if not (math.isfinite(eta_min) and eta_min >= 0):
            raise ValueError(f"Invalid eta_min value: {eta_min} (must be finite and >= 0)")
        self.T_0, self.T_mult, self.eta_min, self.warmup_steps = T_0, T_mult, eta_min, warmup_steps
        super().__init__(optimizer, last_epoch)

    def period(self, step: int) -> tuple[int, int]:
        """(T_cur, T_i): the position in, and length of, the period holding ``step`` (counted
        after warm-up).

        Period n starts at S_n = T_0·(T_mult^n − 1)/(T_mult − 1) (n·T_0 for T_mult = 1), so n
        is the largest with S_n ≤ step: found from the logarithm, then checked in exact
        integers, so the cost does not grow with the number of past periods.
        """
        if self.T_mult == 1:
            return step % self.T_0, self.T_0

        def start(n: int) -> int:
            return self.T_0 * (self.T_mult**n - 1) // (self.T_mult - 1)

        n = int(math.log(step * (self.T_mult - 1) / self.T_0 + 1, self.T_mult))
        while n > 0 and start(n) > step:
            n -= 1
        while start(n + 1) <= step:
            n += 1
        return step - start(n), self.T_0 * self.T_mult**n

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        if t < self.warmup_steps:
            self._set_decay_period(self.T_0)
            return [_warmup(base, t, self.warmup_steps) for base in self.base_lrs]
        position, length = self.period(t - self.warmup_steps)
        self._set_decay_period(length)
        return [_cosine(base, self.eta_min, position, length) for base in self.base_lrs]

    def _set_decay_period(self, length: int) -> None:
        for group in self.optimizer.param_groups:
            if group.get("lambda_norm") is not None:
                group["decay_period"] = length
