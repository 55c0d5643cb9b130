"""A sweep's summary: the paper's lr × weight-decay grid, and numbers that say whether it is
separable (the runs are planned by ``plan.plan_sweep``).

Loshchilov & Hutter 2019 (Figure 2): for Adam + L2 the good region of the lr × λ landscape
lies on a diagonal (lr and λ must be tuned together); for AdamW it is closer to axis-aligned.
"Separable" is made measurable here by the slope of log(best λ) against log(lr) across the
grid's rows (≈ −1 for a diagonal basin, ≈ 0 for a separable one) and by the share of cells
within 10% of the best metric. A cell where any seed diverged counts as diverged: the mean of
its surviving seeds would make a cell that is usually unstable look best.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import gmean

from decoupled.lab.comparison import metric_scale
from decoupled.lab.stats import ROUNDING
from decoupled.lab.store import RunRecord
from decoupled.lab.tasks import Task
from decoupled.lab.train import RunSpec

EMPTY_REASONS = ("diverged", "failed", "running", "missing")


@dataclass
class Landscape:
    """One optimizer's grid: ``values[i, j]`` is the mean metric over seeds at lrs[i], wds[j]
    (NaN where any seed diverged, or where no seed has a finite result).

    ``reasons[i, j]`` says why a NaN cell is empty: ``"diverged"`` (every seed's run
    diverged), ``"k/n diverged"`` (k of its n seeds did), else ``"failed"``, ``"running"`` or
    ``"missing"`` (the first that some seed's run is, in that order); ``""`` for a cell with
    a value. :func:`landscapes` fills it; a Landscape made without it labels its empty cells
    ``"no result"`` and counts every cell as having an outcome."""

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

    def has_outcome(self) -> np.ndarray:
        """Cells that finished or diverged (not failed, running or missing): what the share
        near the best is a share of."""
        if self.reasons is None:
            return np.ones(self.values.shape, dtype=bool)
        diverged = np.vectorize(lambda reason: str(reason).endswith("diverged"), otypes=[bool])
        return np.isfinite(self.values) | diverged(self.reasons)

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
            for side in _edge_sides(grid, [index], axis):
                found.append((axis, side, grid[0] if side == "low" else grid[-1]))
        return found

    def best_on_edge(self) -> bool:
        return bool(self.edges())

    def _tied_best(self) -> list[list[int] | None]:
        """Per row, the λ indices tied for its best score (equal up to float rounding), or
        None for a row without a finite cell."""
        tied = []
        for row in self._score():
            best = row.min()
            tied.append(
                None
                if not math.isfinite(best)
                else [int(j) for j in np.flatnonzero(row <= best + ROUNDING * abs(best))]
            )
        return tied

    def best_wd_per_lr(self) -> list[float | None]:
        """Per row (lr), its best λ: the geometric mean of the λ values tied for the row's best
        when they are neighbours on the grid (a flat stretch, e.g. of a metric in steps of one
        test example, is not pulled to either end; a tie that includes λ = 0 gives 0). None
        for a row without a finite cell, and for a row whose tied λ values are apart (worse
        cells between them: two optima, and their mean would be one of the worse cells), so
        that the slope leaves it out."""
        best: list[float | None] = []
        for indices in self._tied_best():
            tied = [self.wds[j] for j in indices or []]
            if indices and indices[-1] - indices[0] + 1 != len(indices):
                best.append(None)
            elif len(tied) < 2 or min(tied) == 0:
                best.append(min(tied) if tied else None)
            else:
                best.append(float(gmean(tied)))
        return best

    def slope_rows(self) -> list[int]:
        """The rows the slope is fitted to: those whose best λ is finite and > 0 (a row that
        prefers λ = 0, has no finished cell or ties at λ values apart has no one log λ*)."""
        return [i for i, wd in enumerate(self.best_wd_per_lr()) if wd is not None and wd > 0]

    def rows_at_wd_edge(self) -> list[tuple[int, str]]:
        """``(row, side)`` for each row whose best λ (any of its tied ones) is at the low or
        high end of the λ grid: the row's true best may lie beyond it, which clips the slope.
        λ = 0 at the low end is not an edge, as in :meth:`edges`."""
        if len(self.wds) < 2:
            return []
        return [
            (row, side)
            for row, indices in enumerate(self._tied_best())
            if indices is not None
            for side in _edge_sides(self.wds, indices, "wd")
        ]

    def diagonal_slope(self) -> float:
        """Least-squares slope of log(best λ) against log(lr) across :meth:`slope_rows`:
        ≈ −1 for a diagonal basin (γλ constant), ≈ 0 for a separable landscape; NaN with
        fewer than two rows."""
        best_wds = self.best_wd_per_lr()
        points = [(math.log(self.lrs[i]), math.log(best_wds[i])) for i in self.slope_rows()]
        if len(points) < 2 or len({x for x, _ in points}) < 2:
            return math.nan
        x, y = np.array(points).T
        return float(np.polyfit(x, y, 1)[0])

    def share_near_best(self, tolerance: float = 0.10) -> float:
        """Share of the cells with an outcome (:meth:`has_outcome`; diverged ones count, and
        are never near) whose metric is within ``tolerance`` × |best| of the best, on the
        worse side. The tolerance is relative to the metric's own size, so it works for any
        sign, but a best of 0 leaves no tolerance (only cells equal to it count), and an
        accuracy of 0.9 allows 0.09 where the matching error 0.1 allows 0.01."""
        best = self.best()
        if best is None:
            return math.nan
        target = self.values[best]
        slack = abs(target) * tolerance
        finite = np.isfinite(self.values)
        if self.higher_is_better:
            near = self.values >= target - slack
        else:
            near = self.values <= target + slack
        return float((near & finite).sum() / self.has_outcome().sum())


def _edge_sides(grid: Sequence[float], indices: Sequence[int], axis: str) -> list[str]:
    """``"low"``/``"high"`` for each end of ``grid`` that ``indices`` reach (λ = 0 first is no
    edge: a log grid cannot go below it)."""
    sides = []
    if 0 in indices and not (axis == "wd" and grid[0] == 0):
        sides.append("low")
    if len(grid) - 1 in indices:
        sides.append("high")
    return sides


def _empty_reason(outcomes: list[str]) -> str:
    """Why a cell has no value, from its seeds' outcomes: diverged if any seed did."""
    diverged = outcomes.count("diverged")
    if diverged:
        return "diverged" if diverged == len(outcomes) else f"{diverged}/{len(outcomes)} diverged"
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
            seen = outcomes[optimizer][(lr, wd)]
            i, j = lrs.index(lr), wds.index(wd)
            if finite and "diverged" not in seen:
                values[i, j] = float(np.mean(finite))
            else:
                reasons[i, j] = _empty_reason(seen)
        result.append(Landscape(optimizer, lrs, wds, values, task.higher_is_better, reasons))
    return result


def _values(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.3g}" for value in values)


def format_landscapes(items: Sequence[Landscape], metric: str) -> str:
    """The plain-text table `decoupled sweep` prints (the metric scaled as in the compare
    table), then warnings (a best cell or a row's best λ on the grid's edge) and notes (rows
    the slope leaves out, a partial grid, a best of 0)."""
    scale, unit = metric_scale(metric)
    lines = [
        f"{'optimizer':<10}{'best ' + metric.replace('_', ' '):>22}{'at lr':>10}{'at λ':>10}"
        f"{'slope log λ*/log lr':>22}{'cells within 10%':>18}"
    ]
    warnings, notes = [], []
    for land in items:
        best = land.best()
        if best is None:
            lines.append(f"{land.optimizer:<10}{'no finished runs':>22}")
            continue
        i, j = best
        rows = land.slope_rows()
        slope = f"{round(land.diagonal_slope(), 2) + 0.0:.2f} ({len(rows)}/{len(land.lrs)} rows)"
        lines.append(
            f"{land.optimizer:<10}{f'{land.values[i, j] * scale:.4g}{unit}':>22}"
            f"{land.lrs[i]:>10.3g}{land.wds[j]:>10.3g}{slope:>22}"
            f"{land.share_near_best():>17.0%}"
        )
        wd_option = f"--wd-{land.optimizer}"
        for axis, side, value in land.edges():
            name, option = ("lr", "--lr") if axis == "lr" else ("λ", wd_option)
            lowest, below = ("lowest", "below") if side == "low" else ("highest", "above")
            warnings.append(
                f"warning: best {land.optimizer} cell is at the {lowest} {name} ({value:.3g}) "
                f"of the grid: extend {option} {below} it"
            )
        for side in ("low", "high"):
            at_edge = [land.lrs[row] for row, where in land.rows_at_wd_edge() if where == side]
            if at_edge:
                lowest, below = ("lowest", "below") if side == "low" else ("highest", "above")
                value = land.wds[0] if side == "low" else land.wds[-1]
                warnings.append(
                    f"warning: {land.optimizer} rows at lr {_values(at_edge)} have a best λ "
                    f"(or one tied for best) at the {lowest} λ ({value:.3g}) of the grid, which "
                    "may clip the slope: "
                    f"extend {wd_option} {below} it"
                )
        left_out = [land.lrs[row] for row in range(len(land.lrs)) if row not in rows]
        if left_out:
            notes.append(
                f"note: the {land.optimizer} slope leaves out the rows at lr {_values(left_out)} "
                "(best λ = 0, tied best λ values apart, or no finished cell)"
            )
        outcome = land.has_outcome()
        if not outcome.all():
            notes.append(
                f"note: the {land.optimizer} grid is partial: {int((~outcome).sum())} of "
                f"{outcome.size} cells have no outcome yet (failed, running or missing); the "
                f"share within 10% is of the {int(outcome.sum())} that do"
            )
        if land.values[i, j] == 0:
            notes.append(
                f"note: the best {land.optimizer} {metric.replace('_', ' ')} is 0, so "
                "within 10% of it means equal to it"
            )
    return "\n".join(lines + warnings + notes)
