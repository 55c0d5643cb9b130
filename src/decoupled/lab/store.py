"""The results store: one SQLite file, ``<out>/results.db``, shared by every process of a sweep.

Each run is one row keyed by :func:`config_key`, a hash of its complete configuration, so a
sweep that is interrupted and started again skips what is done and redoes only the rest
(AlgoPerf keeps every trial's outputs the same way, so that reports re-read them without
retraining).

Several worker *processes* may claim and finish runs at once. That is safe because:

* the database is in WAL mode (https://sqlite.org/wal.html): readers never block the one
  writer, and a crash mid-write leaves the last committed state intact;
* every read-modify-write is one ``BEGIN IMMEDIATE`` transaction, which takes the write lock
  up front; a deferred transaction that reads first and then upgrades to a writer can fail at
  once with "database is locked" without ever calling the busy handler
  (https://sqlite.org/lang_transaction.html);
* the busy timeout makes a writer wait for the lock instead of failing.

Life of a row: ``claim`` inserts it as ``running``; the runner calls ``heartbeat`` now and
then and ends with ``finish`` (``done`` or ``diverged``) or ``fail`` (keeps the traceback).
A ``running`` row whose owner is gone, or a ``failed`` row, may be claimed again.

All SQL on ``results.db`` is here: the ``runs`` rows, each experiment's plan
(``experiments``; ``lab/experiments.py`` encodes it) and the diagnostics' ``decay_monitor``
rows. The tables and the checks that a file is a store are in ``store_schema.py``; keys, JSON
and owners in ``store_records.py``. The disk failing under the store (full, or an I/O error)
raises :class:`StoreUnavailable`; a file that is not a usable store raises
:class:`StoreError` before anything is written into it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from decoupled.diagnostics.table import COLUMNS as DECAY_COLUMNS
from decoupled.diagnostics.table import DecayTable
from decoupled.lab.store_records import (
    RunRecord,
    _canonical,
    _from_json,
    _to_json,
    config_key,
    owner_is_gone,
    this_owner,
)
from decoupled.lab.store_schema import (
    SCHEMA_VERSION,
    STATEMENTS,
    StoreError,
    StoreUnavailable,
    StoreWarning,
    check_contents,
)

__all__ = [
    "FINISHED",
    "SCHEMA_VERSION",
    "STATUSES",
    "ResultStore",
    "RunRecord",
    "StoreError",
    "StoreUnavailable",
    "StoreWarning",
    "config_key",
    "this_owner",
]

STATUSES = ("running", "done", "failed", "diverged")
FINISHED = ("done", "diverged")  # never redone; a failed run is
BUSY_TIMEOUT_S = 30.0
STALE_AFTER_S = 600.0


def _check_file(path: Path, create: bool) -> None:
    """Refuse what is not a readable, writable regular file (a device such as ``/dev/zero``
    behind a symlink, a FIFO), and, unless ``create``, a missing or 0-byte file (nothing
    stored). Whether it is an SQLite database is asked of SQLite itself
    (``store_schema.check_contents``), never by opening the file here: closing any descriptor
    of a file drops every POSIX lock this process holds on it, including those of its open
    SQLite connections, and another process could then checkpoint and delete the WAL under
    them (https://sqlite.org/howtocorrupt.html, section 2.2)."""
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, "cannot open the results store (it is a folder)", str(path)
        )
    if path.exists() and not path.is_file():
        raise StoreError(f"{path} is not a regular file; refusing to use it as a results store")
    if not create and not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no results store", str(path))
    if not create and path.stat().st_size == 0:
        raise StoreError(f"{path} is empty (0 bytes): no runs are stored in it")
    if path.is_file() and not os.access(path, os.R_OK | os.W_OK):
        raise PermissionError(errno.EACCES, "results store is not readable and writable", str(path))


def _prepare_folder(path: Path) -> None:
    """Create the store's folder; raise an OSError naming it when it cannot be written."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise type(error)(
            error.errno, f"cannot create the results folder ({error.strerror})", str(folder)
        ) from error
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "results folder is not a directory", str(folder))
    # SQLite also writes results.db-wal and results.db-shm beside the database.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "results folder is not writable", str(folder))


def _remove_empty(path: Path) -> None:
    """Remove a store file that this process created and could not write anything into (a
    full disk), so that no 0-byte ``results.db`` is left behind; its -wal/-shm go with it."""
    try:
        if path.stat().st_size != 0:
            return
        for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            leftover.unlink(missing_ok=True)
    except OSError:
        pass


class ResultStore:
    """The SQLite results store at ``path`` (usually ``<out>/results.db``).

    Args:
        path: the database file; its folder is created if missing.
        stale_after: seconds without a heartbeat after which a ``running`` row owned by a
            process on *another* host is considered abandoned (a process on this host is
            checked directly by pid).
        timeout: seconds a writer waits for the lock before giving up.
        create: create the store if the file is missing or empty (0 bytes); with False such a
            file is refused (FileNotFoundError, StoreError) and nothing is written.

    Raises:
        OSError (PermissionError, NotADirectoryError...): the folder cannot be created or
            written; the message names it.
        StoreError: the file is not an SQLite database, belongs to something else (tables
            of ours with other columns), has a schema version that is not a number or is
            newer than this package's. The file is left untouched, byte for byte.
        StoreUnavailable: the disk is full, or SQLite reports an I/O error (e.g. the -wal
            file was deleted while a process was writing).

    Every finished run is checkpointed from the write-ahead log into the database file
    (``PRAGMA wal_checkpoint(PASSIVE)``, https://sqlite.org/pragma.html#pragma_wal_checkpoint),
    so that losing ``results.db-wal`` loses at most the runs in progress.

    One connection per object and per process: a store object inherited through ``fork``
    opens its own connection on first use in the child.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stale_after: float = STALE_AFTER_S,
        timeout: float = BUSY_TIMEOUT_S,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.stale_after = float(stale_after)
        self.timeout = float(timeout)
        self._connection: sqlite3.Connection | None = None
        self._pid = -1
        self._warned: set[str] = set()
        if create:
            _prepare_folder(self.path)
        _check_file(self.path, create)
        existed = self.path.exists()
        try:
            self._initialize()
        except BaseException:
            if not existed:
                _remove_empty(self.path)
            raise

    # ---------------------------------------------------------------- connection & schema

    @property
    def _db(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            self._connection = self._connect()
            self._pid = os.getpid()
        return self._connection

    def _connect(self) -> sqlite3.Connection:
        try:
            # timeout= sets SQLite's busy_timeout. isolation_level=None: no implicit
            # transactions, we write BEGIN IMMEDIATE ourselves.
            return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.OperationalError as error:
            raise OSError(
                errno.EIO, f"cannot open the results store ({error})", str(self.path)
            ) from error

    @contextmanager
    def _sql_errors(self) -> Iterator[None]:
        """SQLite's failures of the disk or the file, as one line saying what happened and
        what is kept (``StoreUnavailable``, ``StoreError``)."""
        try:
            yield
        except sqlite3.OperationalError as error:
            text = str(error)
            if "full" in text:
                raise StoreUnavailable(
                    f"the disk holding {self.path} is full ({text}); the runs finished so far "
                    "are kept in it: free space and run the command again to resume"
                ) from error
            if "disk I/O error" in text:
                raise StoreUnavailable(
                    f"{self.path}: SQLite reports a disk I/O error: the disk failed, or "
                    f"{self.path.name}-wal was deleted or damaged while a process was writing; "
                    "the runs checkpointed into the file are kept (each run is when it "
                    "finishes): once no command uses the store, run the command again to redo "
                    "the rest"
                ) from error
            raise
        except sqlite3.DatabaseError as error:
            if type(error) is not sqlite3.DatabaseError:  # e.g. IntegrityError: a caller's bug
                raise
            # "file is not a database", "database disk image is malformed"
            raise StoreError(
                f"{self.path} is not an SQLite database or is damaged ({error}); refusing to "
                "use it as a results store"
            ) from error

    def _initialize(self) -> None:
        try:
            with self._sql_errors():
                # before any write: a foreign, damaged or newer file stays untouched
                version = check_contents(self._db, self.path)
                self._retry_while_busy("PRAGMA journal_mode = WAL")
                with self._write() as db:
                    for statement in STATEMENTS:
                        db.execute(statement)
                    db.execute(
                        "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                    if version is not None and version < SCHEMA_VERSION:  # the upgrade
                        db.execute(
                            "UPDATE meta SET value = ? WHERE name = 'schema_version'",
                            (str(SCHEMA_VERSION),),
                        )
                if version != SCHEMA_VERSION:
                    self.checkpoint()
        except BaseException:
            self.close()
            raise

    def _retry_while_busy(self, statement: str) -> None:
        # Changing the journal mode needs a moment of exclusive access, and SQLite may answer
        # "locked" at once, without the busy handler, when several processes open a new file.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._db.execute(statement).fetchall()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the lock is taken at BEGIN; any failure rolls it back."""
        with self._sql_errors():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def checkpoint(self) -> None:
        """Copy the committed transactions from the WAL into the database file, as far as
        readers allow (PASSIVE: it never waits; what it cannot copy now goes next time)."""
        with self._sql_errors():
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _read(self, query: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._sql_errors():
            return self._db.execute(query, parameters).fetchall()

    def close(self) -> None:
        if self._connection is not None and self._pid == os.getpid():
            self._connection.close()
        self._connection = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    # ---------------------------------------------------------------- writing

    def _owner_is_gone(self, owner: str | None, heartbeat: float | None, now: float) -> bool:
        return owner_is_gone(owner, heartbeat, now, self.stale_after)

    def claim(self, key: str, config: Mapping[str, Any]) -> bool:
        """Mark ``key`` as running in this process; True if this process should run it.

        Succeeds for a new key, a ``failed`` run, or a ``running`` run whose owner is gone
        (same host: its pid no longer exists; other host: no heartbeat for ``stale_after``
        seconds). Returns False for ``done``/``diverged`` runs and runs alive elsewhere.
        """
        now = time.time()
        owner = this_owner()
        with self._write() as db:
            row = db.execute(
                "SELECT status, owner, heartbeat FROM runs WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO runs (key, config, status, started, owner, heartbeat)"
                    " VALUES (?, ?, 'running', ?, ?, ?)",
                    (key, _to_json(config), now, owner, now),
                )
                return True
            status, old_owner, heartbeat = row
            if status in FINISHED:
                return False
            if status == "running" and not self._owner_is_gone(old_owner, heartbeat, now):
                return False
            db.execute(
                "UPDATE runs SET config = ?, status = 'running', metrics = NULL, curves = NULL,"
                " error = NULL, started = ?, finished = NULL, owner = ?, heartbeat = ?"
                " WHERE key = ?",
                (_to_json(config), now, owner, now, key),
            )
            return True

    def heartbeat(self, key: str) -> bool:
        """Say this process is still running ``key``; False if it no longer owns the run."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE runs SET heartbeat = ? WHERE key = ? AND owner = ? AND status = 'running'",
                (time.time(), key, this_owner()),
            )
        return cursor.rowcount == 1

    def heartbeat_many(self, keys: Collection[str]) -> int:
        """:meth:`heartbeat` for many runs in one transaction (a Ray driver holds the claims
        of all its tasks in flight); returns how many this process still owns."""
        now, owner = time.time(), this_owner()
        with self._write() as db:
            cursor = db.executemany(
                "UPDATE runs SET heartbeat = ? WHERE key = ? AND owner = ? AND status = 'running'",
                [(now, key, owner) for key in keys],
            )
        return cursor.rowcount

    def _end(
        self,
        key: str,
        *,
        own_only: bool = False,
        decay_table: DecayTable | None = None,
        **fields: Any,
    ) -> bool:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        # A finished result is never overwritten, e.g. by a late process that was wrongly
        # presumed dead and whose run was redone meanwhile. With own_only, neither is a run
        # another process has claimed since (its failure would let a third one start it).
        condition = "status IN ('running', 'failed')"
        if own_only:
            condition = "(status = 'failed' OR (status = 'running' AND owner = ?))"
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE runs SET {assignments}, finished = ? WHERE key = ? AND {condition}",
                (*fields.values(), time.time(), key, *([this_owner()] if own_only else [])),
            )
            if cursor.rowcount == 1:
                if decay_table is not None:  # in the same transaction: both or neither
                    self._replace_decay_rows(db, key, decay_table)
                return True
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is None:
                raise KeyError(f"no run {key!r} in {self.path}; claim() it first")
            return False

    def finish(
        self,
        key: str,
        status: str,
        metrics: Mapping[str, Any] | None = None,
        curves: Mapping[str, Any] | None = None,
        decay_table: DecayTable | None = None,
    ) -> bool:
        """Record the outcome of a claimed run: ``status`` is ``done`` or ``diverged``; its
        ``decay_table`` (the decay monitor's rows), if any, in the same transaction, so that a
        run is never recorded without the rows it had.

        Returns False, changing nothing, if the run was already finished (by another
        process); raises KeyError if it was never claimed.
        """
        if status not in FINISHED:
            raise ValueError(f"Invalid status value: {status!r} (expected one of {FINISHED})")
        recorded = self._end(
            key,
            decay_table=decay_table,
            status=status,
            metrics=_to_json(metrics),
            curves=_to_json(curves),
            error=None,
        )
        self.checkpoint()
        return recorded

    def fail(self, key: str, error_text: str, decay_table: DecayTable | None = None) -> bool:
        """Record that a claimed run raised; ``error_text`` (a traceback) is kept, and the
        ``decay_table`` of its steps, if any, in the same transaction.

        Like :meth:`finish`, returns False and changes nothing if the run is already finished,
        and also if another process has claimed it since.
        """
        recorded = self._end(
            key, own_only=True, decay_table=decay_table, status="failed", error=str(error_text)
        )
        self.checkpoint()
        return recorded

    def fail_abandoned(self, key: str, error_text: str) -> bool:
        """Turn a ``running`` row whose owner is gone into ``failed`` (``error_text`` kept),
        e.g. the run of a pool worker that died; False, changing nothing, otherwise."""
        with self._write() as db:
            row = db.execute(
                "SELECT status, owner, heartbeat FROM runs WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[0] != "running":
                return False
            if not self._owner_is_gone(row[1], row[2], time.time()):
                return False
            db.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished = ? WHERE key = ?",
                (str(error_text), time.time(), key),
            )
        return True

    def mark_interrupted(self, key: str) -> bool:
        """Turn this process's ``running`` row into ``failed`` ("interrupted"): it will be redone.

        Returns False, changing nothing, when the row is not running or another process
        owns it (taking another's row would let a third process start it a second time).
        """
        with self._write() as db:
            cursor = db.execute(
                "UPDATE runs SET status = 'failed', error = 'interrupted', finished = ?"
                " WHERE key = ? AND status = 'running' AND owner = ?",
                (time.time(), key, this_owner()),
            )
        return cursor.rowcount == 1

    # ---------------------------------------------------------------- reading

    _COLUMNS = "key, config, status, metrics, curves, error, started, finished, owner, heartbeat"

    def _record(self, row: tuple[Any, ...]) -> RunRecord | None:
        """The row as a record; None, with a warning naming it (once), if its JSON is damaged."""
        key, config, status, metrics, curves, error, started, finished, owner, heartbeat = row
        try:
            config, metrics, curves = _from_json(config), _from_json(metrics), _from_json(curves)
            if not isinstance(config, dict):
                raise ValueError("config is not a JSON object")
            for name, value in (("metrics", metrics), ("curves", curves)):
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"{name} is not a JSON object")
        except (ValueError, TypeError) as damage:  # JSONDecodeError is a ValueError
            self._warn(
                f"run {key}: damaged row in {self.path} ({damage}); it is left out (delete "
                "the row, or the run, to have it redone)"
            )
            return None
        return RunRecord(
            key=key,
            config=config,
            status=status,
            metrics=metrics,
            curves=curves,
            error=error,
            started=started,
            finished=finished,
            owner=owner,
            heartbeat=heartbeat,
        )

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # once per store object, though read many times
            self._warned.add(message)
            warnings.warn(message, StoreWarning, stacklevel=3)

    def get(self, key: str) -> RunRecord | None:
        """The run stored under ``key``, or None (also for a damaged row, with a warning)."""
        rows = self._read(f"SELECT {self._COLUMNS} FROM runs WHERE key = ?", (key,))
        return self._record(rows[0]) if rows else None

    def records(
        self, where: Mapping[str, Any] | None = None, *, status: str | None = None
    ) -> list[RunRecord]:
        """All runs (oldest first) whose top-level config fields equal those in ``where``.

        ``records({"task": "mnist1d"}, status="done")`` — values are compared with ``==``
        after the same normalization as :func:`config_key` (so 3 matches 3.0). A row whose
        JSON does not parse is left out with a :class:`StoreWarning` naming its key.
        """
        query = f"SELECT {self._COLUMNS} FROM runs"
        parameters: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            parameters = (status,)
        rows = self._read(query + " ORDER BY started, key", parameters)
        wanted = _canonical(dict(where or {}))

        def matches(record: RunRecord) -> bool:
            return all(
                name in record.config and _canonical(record.config[name]) == value
                for name, value in wanted.items()
            )

        records = (self._record(row) for row in rows)
        return [record for record in records if record is not None and matches(record)]

    def done_keys(self) -> set[str]:
        """Keys of runs that are finished for good (``done`` or ``diverged``): skip these."""
        rows = self._read("SELECT key FROM runs WHERE status IN (?, ?)", FINISHED)
        return {row[0] for row in rows}

    # ---------------------------------------------------------------- experiments

    def save_experiment(self, name: str, kind: str, plan: Any) -> None:
        """Record (or replace) an experiment's plan (JSON: ``lab/experiments.py`` writes and
        reads it), in one transaction, and checkpoint it into the file."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO experiments (name, kind, specs, updated)"
                " VALUES (?, ?, ?, ?)",
                (name, kind, json.dumps(plan), time.time()),
            )
        self.checkpoint()

    def experiments(self) -> list[tuple[str, str, Any, float]]:
        """``(name, kind, plan, updated)`` of every experiment, most recently updated first; a
        plan whose JSON does not parse is left out with a :class:`StoreWarning`."""
        found = []
        rows = self._read(
            "SELECT name, kind, specs, updated FROM experiments ORDER BY updated DESC"
        )
        for name, kind, text, updated in rows:
            try:
                found.append((name, kind, json.loads(text), updated))
            except (ValueError, TypeError) as damage:
                self._warn(f"experiment {name}: damaged plan in {self.path} ({damage}); left out")
        return found

    # ---------------------------------------------------------------- decay monitor tables

    def save_decay_table(self, run_name: str, table: DecayTable) -> None:
        """Store a :class:`~decoupled.diagnostics.DecayTable` as run ``run_name`` of the
        ``decay_monitor`` table, replacing that run's earlier rows (one transaction)."""
        with self._write() as db:
            self._replace_decay_rows(db, run_name, table)
        self.checkpoint()

    @staticmethod
    def _replace_decay_rows(db: sqlite3.Connection, run_name: str, table: DecayTable) -> None:
        placeholders = ", ".join("?" * (len(DECAY_COLUMNS) + 1))
        db.execute("DELETE FROM decay_monitor WHERE run = ?", (run_name,))
        db.executemany(
            f"INSERT INTO decay_monitor (run, {', '.join(DECAY_COLUMNS)}) VALUES ({placeholders})",
            [(run_name, *row) for row in table.to_rows()],
        )

    def load_decay_table(self, run_name: str) -> DecayTable:
        """The monitor rows of run ``run_name``, by step (empty if there are none)."""
        rows = self._read(
            f"SELECT {', '.join(DECAY_COLUMNS)} FROM decay_monitor WHERE run = ?"
            " ORDER BY step, rowid",
            (run_name,),
        )
        return DecayTable.from_rows(rows)

    def decay_table_runs(self) -> list[str]:
        """The run names that have rows in the ``decay_monitor`` table, sorted."""
        return sorted(row[0] for row in self._read("SELECT DISTINCT run FROM decay_monitor"))
