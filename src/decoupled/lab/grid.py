"""The sweep's grid: lr and λ values from ``lo:hi:n`` ranges, comma lists, JSON search
spaces, or around a task's tuned settings. Bad input is a :class:`RangeError` naming the value
(the CLI turns it into exit status 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from decoupled.lab.tasks import Task
from decoupled.optim.registry import NAMES as OPTIMIZERS


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
#: Cells (lr × λ summed over optimizers) a sweep may have unless the caller raises the bound:
#: 1000 × 1000 values is a typo that would plan a million runs.
MAX_CELLS = 10_000


def check_grid_size(
    lrs: dict[str, list[float]], wds: dict[str, list[float]], max_cells: int = MAX_CELLS
) -> int:
    """The number of cells, Σ over optimizers of len(lrs) × len(wds); a :class:`RangeError`
    naming it and each optimizer's shape when it is above ``max_cells``."""
    cells = sum(len(lrs[name]) * len(wds[name]) for name in lrs)
    if cells > max_cells:
        shapes = ", ".join(f"{name} {len(lrs[name])} x {len(wds[name])}" for name in lrs)
        raise RangeError(
            f"the grid has {cells} cells (lr x weight decay: {shapes}), more than "
            f"{max_cells}; pass --max-cells {cells} if you mean it"
        )
    return cells


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
