"""The results store's rows: run keys (:func:`config_key`), JSON in and out, the record type,
and who owns a running row (:func:`this_owner`)."""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any


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


def owner_is_gone(owner: str | None, heartbeat: float | None, now: float, stale_after: float):
    """Whether the process that wrote ``owner`` (``hostname:pid/start``) no longer runs: on
    this host its pid is gone or reused; on another host it has been silent (no heartbeat)
    for more than ``stale_after`` seconds, since its processes cannot be seen from here."""
    host, _, process = (owner or "").rpartition(":")
    pid, _, start = process.partition("/")
    if host == socket.gethostname() and pid.isdigit():
        if not _pid_alive(int(pid)):
            return True
        return bool(start) and _start_time(int(pid)) not in (None, start)  # pid reused
    return heartbeat is None or now - heartbeat > stale_after
