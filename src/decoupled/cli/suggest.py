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
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def suggestions(args: argparse.Namespace) -> dict:
    """Everything `suggest` prints, as plain data."""
    lr, b, n, epochs = args.lr, args.batch_size, args.dataset_size, args.epochs
    steps = n * epochs / b
    tau_target = args.timescale if args.timescale is not None else math.sqrt(epochs)
    rules = [
        (
            f"normalized (lambda_norm = {args.lambda_norm:g})",
            "schedule",
            normalized_weight_decay(args.lambda_norm, b, n, epochs),
        ),
        (
            f"timescale (tau = {tau_target:.3g} epochs)",
            "lr",
            weight_decay_for_timescale(tau_target, lr, b, n),
        ),
    ]
    if args.weight_decay is not None:
        rules.append(
            (f"yours (weight_decay = {args.weight_decay:g})", args.convention, args.weight_decay)
        )
    rows = []
    for name, convention, value in rules:
        by_convention = {
            dst: convert_weight_decay(value, convention, dst, lr, args.max_lr)
            for dst in DECAY_SCALES
        }
        tau_epochs = timescale(value, lr, b, n, convention, args.max_lr)
        rows.append(
            {
                "rule": name,
                "weight_decay": by_convention,
                "timescale_epochs": tau_epochs,
                "timescale_steps": tau_epochs * n / b,
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


def _warning(rule: str, tau_epochs: float, epochs: float) -> str | None:
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


def run(args: argparse.Namespace) -> int:
    if args.timescale is not None and args.timescale <= 0:
        raise CommandError(f"argument --timescale: must be > 0, got {args.timescale}")
    result = suggestions(args)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False, default=str))
        return 0
    print(
        f"lr {result['lr']:g} (peak {result['max_lr']:g}), batch {result['batch_size']}, "
        f"{result['dataset_size']:,} examples, {result['epochs']:g} epochs = "
        f"{result['steps']:,.0f} steps\n"
    )
    header = f"{'rule':<34}" + "".join(f"{c:>11}" for c in DECAY_SCALES)
    print(header + f"{'tau epochs':>12}{'tau steps':>12}")
    for row in result["rules"]:
        values = "".join(f"{row['weight_decay'][c]:>11.3g}" for c in DECAY_SCALES)
        print(
            f"{row['rule']:<34}{values}{row['timescale_epochs']:>12.3g}"
            f"{row['timescale_steps']:>12,.0f}"
        )
    print(
        "\nweight_decay per convention: lr = torch/optax/Keras AdamW, schedule = the paper,"
        " constant = TF Addons, corrected = AdamC (see decoupled.optim.decay)"
    )
    for row in result["rules"]:
        if row["warning"]:
            print(f"warning: {row['warning']}")
    return 0
