"""What a compare was asked beyond its runs: extra pairs and a ``--seeds auto`` design.

They are kept in the experiment's ``kind`` ("compare", then the options as JSON after a
space), so that ``decoupled report`` rebuilds a compare's verdicts from the store alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from decoupled.lab.sequential import Look


@dataclass(frozen=True)
class Sequential:
    """The design of a ``--seeds auto`` compare: at most ``max_seeds`` seeds; stop when
    every pair's confidence sequence excludes 0 or is narrower than ``resolution`` (in the
    metric's own units, e.g. 0.005 for half a point of error; None: no such stop)."""

    max_seeds: int
    resolution: float | None = None
    alpha: float = 0.05


@dataclass(frozen=True)
class SequentialPair:
    """One pair's confidence sequence: its last look, why it stops (None: go on), looks."""

    look: Look
    reason: str | None
    looks: int


#: ``Experiment.kind`` of a compare; its options (extra pairs, sequential design) follow
#: after a space as JSON, so that a report rebuilt from the store alone shows them.
COMPARE_KIND = "compare"


def compare_kind(pairs: Sequence[tuple[str, str]] = (), sequential: Sequential | None = None):
    """The experiment kind recording these options (plain "compare" without any)."""
    options: dict = {}
    if pairs:
        options["pairs"] = [list(pair) for pair in pairs]
    if sequential is not None:
        options["sequential"] = {
            "max_seeds": sequential.max_seeds,
            "resolution": sequential.resolution,
            "alpha": sequential.alpha,
        }
    return COMPARE_KIND + (" " + json.dumps(options, sort_keys=True) if options else "")


def is_compare(kind: str) -> bool:
    return kind.split(" ", 1)[0] == COMPARE_KIND


def compare_options(kind: str) -> dict:
    """``summarize`` keyword arguments from an experiment kind written by ``compare_kind``."""
    _, _, text = kind.partition(" ")
    options = json.loads(text) if text else {}
    result: dict = {"extra_pairs": [tuple(pair) for pair in options.get("pairs", [])]}
    if "sequential" in options:
        result["sequential"] = Sequential(**options["sequential"])
    return result
