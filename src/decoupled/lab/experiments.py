"""Which runs make up an experiment (a compare or a sweep), kept beside them in results.db.

The ``runs`` table holds every run; this table remembers each command's plan (its specs) so
that ``decoupled report`` rebuilds every report from the store alone, without training.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from decoupled.lab.train import RunSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    specs TEXT NOT NULL,
    updated REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Experiment:
    name: str  # e.g. "compare-mnist1d"
    kind: str  # "compare" | "sweep"
    specs: tuple[RunSpec, ...]
    updated: float


def _connect(db_path: str | Path) -> sqlite3.Connection:
    connection = sqlite3.connect(db_path, timeout=30.0)
    connection.execute(_SCHEMA)
    return connection


def save_experiment(db_path: str | Path, name: str, kind: str, specs: list[RunSpec]) -> None:
    """Record (or replace) an experiment's plan; a transaction, so never half-written."""
    payload = json.dumps([asdict(spec) for spec in specs])
    with _connect(db_path) as connection:
        connection.execute(
            "INSERT OR REPLACE INTO experiments (name, kind, specs, updated) VALUES (?, ?, ?, ?)",
            (name, kind, payload, time.time()),
        )
    connection.close()


def load_experiments(db_path: str | Path, kind: str | None = None) -> list[Experiment]:
    """Every recorded experiment, most recently updated first."""
    connection = _connect(db_path)
    try:
        rows = connection.execute(
            "SELECT name, kind, specs, updated FROM experiments ORDER BY updated DESC"
        ).fetchall()
    finally:
        connection.close()
    return [
        Experiment(name, k, tuple(RunSpec(**s) for s in json.loads(specs)), updated)
        for name, k, specs, updated in rows
        if kind is None or k == kind
    ]
