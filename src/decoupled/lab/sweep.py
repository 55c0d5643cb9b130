"""Sweeps: the paper's lr × weight-decay grid, and numbers that say whether it is separable.

Loshchilov & Hutter 2019 (Figure 2): for Adam + L2 the good region of the lr × λ landscape
lies on a diagonal (lr and λ must be tuned together); for AdamW it is closer to axis-aligned.
"Separable" is made measurable here by the slope of log(best λ) against log(lr) across the
grid's rows (≈ −1 for a diagonal basin, ≈ 0 for a separable one) and by the share of cells
within 10% of the best metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decoupled.lab.store import RunRecord
from decoupled.lab.tasks import Task
from decoupled.lab.train import OPTIMIZERS, RunSpec


class RangeError(ValueError):
    """A bad range or search space (the CLI turns it into exit status 2)."""


def parse_range(text: str, name: str = "range") -> list[float]:
    """Grid values from ``lo:hi:n`` (n log-spaced values, lo and hi included) or a comma list.

    A comma list may hold 0 (e.g. ``0,1e-4,1e-3``: λ = 0 is the paper's reference point);
    log ranges need 0 < lo ≤ hi and n ≥ 1 (n = 1 needs lo = hi).
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise RangeError(f"{name}: expected lo:hi:n, got {text!r}")
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            return log_range(lo, hi, n, name)
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        if isinstance(error, RangeError):
            raise
        raise RangeError(f"{name}: not a range or list of numbers: {text!r}") from None
    if not values:
        raise RangeError(f"{name}: empty range {text!r}")
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise RangeError(f"{name}: values must be finite and >= 0, got {bad[0]}")
    return sorted(set(values))


def log_range(lo: float, hi: float, num: int, name: str = "range") -> list[float]:
    if num < 1:
        raise RangeError(f"{name}: empty range (n = {num})")
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= 0:
        raise RangeError(f"{name}: log-spaced bounds must be > 0, got {lo:g}:{hi:g}")
    if lo > hi:
        raise RangeError(f"{name}: lo > hi ({lo:g} > {hi:g})")
    if num == 1:
        if lo != hi:
            raise RangeError(f"{name}: one value needs lo = hi, got {lo:g}:{hi:g}")
        return [lo]
    return [float(v) for v in np.geomspace(lo, hi, num)]


def space_from_json(path: str | Path) -> dict[str, list[float]]:
    """A search space file: ``{"lr": {"min": 1e-4, "max": 1e-2, "num": 7, "scaling": "log"},
    "wd_adamw": {"values": [0, 0.01, 0.1]}}`` (AlgoPerf-style: search spaces are data).
    Keys: ``lr``, ``wd_<optimizer>``, or ``weight_decay`` (every optimizer)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RangeError(f"search space {path}: {error}") from None
    if not isinstance(raw, dict):
        raise RangeError(f"search space {path}: expected a JSON object")
    space = {}
    for key, spec in raw.items():
        if key != "lr" and key != "weight_decay" and key.removeprefix("wd_") not in OPTIMIZERS:
            raise RangeError(f"search space {path}: unknown key {key!r}")
        if isinstance(spec, dict) and "values" in spec:
            space[key] = parse_range(",".join(str(v) for v in spec["values"]), key)
        elif isinstance(spec, dict):
            scaling = spec.get("scaling", "log")
            if scaling != "log":
                raise RangeError(f"{key}: only log scaling is supported, got {scaling!r}")
            try:
                space[key] = log_range(
                    float(spec["min"]), float(spec["max"]), int(spec["num"]), key
                )
            except KeyError as missing:
                raise RangeError(f"{key}: missing {missing}") from None
        else:
            raise RangeError(f"{key}: expected an object with min/max/num or values")
    return space


def default_lrs(task: Task, optimizer: str, num: int = 5) -> list[float]:
    """lr grid around the task's tuned value: ×1/10 … ×10, log-spaced."""
    lr = task.defaults[optimizer].lr
    return log_range(lr / 10, lr * 10, num)


def default_wds(task: Task, optimizer: str, num: int = 5) -> list[float]:
    """λ grid around the task's tuned value: ×1/30 … ×30 (×1e-3 … ×1 of 1e-2 if it is 0)."""
    wd = task.defaults[optimizer].weight_decay or 1e-3
    return log_range(wd / 30, wd * 30, num)


def plan_sweep(
    task: Task,
    optimizers: Sequence[str],
    lrs: dict[str, list[float]],
    wds: dict[str, list[float]],
    seeds: int,
    steps: int,
    **common: Any,
) -> list[RunSpec]:
    """One run per optimizer × lr × λ × seed (SGD/SGDW keep the task's momentum)."""
    specs = []
    for name in optimizers:
        momentum = task.defaults[name].momentum
        for lr in lrs[name]:
            for wd in wds[name]:
                for seed in range(seeds):
                    spec = RunSpec(
                        task=task.name,
                        optimizer=name,
                        lr=lr,
                        weight_decay=wd,
                        seed=seed,
                        steps=steps,
                        momentum=momentum,
                        **common,
                    )
                    spec.validate()
                    specs.append(spec)
    return specs


@dataclass
class Landscape:
    """One optimizer's grid: ``values[i, j]`` is the mean metric over seeds at lrs[i], wds[j]
    (NaN where every seed diverged or nothing finished)."""

    optimizer: str
    lrs: list[float]
    wds: list[float]
    values: np.ndarray
    higher_is_better: bool = False

    def _score(self) -> np.ndarray:
        """Lower is better, NaN as worst."""
        score = -self.values if self.higher_is_better else self.values.copy()
        return np.where(np.isfinite(score), score, np.inf)

    def best(self) -> tuple[int, int] | None:
        score = self._score()
        if not np.isfinite(score).any():
            return None
        i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        return int(i), int(j)

    def best_on_edge(self) -> bool:
        best = self.best()
        if best is None:
            return False
        i, j = best
        return (len(self.lrs) > 1 and i in (0, len(self.lrs) - 1)) or (
            len(self.wds) > 1 and j in (0, len(self.wds) - 1)
        )

    def best_wd_per_lr(self) -> list[float | None]:
        score = self._score()
        return [self.wds[int(np.argmin(row))] if np.isfinite(row).any() else None for row in score]

    def diagonal_slope(self) -> float:
        """Least-squares slope of log(best λ) against log(lr) across rows (λ > 0 only):
        ≈ −1 for a diagonal basin (γλ constant), ≈ 0 for a separable landscape."""
        points = [
            (math.log(lr), math.log(wd))
            for lr, wd in zip(self.lrs, self.best_wd_per_lr())
            if wd is not None and wd > 0
        ]
        if len(points) < 2 or len({x for x, _ in points}) < 2:
            return math.nan
        x, y = np.array(points).T
        return float(np.polyfit(x, y, 1)[0])

    def share_near_best(self, tolerance: float = 0.10) -> float:
        """Share of cells whose metric is within ``tolerance`` (relative) of the best."""
        best = self.best()
        if best is None:
            return math.nan
        target = self.values[best]
        finite = np.isfinite(self.values)
        if self.higher_is_better:
            near = self.values >= target * (1 - tolerance)
        else:
            near = self.values <= target * (1 + tolerance)
        return float((near & finite).sum() / self.values.size)


def landscapes(
    task: Task, specs: Iterable[RunSpec], records: Iterable[RunRecord], key_of
) -> list[Landscape]:
    by_key = {r.key: r for r in records}
    grids: dict[str, dict[tuple[float, float], list[float]]] = {}
    for spec in specs:
        cells = grids.setdefault(spec.optimizer, {})
        record = by_key.get(key_of(spec))
        values = cells.setdefault((spec.lr, spec.weight_decay), [])
        if record is not None and record.status == "done":
            values.append(float(record.metrics["metric"]))
    result = []
    for optimizer, cells in grids.items():
        lrs = sorted({lr for lr, _ in cells})
        wds = sorted({wd for _, wd in cells})
        values = np.full((len(lrs), len(wds)), np.nan)
        for (lr, wd), metrics in cells.items():
            finite = [m for m in metrics if math.isfinite(m)]
            if finite:
                values[lrs.index(lr), wds.index(wd)] = float(np.mean(finite))
        result.append(Landscape(optimizer, lrs, wds, values, task.higher_is_better))
    return result


def format_landscapes(items: Sequence[Landscape], metric: str) -> str:
    lines = [
        f"{'optimizer':<10}{'best ' + metric:>22}{'at lr':>10}{'at λ':>10}"
        f"{'slope log λ*/log lr':>22}{'cells within 10%':>18}"
    ]
    warnings = []
    for land in items:
        best = land.best()
        if best is None:
            lines.append(f"{land.optimizer:<10}{'no finished runs':>22}")
            continue
        i, j = best
        lines.append(
            f"{land.optimizer:<10}{land.values[i, j]:>22.4g}{land.lrs[i]:>10.3g}"
            f"{land.wds[j]:>10.3g}{round(land.diagonal_slope(), 2) + 0.0:>22.2f}"
            f"{land.share_near_best():>17.0%}"
        )
        if land.best_on_edge():
            warnings.append(
                f"warning: {land.optimizer}'s best cell lies on the grid's edge — "
                "widen the grid in that direction"
            )
    return "\n".join(lines + warnings)
