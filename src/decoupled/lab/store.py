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
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed", "diverged")
FINISHED = ("done", "diverged")  # never redone; a failed run is
BUSY_TIMEOUT_S = 30.0
STALE_AFTER_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
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
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
"""


class StoreError(RuntimeError):
    """The file exists but cannot be used as a results store (not SQLite, newer schema...)."""


def _canonical(value: Any) -> Any:
    """The value with numpy scalars/arrays, tuples and integral floats put in one form.

    Integral floats become ints so that the key follows Python equality: ``{"epochs": 3}``
    and ``{"epochs": 3.0}`` compare equal as dicts and get the same key.
    """
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar/array
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(name): _canonical(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def config_key(config: Mapping[str, Any]) -> str:
    """The run's key: the first 16 hex digits of sha256 over the config's canonical JSON.

    Canonical JSON: keys sorted, no whitespace, non-ASCII kept as UTF-8, floats written by
    ``repr`` (the shortest string that round-trips, so the same float always gives the same
    text, on every platform). Key order never matters; any changed value changes the key.
    The caller puts everything that affects the result in ``config``, the package version
    included, so an upgrade reruns rather than mixes results.
    """
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256(text.encode("utf-8")).hexdigest()[:16]


def _json_default(value: Any) -> Any:
    """What ``json.dumps`` cannot write by itself: numpy scalars and arrays, paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def _to_json(value: Any) -> str | None:
    # Stored as given (not canonicalized), so 1.0 reads back as 1.0. NaN/inf are allowed:
    # a diverged run's loss is NaN and must still be stored.
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``, with its JSON fields parsed. Times are Unix seconds."""

    key: str
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any] | None
    curves: dict[str, Any] | None
    error: str | None
    started: float | None
    finished: float | None
    owner: str | None
    heartbeat: float | None

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, or None while running."""
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


def this_owner() -> str:
    """``hostname:pid/start`` of the current process, the owner written on the rows it claims.

    ``start`` is the process's start time where the OS tells it (Linux: ``/proc``), so that
    a pid reused by another process (a restarted container's sweep is pid 1 again) is not
    taken for the owner still running; elsewhere it is ``hostname:pid``."""
    start = _start_time(os.getpid())
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/{start}" if start else "")


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) ": field 3 on
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 only checks)."""
    if os.name == "nt":  # os.kill on Windows terminates the process: never probe there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def _check_file(path: Path) -> None:
    """Refuse a file that is not readable and writable. Whether it is an SQLite database is
    asked of SQLite itself (``_check_schema``), never by opening the file here: closing any
    descriptor of a file drops every POSIX lock this process holds on it, including those of
    its open SQLite connections, and another process could then checkpoint and delete the
    WAL under them (https://sqlite.org/howtocorrupt.html, section 2.2)."""
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


class ResultStore:
    """The SQLite results store at ``path`` (usually ``<out>/results.db``).

    Args:
        path: the database file; its folder is created if missing.
        stale_after: seconds without a heartbeat after which a ``running`` row owned by a
            process on *another* host is considered abandoned (a process on this host is
            checked directly by pid).
        timeout: seconds a writer waits for the lock before giving up.

    Raises:
        OSError (PermissionError, NotADirectoryError...): the folder cannot be created or
            written; the message names it.
        StoreError: the file is not an SQLite database, belongs to something else, or was
            written by a newer version of this package. The file is left untouched.

    One connection per object and per process: a store object inherited through ``fork``
    opens its own connection on first use in the child.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stale_after: float = STALE_AFTER_S,
        timeout: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.stale_after = float(stale_after)
        self.timeout = float(timeout)
        self._connection: sqlite3.Connection | None = None
        self._pid = -1
        _prepare_folder(self.path)
        _check_file(self.path)
        self._initialize()

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

    def _initialize(self) -> None:
        try:
            self._check_schema()  # before any write: a foreign or newer file stays untouched
            self._retry_while_busy("PRAGMA journal_mode = WAL")
            with self._write() as db:
                for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except BaseException:
            self.close()
            raise

    def _check_schema(self) -> None:
        try:
            tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
            version_row = None
            if "meta" in tables:
                version_row = self._db.execute(
                    "SELECT value FROM meta WHERE name = 'schema_version'"
                ).fetchone()
        except sqlite3.DatabaseError as error:  # SQLite reads the header; nothing is written
            raise StoreError(
                f"{self.path} is not an SQLite database ({error}); refusing to use it as a "
                "results store"
            ) from error
        if tables and version_row is None:
            raise StoreError(f"{self.path} is an SQLite database but not a results store")
        if version_row is not None and int(version_row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version_row[0]}, newer than this package's "
                f"{SCHEMA_VERSION}; upgrade decoupled to read it"
            )

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
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                db.execute("ROLLBACK")
            raise

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
        host, _, process = (owner or "").rpartition(":")
        pid, _, start = process.partition("/")
        if host == socket.gethostname() and pid.isdigit():
            if not _pid_alive(int(pid)):
                return True
            return bool(start) and _start_time(int(pid)) not in (None, start)  # pid reused
        # Another host: we cannot see its processes, only how long it has been silent.
        return heartbeat is None or now - heartbeat > self.stale_after

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

    def _end(self, key: str, *, own_only: bool = False, **fields: Any) -> bool:
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
    ) -> bool:
        """Record the outcome of a claimed run: ``status`` is ``done`` or ``diverged``.

        Returns False, changing nothing, if the run was already finished (by another
        process); raises KeyError if it was never claimed.
        """
        if status not in FINISHED:
            raise ValueError(f"Invalid status value: {status!r} (expected one of {FINISHED})")
        return self._end(
            key, status=status, metrics=_to_json(metrics), curves=_to_json(curves), error=None
        )

    def fail(self, key: str, error_text: str) -> bool:
        """Record that a claimed run raised; ``error_text`` (a traceback) is kept.

        Like :meth:`finish`, returns False and changes nothing if the run is already finished,
        and also if another process has claimed it since.
        """
        return self._end(key, own_only=True, status="failed", error=str(error_text))

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

    @staticmethod
    def _record(row: tuple[Any, ...]) -> RunRecord:
        key, config, status, metrics, curves, error, started, finished, owner, heartbeat = row
        return RunRecord(
            key=key,
            config=_from_json(config),
            status=status,
            metrics=_from_json(metrics),
            curves=_from_json(curves),
            error=error,
            started=started,
            finished=finished,
            owner=owner,
            heartbeat=heartbeat,
        )

    def get(self, key: str) -> RunRecord | None:
        """The run stored under ``key``, or None."""
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM runs WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._record(row)

    def records(
        self, where: Mapping[str, Any] | None = None, *, status: str | None = None
    ) -> list[RunRecord]:
        """All runs (oldest first) whose top-level config fields equal those in ``where``.

        ``records({"task": "mnist1d"}, status="done")`` — values are compared with ``==``
        after the same normalization as :func:`config_key` (so 3 matches 3.0).
        """
        query = f"SELECT {self._COLUMNS} FROM runs"
        parameters: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            parameters = (status,)
        rows = self._db.execute(query + " ORDER BY started, key", parameters).fetchall()
        wanted = _canonical(dict(where or {}))

        def matches(record: RunRecord) -> bool:
            return all(
                name in record.config and _canonical(record.config[name]) == value
                for name, value in wanted.items()
            )

        return [record for record in map(self._record, rows) if matches(record)]

    def done_keys(self) -> set[str]:
        """Keys of runs that are finished for good (``done`` or ``diverged``): skip these."""
        rows = self._db.execute("SELECT key FROM runs WHERE status IN (?, ?)", FINISHED).fetchall()
        return {row[0] for row in rows}
