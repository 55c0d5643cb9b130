"""The panels of ``decoupled inspect`` redrawn from TensorBoard event files (no browser).

    python -m decoupled.integrations.figure runs/adam runs/adamw --out figures

Each logdir is one run, drawn side by side (Adam + L2 beside AdamW, as ``inspect`` does): the
angular update per layer against theory, the weight norms, and the effective decay over time
with the lr schedule, by ``decoupled.diagnostics.plots``. The rows are rebuilt from the scalars
``scalars.py`` names: every logged layer is decayed; a layer is scale-invariant where a
prediction was logged (theory predicts only for those, and never for Adam + L2); the decay is
decoupled where every logged ``rate_cv`` is 0. The two per-element panels (distributions,
decay against sqrt(v̂)) need samples that event files do not hold, so they are not drawn.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from pathlib import Path

from decoupled.diagnostics.inspection import InspectedRun
from decoupled.diagnostics.plots import (
    plot_angular_updates,
    plot_decay_over_time,
    plot_weight_norms,
)
from decoupled.diagnostics.table import DecayRecord, DecayTable
from decoupled.integrations.scalars import LAYER_FIELDS
from decoupled.integrations.tensorboard import read_scalars


@dataclass(frozen=True)
class LoggedSettings:
    """A logged run's settings as the inspect panels read them (``RunSettings``)."""

    optimizer: str  # a registry name, from the decay's kind: "adam" (L2) or "adamw"
    lr: float  # the peak of the logged γ_t, to 3 significant digits (a title's label)
    weight_decay: float  # the largest logged λ, to 3 significant digits


def table_from_scalars(scalars: dict[str, dict[int, float]]) -> DecayTable:
    """The monitor's rows for the layers and steps in ``scalars`` (``read_scalars``'s
    result); fields that are not logged are NaN."""
    layers: dict[str, dict[str, dict[int, float]]] = {}
    for tag, values in scalars.items():
        head, _, field = tag.rpartition("/")
        if head.startswith("decay/") and field in LAYER_FIELDS:
            layers.setdefault(head[len("decay/") :], {})[field] = values
    lr, weight_decay = scalars.get("decay_model/lr", {}), scalars.get("decay_model/weight_decay")
    rows = []
    for tensor, logged in layers.items():
        decoupled = all(value == 0 for value in logged.get("rate_cv", {}).values())
        for step in sorted(logged.get("angular_update", {})):
            values = {f.name: math.nan for f in fields(DecayRecord)}
            values.update(
                {field: series[step] for field, series in logged.items() if step in series}
            )
            numel = int(values["numel"]) if not math.isnan(values["numel"]) else 0
            values.update(
                step=step,
                tensor=tensor,
                shape=f"d={numel}",
                numel=numel,
                decayed=True,
                scale_invariant=step in logged.get("predicted_angular_update", {}),
                decay_kind="decoupled" if decoupled else "L2",
                lr=lr.get(step, math.nan),
                weight_decay=(weight_decay or {}).get(step, math.nan),
            )
            rows.append(DecayRecord(**values))
    rows.sort(key=lambda row: row.step)
    return DecayTable(rows)


def logged_run(logdir: str | Path, prefix: str = "") -> InspectedRun:
    """One logdir as an inspected run (``prefix``: ``"train/"`` for Hugging Face's logs)."""
    table = table_from_scalars(read_scalars(logdir, prefix))
    if not len(table):
        raise ValueError(f"no decay/<layer>/... scalars in the event files under {logdir}")
    decoupled = all(row.decay_kind == "decoupled" for row in table)
    settings = LoggedSettings(
        "adamw" if decoupled else "adam",
        float(f"{max(table.column('lr')):.3g}"),
        float(f"{max(table.column('weight_decay')):.3g}"),
    )
    return InspectedRun(settings, table, metric=math.nan, metric_name="", wall_time=math.nan)


def plot_logdirs(logdirs: list[str | Path], out: str | Path, prefix: str = "") -> list[Path]:
    """The three table-based inspect figures for the runs in ``logdirs``, written to ``out``."""
    runs = [logged_run(logdir, prefix) for logdir in logdirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_angular_updates(runs, out / "angular_update.png"),
        plot_weight_norms(runs, out / "weight_norms.png"),
        plot_decay_over_time(runs, out / "decay_over_time.png"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdirs", nargs="+", help="one TensorBoard logdir per run")
    parser.add_argument("--out", default=".", help="folder for the PNG files")
    parser.add_argument("--prefix", default="", help='tag prefix to strip ("train/" for HF)')
    args = parser.parse_args(argv)
    try:
        paths = plot_logdirs(args.logdirs, args.out, args.prefix)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print("\n".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
