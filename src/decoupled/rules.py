"""Rules for choosing the weight decay λ: normalized weight decay and the EMA timescale.

Notation (``SCIENCE.md``): γ the learning rate, b the batch size, N the number of training
examples, T the epochs of the run. ``N·T/b`` is the number of optimizer steps.
"""

from __future__ import annotations

import math

from decoupled.optim._base import is_number
from decoupled.optim.decay import convert_weight_decay


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not is_number(value):
            raise ValueError(f"Invalid {name} value: {value!r} (must be a number > 0)")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"Invalid {name} value: {value} (must be finite and > 0)")


def _check_nonnegative(**values: float) -> None:
    for name, value in values.items():
        if not (is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid {name} value: {value!r} (must be a finite number >= 0)")


def normalized_weight_decay(
    lambda_norm: float, batch_size: int, dataset_size: int, epochs: float
) -> float:
    """The paper's normalized weight decay, ``λ = λ_norm · sqrt(b / (N·T))``.

    Loshchilov & Hutter 2019 (arXiv 1711.05101), Appendix B.1: with T the epochs of the run
    (of the current period, with warm restarts). ``N·T/b`` is the number of steps, so
    ``λ = λ_norm / sqrt(steps)``. The paper found λ_norm ≈ 0.025–0.05 good for both SGDW and
    AdamW, with the decay multiplied by the schedule multiplier (``decay_scale="schedule"``).
    A dataset 24× larger at equal b and T wants a λ sqrt(24) ≈ 4.9× smaller (the paper's
    ImageNet32x32 vs CIFAR-10 remark).
    """
    _check_positive(batch_size=batch_size, dataset_size=dataset_size, epochs=epochs)
    _check_nonnegative(lambda_norm=lambda_norm)
    return lambda_norm * math.sqrt(batch_size / (dataset_size * epochs))


def weight_decay_for_timescale(
    tau_epochs: float,
    lr: float,
    batch_size: int,
    dataset_size: int,
    convention: str = "lr",
    max_lr: float | None = None,
) -> float:
    """The λ that gives AdamW's weights an EMA timescale of ``tau_epochs`` epochs.

    Wang & Aitchison 2024 (arXiv 2405.13698): with the ``"lr"`` convention AdamW's weights are
    an exponential moving average of recent updates with timescale ``τ_iter = 1/(γλ)`` steps,
    i.e. ``τ_epoch = b/(γ·λ·N)`` epochs, so ``λ = b/(γ·τ_epoch·N)``. The best τ_epoch stays
    roughly constant across model and data sizes. The result is converted to ``convention``
    at lr γ (and peak ``max_lr``, default γ) with :func:`convert_weight_decay`.
    """
    _check_positive(tau_epochs=tau_epochs, lr=lr, batch_size=batch_size, dataset_size=dataset_size)
    lambda_lr = batch_size / (lr * tau_epochs * dataset_size)
    return convert_weight_decay(lambda_lr, "lr", convention, lr, max_lr)


def timescale(
    weight_decay: float,
    lr: float,
    batch_size: int,
    dataset_size: int,
    convention: str = "lr",
    max_lr: float | None = None,
) -> float:
    """The EMA timescale in epochs, ``τ_epoch = b/(γ·λ_lr·N)``: the inverse of
    :func:`weight_decay_for_timescale` (Wang & Aitchison 2024). Infinite for λ = 0."""
    _check_positive(lr=lr, batch_size=batch_size, dataset_size=dataset_size)
    _check_nonnegative(weight_decay=weight_decay)
    lambda_lr = convert_weight_decay(weight_decay, convention, "lr", lr, max_lr)
    if lambda_lr == 0:
        return math.inf
    return batch_size / (lr * lambda_lr * dataset_size)
