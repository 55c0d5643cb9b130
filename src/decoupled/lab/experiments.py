"""Which runs make up an experiment (a compare or a sweep), kept beside them in results.db.

The ``runs`` table holds every run; the store's ``experiments`` table remembers each
command's plan so that ``decoupled report`` rebuilds every report from the store alone,
without training. A plan is stored compactly, as axes rather than one spec per run:

    {"fixed": {every field equal in all specs},
     "blocks": [{"fields": {fields equal within the block}, "lr": [...],
                 "weight_decay": [...], "seed": [...]}, ...]}

A block stands for every lr × weight_decay × seed in that order (a sweep's optimizer, or a
compare's arm). Specs that are not such a product are kept one per block, each with one
value per axis. A 10,000-cell sweep thus takes a few hundred kB instead of a JSON spec per
run; a store written before this form (a JSON list of specs) still reads.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields
from itertools import product
from typing import Any

from decoupled.lab.store import ResultStore, StoreWarning
from decoupled.lab.train import RunSpec

AXES = ("lr", "weight_decay", "seed")
_FIELDS = tuple(f.name for f in fields(RunSpec))


@dataclass(frozen=True)
class Experiment:
    name: str  # e.g. "compare-mnist1d"
    kind: str  # "compare" | "sweep"
    specs: tuple[RunSpec, ...]
    updated: float


def _product_block(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One block for specs that are exactly lr × weight_decay × seed in that order, else one
    block per spec."""
    axes = {axis: list(dict.fromkeys(spec[axis] for spec in group)) for axis in AXES}
    expected = [dict(zip(AXES, values)) for values in product(*axes.values())]
    if [{axis: spec[axis] for axis in AXES} for spec in group] == expected:
        return [axes]
    return [{axis: [spec[axis]] for axis in AXES} for spec in group]


def encode_plan(specs: list[RunSpec]) -> dict[str, Any]:
    """The compact plan of ``specs`` (module docstring); :func:`decode_plan` inverts it."""
    rows = [asdict(spec) for spec in specs]
    others = [name for name in _FIELDS if name not in AXES]
    fixed = {
        name: rows[0][name]
        for name in others
        if rows and all(row[name] == rows[0][name] for row in rows)
    }
    blocks: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []

    def close_group() -> None:
        if group:
            block_fields = {name: group[0][name] for name in others if name not in fixed}
            blocks.extend({"fields": block_fields, **block} for block in _product_block(group))

    for row in rows:  # consecutive specs with the same other fields form one group
        if group and any(row[name] != group[0][name] for name in others if name not in fixed):
            close_group()
            group = []
        group.append(row)
    close_group()
    return {"fixed": fixed, "blocks": blocks}


def decode_plan(plan: Any) -> tuple[RunSpec, ...]:
    """The specs of a stored plan: the compact form, or a list of specs (older stores)."""
    if isinstance(plan, list):
        return tuple(RunSpec(**spec) for spec in plan)
    specs = []
    for block in plan["blocks"]:
        settings = {**plan["fixed"], **block["fields"]}
        for lr, weight_decay, seed in product(*(block[axis] for axis in AXES)):
            specs.append(RunSpec(**settings, lr=lr, weight_decay=weight_decay, seed=seed))
    return tuple(specs)


def save_experiment(
    store: ResultStore | str | os.PathLike[str], name: str, kind: str, specs: list[RunSpec]
) -> None:
    """Record (or replace) an experiment's plan in ``store`` (or the store at that path)."""
    if isinstance(store, ResultStore):
        store.save_experiment(name, kind, encode_plan(specs))
        return
    with ResultStore(store) as opened:
        opened.save_experiment(name, kind, encode_plan(specs))


def load_experiments(store: ResultStore, kind: str | None = None) -> list[Experiment]:
    """Every recorded experiment, most recently updated first (``kind``: only those)."""
    experiments = []
    for name, found, plan, updated in store.experiments():
        if kind is not None and found != kind:
            continue
        try:
            specs = decode_plan(plan)
            if not specs:
                raise ValueError("no runs")
        except (KeyError, TypeError, ValueError) as damage:  # JSON, but not a plan
            warnings.warn(
                f"experiment {name}: damaged plan in {store.path} ({damage!r}); left out",
                StoreWarning,
                stacklevel=2,
            )
            continue
        experiments.append(Experiment(name, found, specs, updated))
    return experiments
