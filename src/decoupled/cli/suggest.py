"""Suggest a weight decay λ: the paper's normalized weight decay and the EMA-timescale rule,
in each convention, with the timescale each implies.

Rules: λ = λ_norm·sqrt(b/(N·T)) (Loshchilov & Hutter 2019, App. B.1; in the paper's
"schedule" units) and λ = b/(γ·τ·N) (Wang & Aitchison 2024, "lr" units). The EMA timescale of
AdamW's weights is τ_iter = 1/(γ·λ_lr) steps = b/(γ·λ_lr·N) epochs; it should be neither much
shorter than one epoch nor much longer than the run.
"""

from __future__ import annotations

import argparse
import json
import math

from decoupled.cli import CommandError, nonnegative_float, positive_float, positive_int
from decoupled.optim.decay import DECAY_SCALES, convert_weight_decay
from decoupled.rules import normalized_weight_decay, timescale, weight_decay_for_timescale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lr", type=positive_float, required=True, help="peak learning rate γ (> 0)"
    )
    parser.add_argument("--batch-size", type=positive_int, required=True, help="batch size b")
    parser.add_argument(
        "--dataset-size", type=positive_int, required=True, help="training examples N"
    )
    parser.add_argument(
        "--epochs",
        type=positive_float,
        required=True,
        help="epochs T of the run (of one period, with warm restarts)",
    )
    parser.add_argument(
        "--convention",
        choices=DECAY_SCALES,
        default="lr",
        help="the convention your optimizer uses, for --weight-decay "
        "(default: lr, as torch.optim.AdamW)",
    )
    parser.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=None,
        help="also report the timescale of this λ (in --convention units)",
    )
    parser.add_argument(
        "--timescale",
        type=positive_float,
        default=None,
        help="target EMA timescale τ in epochs (default: sqrt(T), the middle of "
        "[1 epoch, T] on a log scale — a heuristic, not from a paper)",
    )
    parser.add_argument(
        "--lambda-norm",
        type=nonnegative_float,
        default=0.05,
        help="λ_norm of the normalized rule (default 0.05; the paper used 0.025-0.05)",
    )
    parser.add_argument(
        "--max-lr",
        type=positive_float,
        default=None,
        help="peak lr α for the schedule/corrected conventions (default: --lr)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table; an infinite timescale (λ = 0: no decay) is "
        "written as null",
    )


def suggestions(args: argparse.Namespace) -> dict:
    """Everything `suggest` prints, as plain data.

    Raises CommandError, naming the option, when a value is so extreme that a conversion
    divides by zero or over/underflows float64 (e.g. ``--lr 1e-300``: γ² is 0), when the run
    is shorter than one step (N·T/b < 1), or when a rule's timescale τ_iter = 1/(γ·λ_lr) is
    under one step (γ·λ > 1: θ(1 − γ·λ) overshoots zero; Wang & Aitchison 2024's EMA reading
    needs γ·λ < 1).
    """
    lr, b, n, epochs = args.lr, args.batch_size, args.dataset_size, args.epochs
    if b > n:
        raise CommandError(f"argument --batch-size: {b} is larger than --dataset-size {n}")
    if args.max_lr is not None and args.max_lr < lr:
        raise CommandError(
            f"argument --max-lr: {args.max_lr:g} is below --lr {lr:g} (the peak lr α is the "
            "schedule's highest, so γ/α ≤ 1)"
        )
    steps = n * epochs / b
    if not math.isfinite(steps):
        raise CommandError(f"argument --epochs: {epochs:g} is out of range: N·T/b overflows")
    if steps < 1:  # b ≤ N, so only T < 1 gets here
        raise CommandError(
            f"argument --epochs: {epochs:g} is less than one step: N·T/b = {steps:.3g} "
            f"(N {n}, b {b})"
        )
    _check_lr(lr, args.max_lr)
    tau_target = args.timescale if args.timescale is not None else math.sqrt(epochs)
    tau_option = "--timescale" if args.timescale is not None else "--epochs"
    rules = [
        (
            f"normalized (lambda_norm = {args.lambda_norm:g})",
            "schedule",
            lambda: normalized_weight_decay(args.lambda_norm, b, n, epochs),
            f"--lambda-norm: {args.lambda_norm:g}",
            args.lambda_norm == 0,
        ),
        (
            f"timescale (tau = {tau_target:.3g} epochs)",
            "lr",
            lambda: weight_decay_for_timescale(tau_target, lr, b, n),
            f"{tau_option}: {args.timescale if args.timescale is not None else epochs:g}",
            False,
        ),
    ]
    if args.weight_decay is not None:
        rules.append(
            (
                f"yours (weight_decay = {args.weight_decay:g})",
                args.convention,
                lambda: args.weight_decay,
                f"--weight-decay: {args.weight_decay:g}",
                args.weight_decay == 0,
            )
        )
    rows = []
    for name, convention, compute, culprit, no_decay in rules:
        by_convention = None
        try:
            value = compute()
            if _in_range(value, zero=no_decay):
                by_convention = {
                    dst: convert_weight_decay(value, convention, dst, lr, args.max_lr)
                    for dst in DECAY_SCALES
                }
                tau_epochs = timescale(value, lr, b, n, convention, args.max_lr)
                tau_steps = tau_epochs * n / b
        except (ZeroDivisionError, OverflowError):
            by_convention = None
        # λ = 0, and only λ = 0, means no decay: λ is 0 in every convention and τ infinite
        if not (
            by_convention is not None
            and all(_in_range(v, zero=no_decay) for v in by_convention.values())
            and all(
                math.isinf(t) if no_decay else _in_range(t, zero=False)
                for t in (tau_epochs, tau_steps)
            )
        ):
            raise CommandError(
                f"argument {culprit} is out of range at --lr {lr:g}: rule {name!r} "
                "divides by zero or over/underflows float64"
            )
        # τ_iter = 1/(γ·λ_lr) < 1 step: θ(1 − γ·λ) changes sign every step, no average at all
        if tau_steps < 1:
            raise CommandError(
                f"argument {culprit} is out of range at --lr {lr:g}: rule {name!r} gives a "
                f"timescale of {tau_steps:.3g} steps (γ·λ > 1: the decay overshoots zero)"
            )
        rows.append(
            {
                "rule": name,
                "weight_decay": by_convention,
                "timescale_epochs": tau_epochs,
                "timescale_steps": tau_steps,
                "warning": _warning(name, tau_epochs, epochs),
            }
        )
    return {
        "lr": lr,
        "max_lr": args.max_lr or lr,
        "batch_size": b,
        "dataset_size": n,
        "epochs": epochs,
        "steps": steps,
        "rules": rows,
    }


def _in_range(value: float, *, zero: bool) -> bool:
    """Finite, and 0 exactly when it should be (a nonzero λ that comes out 0 underflowed)."""
    return math.isfinite(value) and (value == 0) == zero


def _check_lr(lr: float, max_lr: float | None) -> None:
    """The conversions between conventions divide by γ, γ/α and γ²/α: all must be finite > 0."""
    for dst in DECAY_SCALES:
        try:
            there = convert_weight_decay(1.0, "lr", dst, lr, max_lr)
            back = convert_weight_decay(1.0, dst, "lr", lr, max_lr)
        except (ZeroDivisionError, OverflowError):
            there = back = math.nan
        if not (_in_range(there, zero=False) and _in_range(back, zero=False)):
            with_max = f" (with --max-lr {max_lr:g})" if max_lr is not None else ""
            raise CommandError(
                f"argument --lr: {lr:g}{with_max} is out of range: converting λ to the "
                f"{dst!r} convention divides by zero or over/underflows float64"
            )


def _json_safe(value):
    """``value`` with infinite floats as None (JSON has no infinity: null)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _warning(rule: str, tau_epochs: float, epochs: float) -> str | None:
    if math.isinf(tau_epochs):
        return f"{rule}: λ = 0, no decay (infinite timescale)"
    if tau_epochs < 1:
        return (
            f"{rule}: timescale {tau_epochs:.3g} epochs is shorter than one epoch — the "
            "weights forget examples before the next pass over the data"
        )
    if tau_epochs > epochs:
        return (
            f"{rule}: timescale {tau_epochs:.3g} epochs is longer than the run "
            f"({epochs:g} epochs) — the decay barely acts"
        )
    return None


def _steps_text(steps: float) -> str:
    """A step count with thousands separators; "inf" and 1e+12 style when too long for that."""
    return f"{steps:,.0f}" if steps < 1e9 else f"{steps:.3g}"


def run(args: argparse.Namespace) -> int:
    if args.timescale is not None and args.timescale <= 0:
        raise CommandError(f"argument --timescale: must be > 0, got {args.timescale}")
    result = suggestions(args)
    if args.json:
        print(json.dumps(_json_safe(result), indent=2, allow_nan=False, default=str))
        return 0
    print(
        f"lr {result['lr']:g} (peak {result['max_lr']:g}), batch {result['batch_size']}, "
        f"{result['dataset_size']:,} examples, {result['epochs']:g} epochs = "
        f"{_steps_text(result['steps'])} steps\n"
    )
    header = f"{'rule':<34}" + "".join(f"{c:>11}" for c in DECAY_SCALES)
    print(header + f"{'tau epochs':>12}{'tau steps':>12}")
    for row in result["rules"]:
        values = "".join(f"{row['weight_decay'][c]:>11.3g}" for c in DECAY_SCALES)
        print(
            f"{row['rule']:<34}{values}{row['timescale_epochs']:>12.3g}"
            f"{_steps_text(row['timescale_steps']):>12}"
        )
    print(
        "\nweight_decay per convention: lr = torch/optax/Keras AdamW, schedule = the paper,"
        " constant = TF Addons, corrected = AdamC (see decoupled.optim.decay)"
    )
    for row in result["rules"]:
        if row["warning"]:
            print(f"warning: {row['warning']}")
    return 0
