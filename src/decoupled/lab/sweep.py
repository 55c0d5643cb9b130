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

    A comma list may hold 0 (e.g. ``0,1e-4,1e-3``: λ = 0 is the paper's reference point) and
    is returned sorted without repeats; log ranges need 0 < lo ≤ hi and 1 ≤ n ≤ 10000, with
    n = 1 exactly when lo = hi (``1e-3:1e-3:3`` would be three copies of one cell).
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


MAX_VALUES = 10_000  # per axis: more is a typo (and np.geomspace would run out of memory)


def log_range(lo: float, hi: float, num: int, name: str = "range") -> list[float]:
    """``num`` distinct log-spaced values from ``lo`` to ``hi`` (both included)."""
    if num < 1:
        raise RangeError(f"{name}: empty range (n = {num})")
    if num > MAX_VALUES:
        raise RangeError(f"{name}: n = {num} values is more than {MAX_VALUES}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= 0:
        raise RangeError(f"{name}: log-spaced bounds must be > 0, got {lo:g}:{hi:g}")
    if lo > hi:
        raise RangeError(f"{name}: lo > hi ({lo:g} > {hi:g})")
    if num == 1:
        if lo != hi:
            raise RangeError(f"{name}: one value needs lo = hi, got {lo:g}:{hi:g}")
        return [lo]
    if lo == hi:
        raise RangeError(
            f"{name}: lo = hi ({lo:g}) gives one value, not n = {num} (use n = 1 or a wider range)"
        )
    values = [float(v) for v in np.geomspace(lo, hi, num)]
    if len(set(values)) != num:
        raise RangeError(f"{name}: {lo:g}:{hi:g} is too narrow for {num} distinct values")
    return values


SPACE_KEYS = ("lr", "weight_decay", *(f"wd_{name}" for name in OPTIMIZERS))


def _shown(value: Any) -> str:
    """A JSON value as the file spells it (``null``, ``"abc"``, ``[0.1]``)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _number(value: Any, where: str) -> float:
    """A finite JSON number (not a string, a bool or null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RangeError(f"{where}: expected a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise RangeError(f"{where}: expected a finite number, got {_shown(value)}")
    return number


def _count(value: Any, where: str) -> int:
    """An integer ≥ 1; a JSON float is accepted only if it is integral (3.0, not 2.7)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RangeError(f"{where}: expected an integer >= 1, got {_shown(value)}")
    return value


def space_from_json(path: str | Path) -> dict[str, list[float]]:
    """A search space file: ``{"lr": {"min": 1e-4, "max": 1e-2, "num": 7, "scaling": "log"},
    "wd_adamw": {"values": [0, 0.01, 0.1]}}`` (AlgoPerf-style: search spaces are data).

    Keys: ``lr``, ``weight_decay`` (every optimizer) or ``wd_<optimizer>``, nothing else. Each
    is either ``{"values": [...]}``, a non-empty list of finite numbers (lr > 0, λ ≥ 0;
    returned sorted without repeats), or ``{"min", "max", "num"[, "scaling": "log"]}`` with
    finite numbers 0 < min ≤ max and an integer num ≥ 1 (a JSON number such as 3.0 counts if
    it is integral; 2.7 does not). Anything else is a :class:`RangeError` naming the key and
    the bad value."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise RangeError(f"search space {path}: {error}") from None
    if not isinstance(raw, dict):
        raise RangeError(f"search space {path}: expected a JSON object")
    space = {}
    for key, spec in raw.items():
        where = f"search space {path}: {key}"
        if key not in SPACE_KEYS:
            raise RangeError(
                f"search space {path}: unknown key {key!r} (allowed: {', '.join(SPACE_KEYS)})"
            )
        if not isinstance(spec, dict):
            raise RangeError(
                f"{where}: expected an object with min/max/num or values, got {_shown(spec)}"
            )
        if "values" in spec:
            fields, expected = {"values"}, "values"
        else:
            fields, expected = {"min", "max", "num", "scaling"}, "min, max, num, scaling"
        extra = sorted(set(spec) - fields)
        if extra:
            raise RangeError(f"{where}: unexpected field {extra[0]!r} (expected {expected})")
        if "values" in spec:
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise RangeError(
                    f"{where}.values: expected a non-empty list of numbers, got {_shown(values)}"
                )
            numbers = [_number(v, f"{where}.values") for v in values]
            if key == "lr":
                bad = [v for v in numbers if v <= 0]
                if bad:
                    raise RangeError(f"{where}.values: learning rates must be > 0, got {bad[0]:g}")
            else:
                bad = [v for v in numbers if v < 0]
                if bad:
                    raise RangeError(f"{where}.values: weight decay must be >= 0, got {bad[0]:g}")
            space[key] = sorted({v + 0.0 for v in numbers})  # + 0.0: -0.0 becomes 0.0
            continue
        missing = [field for field in ("min", "max", "num") if field not in spec]
        if missing:
            raise RangeError(f"{where}: missing {missing[0]!r}")
        scaling = spec.get("scaling", "log")
        if scaling != "log":
            raise RangeError(f'{where}.scaling: only "log" is supported, got {_shown(scaling)}')
        space[key] = log_range(
            _number(spec["min"], f"{where}.min"),
            _number(spec["max"], f"{where}.max"),
            _count(spec["num"], f"{where}.num"),
            where,
        )
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


EMPTY_REASONS = ("diverged", "failed", "running", "missing")


@dataclass
class Landscape:
    """One optimizer's grid: ``values[i, j]`` is the mean metric over seeds at lrs[i], wds[j]
    (NaN where no seed has a finite result).

    ``reasons[i, j]`` says why a NaN cell is empty: ``"diverged"`` (every seed's run
    diverged), else ``"failed"``, ``"running"`` or ``"missing"`` (the first that some seed's
    run is, in that order); ``""`` for a cell with a value. :func:`landscapes` fills it; a
    Landscape made without it labels its empty cells ``"no result"``."""

    optimizer: str
    lrs: list[float]
    wds: list[float]
    values: np.ndarray
    higher_is_better: bool = False
    reasons: np.ndarray | None = None

    def cell_label(self, i: int, j: int) -> str:
        """Why cell (i, j) has no value (``""`` if it has one)."""
        if np.isfinite(self.values[i, j]):
            return ""
        if self.reasons is None or not self.reasons[i, j]:
            return "no result"
        return str(self.reasons[i, j])

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

    def edges(self) -> list[tuple[str, str, float]]:
        """Where the best cell touches the grid's edge: ``(axis, side, value)`` with axis
        ``"lr"`` or ``"wd"`` and side ``"low"`` or ``"high"``. An axis with one value has no
        edge, and λ = 0 at the low end is not one (a log grid cannot go below it)."""
        best = self.best()
        if best is None:
            return []
        found = []
        for axis, grid, index in (("lr", self.lrs, best[0]), ("wd", self.wds, best[1])):
            if len(grid) < 2:
                continue
            if index == 0 and not (axis == "wd" and grid[0] == 0):
                found.append((axis, "low", grid[0]))
            elif index == len(grid) - 1:
                found.append((axis, "high", grid[-1]))
        return found

    def best_on_edge(self) -> bool:
        return bool(self.edges())

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


def _empty_reason(outcomes: list[str]) -> str:
    """Why a cell has no finite result, from its seeds' outcomes."""
    if outcomes and all(outcome == "diverged" for outcome in outcomes):
        return "diverged"
    for reason in ("failed", "running", "missing"):
        if reason in outcomes:
            return reason
    return "missing"


def landscapes(
    task: Task, specs: Iterable[RunSpec], records: Iterable[RunRecord], key_of
) -> list[Landscape]:
    by_key = {r.key: r for r in records}
    grids: dict[str, dict[tuple[float, float], list[float]]] = {}
    outcomes: dict[str, dict[tuple[float, float], list[str]]] = {}
    for spec in specs:
        cells = grids.setdefault(spec.optimizer, {})
        record = by_key.get(key_of(spec))
        values = cells.setdefault((spec.lr, spec.weight_decay), [])
        seen = outcomes.setdefault(spec.optimizer, {}).setdefault((spec.lr, spec.weight_decay), [])
        if record is None:
            seen.append("missing")
        elif record.status == "done":
            metric = float(record.metrics["metric"])
            values.append(metric)
            seen.append("done" if math.isfinite(metric) else "diverged")
        else:
            seen.append(record.status)  # diverged | failed | running
    result = []
    for optimizer, cells in grids.items():
        lrs = sorted({lr for lr, _ in cells})
        wds = sorted({wd for _, wd in cells})
        values = np.full((len(lrs), len(wds)), np.nan)
        reasons = np.full((len(lrs), len(wds)), "", dtype=object)
        for (lr, wd), metrics in cells.items():
            finite = [m for m in metrics if math.isfinite(m)]
            i, j = lrs.index(lr), wds.index(wd)
            if finite:
                values[i, j] = float(np.mean(finite))
            else:
                reasons[i, j] = _empty_reason(outcomes[optimizer][(lr, wd)])
        result.append(Landscape(optimizer, lrs, wds, values, task.higher_is_better, reasons))
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
        for axis, side, value in land.edges():
            name, option = ("lr", "--lr") if axis == "lr" else ("λ", f"--wd-{land.optimizer}")
            lowest, below = ("lowest", "below") if side == "low" else ("highest", "above")
            warnings.append(
                f"warning: best {land.optimizer} cell is at the {lowest} {name} ({value:.3g}) "
                f"of the grid: extend {option} {below} it"
            )
    return "\n".join(lines + warnings)
