"""Does bfloat16 optimizer state change what the default lab task learns?

    python benchmarks/compact_state_lab.py [--seeds 5] [--optimizers adam,adamw] [--quick]

Trains each optimizer on the default task (its full budget and default hyperparameters)
with float32 and with bfloat16 moments (``state_dtype=torch.bfloat16``), the same seeds, and
prints per optimizer the final test error of both, the seed-to-seed spread of float32 state,
and the paired difference (bfloat16 − float32, by seed) with its 95% interval. Runs are kept
in ``--out``'s results.db, so a second call only prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from decoupled.lab.executor import execute
from decoupled.lab.plan import plan_compare
from decoupled.lab.stats import paired_difference
from decoupled.lab.store import ResultStore
from decoupled.lab.tasks import DEFAULT_TASK, get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--optimizers", default="adam,adamw")
    parser.add_argument("--quick", action="store_true", help="the task's smoke-test budget")
    parser.add_argument("--out", default="./decoupled-runs/compact-state")
    args = parser.parse_args()

    task = get_task(DEFAULT_TASK)
    steps = task.quick_steps if args.quick else task.steps
    optimizers = args.optimizers.split(",")
    db_path = Path(args.out) / "results.db"
    db_path.parent.mkdir(parents=True, exist_ok=True)
    plans = {
        dtype: plan_compare(task, optimizers, args.seeds, steps, state_dtype=dtype)
        for dtype in (None, "bfloat16")
    }
    execute([s for specs in plans.values() for s in specs], db_path, description="f32 vs bf16")
    records = {r.key: r for r in ResultStore(db_path).records()}

    print(f"{task.name}: final {task.metric}, {args.seeds} seeds x {steps} steps")
    print(
        f"{'optimizer':<10}{'float32 state':>22}{'bfloat16 state':>22}{'bf16 - f32 (95% CI)':>30}"
    )
    for name in optimizers:
        values = {
            dtype: np.array(
                [records[s.key()].metrics["metric"] for s in specs if s.optimizer == name]
            )
            for dtype, specs in plans.items()
        }
        f32, bf16 = values[None], values["bfloat16"]
        diff = paired_difference(f32, bf16)
        print(
            f"{name:<10}{f32.mean():>13.2%} ± {f32.std(ddof=1):.2%}"
            f"{bf16.mean():>13.2%} ± {bf16.std(ddof=1):.2%}"
            f"{diff.mean_diff:>+12.2%} [{diff.low:+.2%}, {diff.high:+.2%}] p={diff.p_value:.2f}"
        )
    print(
        "(± is the seed-to-seed standard deviation; the paired interval covering 0 means no "
        "detectable difference)"
    )


if __name__ == "__main__":
    main()
