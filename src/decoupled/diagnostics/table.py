"""The monitor's tidy table: one row per recorded step × parameter tensor.

Saved as CSV here, or as plain rows (:meth:`DecayTable.to_rows`) that the lab's results store
keeps in its ``decay_monitor`` table (``ResultStore.save_decay_table``), keyed by (run, step,
tensor). NaN means "not defined here" (e.g. no theory prediction for this tensor); SQLite stores
it as NULL.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class DecayRecord:
    """What weight decay did to one tensor in one step. Rates are fractions of the weight
    removed per step; angles are in radians; norms are Euclidean (Frobenius)."""

    step: int  # the optimizer step, counted from 1 since the monitor was attached
    tensor: str  # the parameter's name in the model (or "group<i>.param<j>")
    shape: str  # e.g. "32x1x5"
    numel: int
    decayed: bool  # λ > 0 for this tensor's group at this step
    scale_invariant: bool  # the loss ignores the tensor's scale (scale_invariance.py)
    decay_kind: str  # "decoupled" | "L2"
    lr: float  # γ_t, the learning rate this step used
    weight_decay: float  # λ of this step
    rate_mean: float  # effective decay rate per element (rates.py), summarized over elements
    rate_cv: float  # coefficient of variation: std/mean (0 for decoupled decay)
    rate_p5: float
    rate_p50: float
    rate_p95: float
    rate_grad_rms_spearman: float  # rank correlation of the rate with sqrt(v̂) (Adam only)
    grad_rms_p50: float  # median of sqrt(v̂) across elements (Adam only)
    weight_norm: float  # ‖θ_t‖ after the step
    update_norm: float  # ‖θ_t − θ_{t−1}‖, decay included
    angular_update: float  # angle between θ_{t−1} and θ_t
    grad_norm: float  # ‖∇f‖ of the loss alone (no L2 term)
    grad_to_weight: float  # ‖∇f‖ / ‖θ_{t−1}‖
    predicted_angular_update: float  # equilibrium value (theory.py); NaN where none
    predicted_weight_norm: float  # AdamW's equilibrium ‖θ̂‖; NaN where none
    predicted_grad_to_weight: float  # SGD/SGDW's equilibrium ‖g‖/‖θ‖; NaN where none


COLUMNS = tuple(f.name for f in fields(DecayRecord))
_TYPES = {f.name: f.type for f in fields(DecayRecord)}
_SQL_AFFINITY = {"int": "INTEGER", "bool": "INTEGER", "str": "TEXT", "float": "REAL"}
#: Each column's SQLite type, for the results store's ``decay_monitor`` table.
SQL_TYPES = {name: _SQL_AFFINITY[_TYPES[name]] for name in COLUMNS}


def _parse(name: str, value) -> int | float | bool | str:
    """A stored value back in its field's type (CSV text, SQLite NULL for NaN)."""
    kind = _TYPES[name]
    if kind == "str":
        return str(value)
    if kind == "bool":
        return value in (True, 1, "1", "True", "true")
    if kind == "int":
        return int(value)
    return math.nan if value is None or value == "" else float(value)


class DecayTable:
    """A list of :class:`DecayRecord` rows with column access, CSV round-trips and plain rows."""

    def __init__(self, rows: Iterable[DecayRecord] = ()):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[DecayRecord]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> DecayRecord:
        return self.rows[index]

    def __eq__(self, other) -> bool:  # NaN-aware, for round-trip checks
        if not isinstance(other, DecayTable) or len(self) != len(other):
            return False
        return all(_same(a, b) for a, b in zip(self.to_dicts(), other.to_dicts()))

    def tensors(self) -> list[str]:
        """Tensor names in the order they first appear."""
        return list(dict.fromkeys(row.tensor for row in self.rows))

    def for_tensor(self, name: str) -> DecayTable:
        return DecayTable(row for row in self.rows if row.tensor == name)

    def where(self, **conditions) -> DecayTable:
        """Rows whose fields equal the given values, e.g. ``where(decayed=True)``."""
        return DecayTable(
            row for row in self.rows if all(getattr(row, k) == v for k, v in conditions.items())
        )

    def column(self, name: str) -> list:
        return [getattr(row, name) for row in self.rows]

    def to_dicts(self) -> list[dict]:
        return [asdict(row) for row in self.rows]

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.to_dicts())
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> DecayTable:
        with Path(path).open(newline="") as handle:
            return cls(
                DecayRecord(**{k: _parse(k, v) for k, v in row.items()})
                for row in csv.DictReader(handle)
            )

    def to_rows(self) -> list[tuple]:
        """The rows as plain tuples in :data:`COLUMNS` order (what the results store saves,
        ``ResultStore.save_decay_table``)."""
        return [tuple(getattr(row, name) for name in COLUMNS) for row in self.rows]

    @classmethod
    def from_rows(cls, rows: Iterable[tuple]) -> DecayTable:
        """The table from plain tuples in :data:`COLUMNS` order; None (SQL NULL) reads as NaN."""
        return cls(DecayRecord(**{k: _parse(k, v) for k, v in zip(COLUMNS, row)}) for row in rows)


def _same(a: dict, b: dict) -> bool:
    for key in COLUMNS:
        x, y = a[key], b[key]
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True
