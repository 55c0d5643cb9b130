"""`decoupled compare` and `decoupled report`: resume, bad input, reports, user models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from decoupled.cli import main
from decoupled.lab import compare
from decoupled.lab.comparison import format_table
from decoupled.lab.store import ResultStore
from tests.helpers import run_cli, wait_for_finished_runs

SMALL = ["compare", "--budget", "40", "--seeds", "2", "--no-progress"]


def test_compare_end_to_end_and_report_rebuild(tmp_path):
    out = tmp_path / "runs"
    assert main([*SMALL, "--workers", "1", "--out", str(out)]) == 0
    store = ResultStore(out / "results.db")
    records = store.records()
    assert len(records) == 4 and {r.status for r in records} == {"done"}
    report = (out / "report.md").read_text()
    assert "| how the decay is applied |" in report and "verdict:" in report
    [curves] = (out / "plots").glob("compare-mnist1d-*-curves.png")  # named by the plan
    assert curves.stat().st_size > 1000
    assert "<table>" in (out / "report.html").read_text()

    # running again trains nothing: the runs are in the store
    finished = {r.key: r.finished for r in records}
    assert main([*SMALL, "--workers", "1", "--out", str(out)]) == 0
    assert {r.key: r.finished for r in store.records()} == finished

    # the report is rebuilt from the store alone
    (out / "report.md").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_interrupted_compare_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "decoupled",
        "compare",
        "--budget",
        "150",
        "--seeds",
        "3",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = out / "results.db"
    wait_for_finished_runs(db, minimum=1)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    store = ResultStore(db)
    kept = {r.key: r.finished for r in store.records() if r.status == "done"}
    assert 1 <= len(kept) < 6
    assert not [r for r in store.records() if r.status == "running"]  # marked, not left running

    finished = run_cli(*args[3:])
    assert finished.returncode == 0, finished.stderr
    records = store.records()
    assert len(records) == 6 and all(r.status == "done" for r in records)
    assert all(next(r for r in records if r.key == k).finished == t for k, t in kept.items())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "imagenet"], "argument --task: Invalid task value: 'imagenet'"),
        (["--optimizers", "adam,lion"], "argument --optimizers: unknown ['lion']"),
        (["--budget", "-5"], "argument --budget: must be a positive integer, got -5"),
        (["--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
        (["--task", "cifar10", "--data-dir", "EMPTY"], "argument --data-dir:"),
        (["--out", "FILE/sub"], "argument --out:"),
        (
            ["--optimizers", "sgd,sgdw", "--state-dtype", "bfloat16"],
            "argument --state-dtype: only for adam/adamw (they keep moments), not sgd, sgdw",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("not a folder")
    args = [
        a.replace("EMPTY", str(tmp_path / "EMPTY")).replace("FILE", str(tmp_path / "FILE"))
        for a in args
    ]
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    result = run_cli("compare", *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path / "EMPTY")) == []


def test_failed_runs_are_reported_and_the_exit_status_is_1(tmp_path, capsys, monkeypatch):
    """A run that raises is stored as failed, left out of the report, named in one warning
    line, and the command exits 1 (not 0 with a table of dashes)."""
    from decoupled.cli import main
    from decoupled.lab import train

    def broken(*args, **kwargs):
        raise RuntimeError("no such luck")

    monkeypatch.setattr(train.OPTIMIZERS["adamw"], "step", broken)
    status = main(["compare", "--quick", "--seeds", "1", "--workers", "1", "--no-progress",
                   "--out", str(tmp_path)])  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert status == 1 and len(warnings) == 1, warnings
    assert "1 of 2 runs failed" in warnings[0] and "RuntimeError: no such luck" in warnings[0]


def test_runs_owned_by_another_live_process_are_named(tmp_path, capsys):
    from decoupled.cli import main
    from decoupled.lab.comparison import plan
    from decoupled.lab.executor import spec_key
    from decoupled.lab.tasks import get_task
    from decoupled.lab.workflow import threads_per_run

    task = get_task("mnist1d")
    spec = plan(task, ["adam"], 1, task.quick_steps, threads=threads_per_run(1))[0]
    store = ResultStore(tmp_path / "results.db")
    assert store.claim(spec_key(spec), spec.config())  # this (live) process owns it
    status = main(["compare", "--quick", "--seeds", "1", "--optimizers", "adam", "--workers",
                   "1", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert (
        status == 0 and len(warnings) == 1 and "1 of 1 runs are claimed by another" in warnings[0]
    )


def test_a_second_plan_into_the_same_folder_is_reported_beside_the_first(tmp_path, capsys):
    from decoupled.cli import main

    common = ["--budget", "10", "--seeds", "1", "--workers", "1", "--no-progress"]
    for optimizers in ("adam,adamw", "sgd,sgdw", "adam,adamw"):  # the third: a resumed first
        assert main(["compare", *common, "--optimizers", optimizers, "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert report.count("## compare-mnist1d-") == 2, report
    assert all(name in report for name in ("Adam", "AdamW", "SGD", "SGDW"))


def test_report_without_a_store_is_a_clear_error(tmp_path):
    result = run_cli("report", "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "no results store" in result.stderr


def _foreign_sqlite(path):
    import sqlite3

    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()


@pytest.mark.parametrize(
    "make_db,message",
    [
        (_foreign_sqlite, "is an SQLite database but not a results store"),
        (lambda path: path.write_bytes(bytes(range(256)) * 8), "is not an SQLite database"),
        (lambda path: path.mkdir(), "cannot open the results store"),
    ],
    ids=["foreign", "damaged", "folder"],
)
@pytest.mark.parametrize("command", ["compare", "sweep", "report"])
def test_an_unusable_results_db_exits_2_with_one_line_and_stays_untouched(
    tmp_path, capsys, make_db, message, command
):
    from decoupled.cli import main

    db = tmp_path / "results.db"
    make_db(db)
    before = db.read_bytes() if db.is_file() else None
    args = [command, "--out", str(tmp_path)] + (["--quick"] if command != "report" else [])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert (db.read_bytes() if db.is_file() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.db"]


def test_bring_your_own_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = (x[:, 0] + x[:, 1] > 0).long()

    def train_batches(seed):
        generator = torch.Generator().manual_seed(seed)
        while True:
            index = torch.randint(0, 200, (32,), generator=generator)
            yield x[index], y[index]

    def evaluate(model):
        return (model(x[200:]).argmax(1) != y[200:]).float().mean().item()

    result = compare(
        lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2)),
        train_batches,
        evaluate,
        steps=60,
        seeds=3,
        metric="test_error",
        out=tmp_path,
        progress=False,
        name="toy",
        threads=1,  # a caller's own thread count is used (and recorded in the runs' keys)
    )
    assert [arm.optimizer for arm in result.arms] == ["adam", "adamw"]
    assert {r.config["threads"] for arm in result.arms for r in arm.records.values()} == {1}
    assert all(len(arm.records) == 3 for arm in result.arms)
    assert "verdict:" in format_table(result)
    assert "compare-toy" in Path(tmp_path / "report.md").read_text()
