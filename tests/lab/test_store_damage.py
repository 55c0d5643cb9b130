"""A damaged or foreign results.db is refused in one line and left as it is, byte for byte;
a damaged row is left out with a warning; a lost WAL loses at most the runs in progress."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from decoupled.cli import main
from decoupled.lab import executor
from decoupled.lab.experiments import load_experiments, save_experiment
from decoupled.lab.store import ResultStore, StoreError, StoreWarning

DONE = {"test_error": 0.25}


@pytest.fixture(autouse=True)
def _close_cli_stores():
    yield
    for path in list(executor._STORES):
        executor._STORES.pop(path).close()


def _store_with_a_run(path):
    with ResultStore(path) as store:
        store.claim("k1", {"task": "digits", "seed": 0})
        store.finish("k1", "done", DONE)


def _sql(path, *statements):
    connection = sqlite3.connect(path)
    with connection:
        for statement in statements:
            connection.execute(statement)
    connection.close()


def _version(text):
    def make(path):
        _store_with_a_run(path)
        _sql(path, f"UPDATE meta SET value = '{text}' WHERE name = 'schema_version'")

    return make


def _foreign_runs_beside_meta(path):
    _sql(
        path,
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO meta VALUES ('schema_version', '1')",
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, payload BLOB)",
        "INSERT INTO runs (payload) VALUES (x'00ff')",
    )


def _link_to_dev_zero(path):
    path.symlink_to("/dev/zero")


def _snapshot(folder):
    """Every file's bytes and mtime (a symlink as its target), and no -wal/-shm appears."""
    found = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            found[entry.name] = os.readlink(entry)
        else:
            found[entry.name] = (entry.read_bytes(), entry.stat().st_mtime_ns)
    return found


REFUSED = [
    pytest.param(_version("abc"), ["report", "sweep"], "schema_version 'abc'", id="version-abc"),
    pytest.param(_version("1.5"), ["report", "sweep"], "schema_version '1.5'", id="version-1.5"),
    pytest.param(_version(""), ["report", "sweep"], "schema_version ''", id="version-empty"),
    pytest.param(
        _foreign_runs_beside_meta,
        ["report", "sweep"],
        "its table 'runs' has columns (id, payload)",
        id="foreign-runs",
    ),
    pytest.param(lambda path: path.write_bytes(b""), ["report"], "is empty (0 bytes)", id="empty"),
    pytest.param(_link_to_dev_zero, ["report", "sweep"], "not a regular file", id="dev-zero"),
]


@pytest.mark.parametrize("make, commands, message", REFUSED)
def test_a_damaged_store_is_refused_in_one_line_and_left_untouched(
    tmp_path, capsys, make, commands, message
):
    db = tmp_path / "results.db"
    make(db)
    before = _snapshot(tmp_path)
    for command in commands:
        args = [command, "--out", str(tmp_path)]
        if command == "sweep":  # refused before training: --lr/--wd are never used
            args += ["--task", "digits", "--quick", "--optimizers", "adamw"]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"decoupled {command}: error: argument --out:"), lines
        assert message in lines[0] and str(db) in lines[0], lines
        assert _snapshot(tmp_path) == before, command
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ResultStore(db, create=False)  # the library refuses it too
    assert _snapshot(tmp_path) == before


def test_a_row_whose_json_is_damaged_is_left_out_with_a_warning_naming_it(tmp_path):
    db = tmp_path / "results.db"
    with ResultStore(db) as store:
        for key in ("good", "bad"):
            store.claim(key, {"key": key})
            store.finish(key, "done", DONE)
    _sql(db, "UPDATE runs SET metrics = '{not json' WHERE key = 'bad'")
    with ResultStore(db) as store, pytest.warns(StoreWarning, match="run bad: damaged row"):
        assert [record.key for record in store.records()] == ["good"]
        assert store.get("good").metrics == DONE


def test_report_skips_a_damaged_row_and_names_it_in_one_warning_line(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["--task", "digits", "--budget", "5", "--optimizers", "adamw", "--lr", "1e-3"]
    args += ["--wd-adamw", "0,1e-2", "--workers", "1", "--no-progress", "--out", str(out)]
    assert main(["sweep", *args]) == 0
    executor._STORES.pop(str(out / "results.db")).close()
    db = out / "results.db"
    with ResultStore(db) as store:
        damaged = store.records()[0].key
    _sql(db, f"UPDATE runs SET metrics = 'NaN]' WHERE key = '{damaged}'")
    capsys.readouterr()
    assert main(["report", "--out", str(out)]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("decoupled report: warning: run ") and damaged in lines[0], lines
    assert (out / "report.md").is_file()


def test_plans_are_stored_compactly_and_older_spec_lists_still_read(tmp_path):
    from decoupled.lab.plan import plan_sweep
    from decoupled.lab.tasks import get_task

    task = get_task("digits")
    lrs = {"adamw": [1e-4 * 1.01**i for i in range(100)]}
    wds = {"adamw": [1e-5 * 1.02**i for i in range(100)]}
    specs = plan_sweep(task, ["adamw"], lrs, wds, 2, 10)
    db = tmp_path / "results.db"
    with ResultStore(db) as store:
        save_experiment(store, "sweep-big", "sweep", specs)
        assert load_experiments(store)[0].specs == tuple(specs)
    with sqlite3.connect(db) as connection:
        (size,) = connection.execute("SELECT length(specs) FROM experiments").fetchone()
    connection.close()
    assert size < 20_000, size  # 20,000 specs: ~8 MB as a list of specs

    from dataclasses import asdict

    older = json.dumps([asdict(spec) for spec in specs[:3]])
    _sql(db, f"INSERT INTO experiments VALUES ('sweep-old', 'sweep', '{older}', 0)")
    with ResultStore(db) as store:
        assert load_experiments(store)[-1].specs == tuple(specs[:3])


_WRITER = textwrap.dedent(
    """
    import os, sys
    from decoupled.lab.experiments import save_experiment
    from decoupled.lab.store import ResultStore
    from decoupled.lab.train import RunSpec
    store = ResultStore(sys.argv[1])
    spec = RunSpec(task="digits", optimizer="adamw", lr=1e-3, weight_decay=0.0, seed=0, steps=5)
    save_experiment(store, "compare-digits-test", "compare", [spec])
    for key in ("a", "b"):
        store.claim(key, {"key": key})
        store.finish(key, "done", {"test_error": 0.5})
    os.remove(sys.argv[1] + "-wal")  # deleted while the command still writes
    for key in ("c", "d", "e"):
        store.claim(key, {"key": key})
    if sys.argv[2] == "crash":
        os._exit(9)
    print("ready", flush=True)
    sys.stdin.read()  # alive until the test is done
    """
)


def test_finished_runs_survive_a_deleted_wal(tmp_path):
    db = tmp_path / "results.db"
    subprocess.run([sys.executable, "-c", _WRITER, str(db), "crash"], check=False, timeout=120)
    with ResultStore(db, create=False) as store:
        assert {record.key: record.status for record in store.records()} == {
            "a": "done",
            "b": "done",
        }


def test_a_store_whose_wal_was_deleted_under_a_live_writer_is_named_in_one_line(tmp_path, capsys):
    db = tmp_path / "results.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        assert main(["report", "--out", str(tmp_path)]) == 3
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("decoupled report: error:"), lines
        assert "results.db-wal was deleted or damaged" in lines[0], lines
    finally:
        writer.communicate("", timeout=60)
