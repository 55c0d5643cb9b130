"""The SQLite results store: round trips, keys, claims across processes, refusing bad files."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import queue
import random
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from decoupled.diagnostics.table import DecayTable
from decoupled.lab.store import (
    SCHEMA_VERSION,
    ResultStore,
    RunRecord,
    StoreError,
    config_key,
    this_owner,
)
from tests.helpers import small_decay_table

CONFIG = {
    "task": "mnist1d",
    "optimizer": "AdamW",
    "lr": 1e-3,
    "weight_decay": 0.05,
    "seed": 0,
    "betas": [0.9, 0.999],
    "version": "0.1.0",
}


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "out" / "results.db") as opened:
        yield opened


def _set_owner(path, key, owner, heartbeat=None):
    """Rewrite a row's owner as another process would have left it (raw SQL, autocommit)."""
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE runs SET owner = ?, heartbeat = COALESCE(?, heartbeat) WHERE key = ?",
            (owner, heartbeat, key),
        )
    db.close()


# ---------------------------------------------------------------- config_key


def test_config_key_is_16_hex_digits_of_sha256_over_canonical_json():
    # Pinned: changing the canonical form would orphan every existing results.db.
    expected = hashlib.sha256(b'{"a":1,"b":[0.1,"x"]}').hexdigest()[:16]
    assert config_key({"b": [0.1, "x"], "a": 1}) == expected
    assert len(config_key(CONFIG)) == 16


def test_config_key_ignores_key_order_and_container_spelling():
    reordered = dict(reversed(list(CONFIG.items())))
    assert config_key(reordered) == config_key(CONFIG)
    assert config_key({**CONFIG, "betas": (0.9, 0.999)}) == config_key(CONFIG)
    assert config_key({**CONFIG, "lr": np.float64(1e-3)}) == config_key(CONFIG)
    assert config_key({**CONFIG, "lr": np.float32(0.5)}) == config_key({**CONFIG, "lr": 0.5})
    # Keys follow dict equality: {"epochs": 3} == {"epochs": 3.0}.
    assert config_key({"epochs": 3}) == config_key({"epochs": 3.0})
    nested = {"model": {"width": 64, "depth": 2}, "x": 1}
    assert config_key(nested) == config_key({"x": 1, "model": {"depth": 2, "width": 64}})


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 1.0000000000000002e-3},  # one ulp away
        {"weight_decay": 0.0},
        {"seed": 1},
        {"betas": [0.999, 0.9]},
        {"version": "0.1.1"},
        {"task": "MNIST1D"},
        {"extra": None},
        {"seed": True},
        {"lr": -1e-3},
    ],
    ids=repr,
)
def test_config_key_changes_with_any_value(change):
    assert config_key({**CONFIG, **change}) != config_key(CONFIG)


def test_config_key_is_the_same_in_another_process():
    # A fresh interpreter has another hash seed: nothing may depend on dict/set hashing.
    script = (
        "import json, sys; from decoupled.lab.store import config_key; "
        "print(config_key(json.loads(sys.argv[1])))"
    )
    import json

    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(CONFIG)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert result.stdout.strip() == config_key(CONFIG)


# ---------------------------------------------------------------- round trip and life cycle


def test_round_trip(tmp_path):
    path = tmp_path / "new" / "deeper" / "results.db"
    key = config_key(CONFIG)
    with ResultStore(path) as store:
        assert path.parent.is_dir()
        assert store.get(key) is None
        assert store.claim(key, CONFIG)
        running = store.get(key)
        assert running.status == "running" and running.owner == this_owner()
        assert running.duration is None
        metrics = {"test_error": 0.1234, "final_loss": math.nan, "steps": np.int64(100)}
        curves = {"step": [0, 10, 20], "train_loss": np.array([2.3, 1.1, 0.7])}
        store.finish(key, "done", metrics, curves)

    with ResultStore(path) as reopened:  # everything survives closing and reopening
        record = reopened.get(key)
    assert isinstance(record, RunRecord)
    assert record.key == key and record.config == CONFIG and record.status == "done"
    assert record.metrics["test_error"] == 0.1234 and math.isnan(record.metrics["final_loss"])
    assert record.metrics["steps"] == 100
    assert record.curves == {"step": [0, 10, 20], "train_loss": [2.3, 1.1, 0.7]}
    assert record.error is None and record.duration >= 0.0
    with pytest.raises(AttributeError):
        record.status = "failed"  # frozen


def test_records_filter_on_config_fields_and_status(store):
    configs = [
        {"task": task, "optimizer": name, "seed": seed, "lr": 1e-3}
        for task in ("mnist1d", "cifar")
        for name in ("Adam", "AdamW")
        for seed in (0, 1)
    ]
    for config in configs:
        store.claim(config_key(config), config)
    done = [config for config in configs if config["seed"] == 0]
    for config in done:
        store.finish(config_key(config), "done", {"test_error": 0.1})

    assert len(store.records()) == 8
    mnist = store.records({"task": "mnist1d"})
    assert {r.key for r in mnist} == {config_key(c) for c in configs if c["task"] == "mnist1d"}
    assert len(store.records({"task": "mnist1d", "optimizer": "AdamW"})) == 2
    assert len(store.records({"task": "mnist1d"}, status="done")) == 2
    assert len(store.records({"seed": 0.0})) == 4  # 0 == 0.0, as in Python
    assert store.records({"task": "nope"}) == []
    assert store.records({"missing_field": None}) == []
    assert store.done_keys() == {config_key(c) for c in done}


def test_failed_run_keeps_its_error_and_can_be_claimed_again(store):
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    error_text = 'Traceback (most recent call last):\n  File "x.py"\nRuntimeError: boom ✗'
    store.fail(key, error_text)
    failed = store.get(key)
    assert failed.status == "failed" and failed.error == error_text
    assert failed.finished is not None
    assert key not in store.done_keys()
    assert store.claim(key, CONFIG)
    assert store.get(key).status == "running"


def test_a_late_failure_does_not_take_a_run_another_process_claimed_since(store, tmp_path):
    """A process presumed dead whose run was claimed again must not mark it failed: a third
    process could then start it while the second still runs it."""
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    _set_owner(store.path, key, "other-host:1", heartbeat=time.time())
    assert not store.fail(key, "late error")
    assert store.get(key).status == "running" and store.get(key).owner == "other-host:1"
    assert not store.heartbeat(key)  # and this process's heartbeat does not touch it


@pytest.mark.parametrize("status", ["done", "diverged"])
def test_finished_run_cannot_be_claimed(store, status):
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    assert store.finish(key, status, {"test_error": 0.9})
    assert not store.claim(key, CONFIG)
    # A late writer (e.g. a process wrongly presumed dead) cannot overwrite the result.
    assert not store.finish(key, "done", {"test_error": 0.1})
    assert not store.fail(key, "late error")
    assert not store.mark_interrupted(key)
    record = store.get(key)
    assert record.status == status and record.metrics == {"test_error": 0.9}
    assert record.error is None
    assert key in store.done_keys()


def test_mark_interrupted_makes_the_run_redoable(store):
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    assert store.mark_interrupted(key)
    record = store.get(key)
    assert record.status == "failed" and record.error == "interrupted"
    assert not store.mark_interrupted(key)  # only running rows
    assert store.claim(key, CONFIG)
    _set_owner(store.path, key, "elsewhere.invalid:1")
    assert not store.mark_interrupted(key)  # only this process's own rows
    assert store.get(key).status == "running"


def test_bad_finish_arguments(store):
    with pytest.raises(KeyError, match="claim"):
        store.finish("0123456789abcdef", "done", {})
    key = config_key(CONFIG)
    store.claim(key, CONFIG)
    with pytest.raises(ValueError, match="Invalid status value: 'running'"):
        store.finish(key, "running", {})
    assert store.get(key).status == "running"


# ---------------------------------------------------------------- taking over stale runs


def test_run_of_live_process_is_not_taken_over(store):
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    with ResultStore(store.path) as other:  # another store object in the same live process
        assert not other.claim(key, CONFIG)
    assert store.heartbeat(key)


def test_run_of_dead_process_is_taken_over(store):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    dead_pid = int(finished.stdout)  # run() waited for it, so the pid is gone (not a zombie)
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    _set_owner(store.path, key, f"{socket.gethostname()}:{dead_pid}")
    assert not store.heartbeat(key)  # this process no longer owns it
    assert store.claim(key, CONFIG)
    assert store.get(key).owner == this_owner()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc start times")
def test_a_run_whose_pid_now_belongs_to_another_process_is_taken_over(store):
    """A restarted container's sweep may get its dead predecessor's pid (pid 1 again): the
    owner's start time tells the two apart. Here the live pid is this process's own."""
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    host, _, process = this_owner().rpartition(":")
    pid, _, start = process.partition("/")
    _set_owner(store.path, key, f"{host}:{pid}/{int(start) - 1}")  # same pid, older process
    assert ResultStore(store.path).claim(key, CONFIG)
    assert store.get(key).owner == this_owner()
    # the same pid with its own start time is alive: not taken over
    assert not ResultStore(store.path).claim(key, CONFIG)


def test_run_on_another_host_is_taken_over_only_when_silent(store):
    key = config_key(CONFIG)
    assert store.claim(key, CONFIG)
    _set_owner(store.path, key, "elsewhere.invalid:1", heartbeat=time.time() - 5)
    assert not store.claim(key, CONFIG)
    _set_owner(store.path, key, "elsewhere.invalid:1", heartbeat=time.time() - 601)
    assert store.claim(key, CONFIG)


# ---------------------------------------------------------------- several writer processes


def _claim_and_finish(path, keys, barrier, results):
    """Worker: claim every key it can and finish it; report the keys it ran."""
    try:
        barrier.wait(timeout=60)  # open the (new) database at the same moment
        store = ResultStore(path)
        ran = []
        for key in keys:
            if store.claim(key, {"key": key}):
                time.sleep(0.002)  # "train": lets the other process take the lock meanwhile
                store.heartbeat(key)
                store.finish(key, "done", {"pid": os.getpid()}, {"loss": [1.0, 0.5]})
                ran.append(key)
        store.close()
        results.put(("ok", os.getpid(), ran))
    except BaseException:
        results.put(("error", os.getpid(), traceback.format_exc()))


def test_concurrent_writer_processes_run_every_key_exactly_once(tmp_path):
    path = tmp_path / "results.db"
    keys = [f"run-{index:03d}" for index in range(60)]
    shuffled = keys.copy()
    random.Random(0).shuffle(shuffled)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(target=_claim_and_finish, args=(str(path), order, barrier, results))
        for order in (keys, shuffled)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [results.get(timeout=120) for _ in workers]
    except queue.Empty:
        pytest.fail("a writer process did not report within 120 s")
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=10)
    errors = [text for status, _, text in reports if status == "error"]
    assert not errors, "\n".join(errors)
    ran = {pid: set(keys_run) for _, pid, keys_run in reports}
    first, second = ran.values()
    assert not first & second, "a run was done twice"
    assert first | second == set(keys)
    with ResultStore(path) as store:
        records = store.records()
        assert len(records) == len(keys)
        assert store.done_keys() == set(keys)
    for record in records:
        assert record.key in ran[record.metrics["pid"]]


# ---------------------------------------------------------------- files that must be refused


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_non_sqlite_file_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "results.db"
    path.write_bytes(b"not a database, just some notes\n" * 100)
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match=str(path)):
        ResultStore(path)
    assert _snapshot(tmp_path) == before  # no byte changed, no -wal/-shm created


def test_foreign_sqlite_database_is_refused_and_left_unchanged(tmp_path):
    path = tmp_path / "results.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    db.close()
    before = _snapshot(tmp_path)
    with pytest.raises(StoreError, match="not a results store"):
        ResultStore(path)
    assert _snapshot(tmp_path) == before


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "results.db"
    with ResultStore(path) as store:
        store.claim("k", {"a": 1})
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    db.close()
    with pytest.raises(StoreError, match=rf"{path}.*newer"):
        ResultStore(path)


def test_folder_under_a_regular_file_raises_oserror_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    path = blocker / "sub" / "results.db"
    with pytest.raises(OSError, match="a-file"):
        ResultStore(path)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_unwritable_folder_raises_permission_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="locked"):
            ResultStore(folder / "results.db")
        with pytest.raises(PermissionError, match="locked"):
            ResultStore(folder / "sub" / "results.db")
    finally:
        folder.chmod(0o700)


def test_opening_the_store_again_keeps_this_process_locks(tmp_path):
    """A second ResultStore on the same file in a process with a live connection must not
    open the file itself: closing that descriptor dropped the process's POSIX locks, another
    process's closing connection then checkpointed and deleted the WAL, and every later write
    of the first connection went into a deleted file (a finished run read back as running)."""
    db = tmp_path / "results.db"
    first = ResultStore(db)
    key = config_key(CONFIG)
    assert first.claim(key, CONFIG)
    ResultStore(db)  # e.g. the CLI's check of --out while the executor's store is open
    peek = (
        f"import sqlite3; c = sqlite3.connect({str(db)!r}); "
        "print(c.execute('SELECT status FROM runs').fetchall()[0][0]); c.close()"
    )
    subprocess.run([sys.executable, "-c", peek], check=True, capture_output=True)
    assert (tmp_path / "results.db-wal").exists()  # still ours: not checkpointed away
    assert first.finish(key, "done", {"test_error": 0.1})
    seen = subprocess.run([sys.executable, "-c", peek], check=True, capture_output=True, text=True)
    assert seen.stdout.strip() == "done"


class UnwritableTable(DecayTable):
    def to_rows(self):
        raise OSError("the disk went away while the monitor rows were written")


@pytest.mark.parametrize("outcome", ["finish", "fail"])
def test_a_result_and_its_decay_monitor_rows_are_written_together(tmp_path, outcome):
    """Both in one transaction: a run is never recorded without the monitor rows it had (a
    Ctrl-C or a crash between two writes left a done run with none)."""
    store = ResultStore(tmp_path / "results.db")
    store.claim("k", {"lr": 1e-3})
    write = {
        "finish": lambda table: store.finish("k", "done", {"metric": 0.5}, {}, table),
        "fail": lambda table: store.fail("k", "Traceback ...", table),
    }[outcome]
    with pytest.raises(OSError, match="disk went away"):
        write(UnwritableTable([]))
    assert store.get("k").status == "running" and store.decay_table_runs() == []

    assert write(small_decay_table([1, 2]))
    assert store.get("k").status == ("done" if outcome == "finish" else "failed")
    assert store.load_decay_table("k") == small_decay_table([1, 2])
