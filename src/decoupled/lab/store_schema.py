"""The results store's tables, and the checks that a file is a store this package may write.

A file is written only once it is recognised: an empty SQLite database (or a 0-byte file, as a
creation on a full disk leaves behind), or one whose ``meta.schema_version`` is a whole number
no newer than :data:`SCHEMA_VERSION` and whose tables of ours have exactly our columns. Every
check here only reads, through SQLite, so a refused file keeps every byte and its mtime.

Versions: 1 held ``runs`` (and, written beside it, ``experiments`` with one JSON spec per run
and ``decay_monitor``); 2 stores an experiment's plan compactly (``lab/experiments.py``) and
owns all four tables. A version-1 store is upgraded on opening: its rows stay readable as they
are, only the version number changes.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from decoupled.diagnostics.table import COLUMNS as DECAY_COLUMNS
from decoupled.diagnostics.table import SQL_TYPES as DECAY_SQL_TYPES

SCHEMA_VERSION = 2


class StoreError(RuntimeError):
    """The file exists but cannot be used as a results store (not SQLite, newer schema,
    damaged...); it is left untouched. The CLI reports it as a bad ``--out`` (exit status 2)."""


class StoreUnavailable(RuntimeError):
    """The disk failed under the store (full, or an I/O error) while it was in use. Committed
    runs are kept; the CLI reports it in one line with exit status 3."""


class StoreWarning(UserWarning):
    """A damaged row was left out (its JSON does not parse); the rest of the store is used.
    The CLI prints it as one ``warning:`` line."""


RUN_COLUMNS = (
    "key",
    "config",
    "status",
    "metrics",
    "curves",
    "error",
    "started",
    "finished",
    "owner",
    "heartbeat",
)

TABLES: dict[str, tuple[str, ...]] = {
    "meta": ("name", "value"),
    "runs": RUN_COLUMNS,
    "experiments": ("name", "kind", "specs", "updated"),
    "decay_monitor": ("run", *DECAY_COLUMNS),
}

STATEMENTS = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (
    key       TEXT PRIMARY KEY,
    config    TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'diverged')),
    metrics   TEXT,
    curves    TEXT,
    error     TEXT,
    started   REAL,
    finished  REAL,
    owner     TEXT,
    heartbeat REAL
)""",
    "CREATE INDEX IF NOT EXISTS runs_status ON runs (status)",
    # specs: the plan as JSON, a list of specs (version 1) or {"fixed", "blocks"} (version 2)
    "CREATE TABLE IF NOT EXISTS experiments (name TEXT PRIMARY KEY, kind TEXT NOT NULL,"
    " specs TEXT NOT NULL, updated REAL NOT NULL)",
    # NaN (no value here) is stored as NULL
    "CREATE TABLE IF NOT EXISTS decay_monitor (run TEXT NOT NULL, "
    + ", ".join(f"{name} {DECAY_SQL_TYPES[name]}" for name in DECAY_COLUMNS)
    + ", PRIMARY KEY (run, step, tensor))",
)


def check_contents(db: sqlite3.Connection, path: Path) -> int | None:
    """The schema version of the store in ``db``, None for an empty database (a new store);
    StoreError naming what is wrong otherwise. Only reads."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return None
    if "meta" not in tables or "runs" not in tables:
        raise StoreError(f"{path} is an SQLite database but not a results store")
    for table in sorted(tables & set(TABLES)):
        columns = tuple(row[1] for row in db.execute(f"PRAGMA table_info({table})"))
        if columns != TABLES[table]:
            raise StoreError(
                f"{path} is not a results store: its table {table!r} has columns "
                f"({', '.join(columns)}), not a store's ({', '.join(TABLES[table])})"
            )
    row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    if row is None:
        raise StoreError(f"{path} is an SQLite database but not a results store")
    text = str(row[0])
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise StoreError(
            f"{path} has schema_version {text!r}, not a version of a results store; "
            "refusing to use it (the file is damaged or was written by another program)"
        )
    if int(text) > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {text}, newer than this package's "
            f"{SCHEMA_VERSION}; upgrade decoupled to read it"
        )
    return int(text)
