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
from tests.helpers import run_cli, run_cli_here, wait_for_finished_runs

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


@pytest.mark.xdist_group("processes")
def test_interrupted_compare_resumes_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "decoupled",
        "compare",
        "--budget",
        "120",
        "--seeds",
        "2",
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
    assert 1 <= len(kept) < 4
    assert not [r for r in store.records() if r.status == "running"]  # marked, not left running

    finished = run_cli(*args[3:])
    assert finished.returncode == 0, finished.stderr
    records = store.records()
    assert len(records) == 4 and all(r.status == "done" for r in records)
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
        (["--out", " "], "argument --out: empty"),
        (["--lr", "-1e-3"], "argument --lr: must be > 0, got -1e-3"),  # a value, not an option
        (["--wd-sgd", "0.1"], "argument --wd-sgd: sgd is not being compared (--optimizers adam"),
        (["--seeds", "9" * 400], "argument --seeds: must be at most 2**63 - 1"),
        (["--seeds", "99999999999"], "argument --seeds: 99999999999 is more than 1000"),
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
    result = run_cli_here("compare", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path / "EMPTY")) == []


def test_the_installed_command_refuses_bad_input_with_one_line(tmp_path):
    """The same refusal through the real entry point (``python -m decoupled``)."""
    out = tmp_path / "out"
    result = run_cli("compare", "--seeds", "0", "--out", str(out), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --seeds: must be a positive integer" in lines[0]
    assert not out.exists()


def test_failed_runs_are_reported_and_the_exit_status_is_1(tmp_path, capsys, monkeypatch):
    """A run that raises is stored as failed, left out of the report, named in one warning
    line, and the command exits 1 (not 0 with a table of dashes)."""
    from decoupled.cli import main
    from decoupled.optim.registry import REGISTRY

    def broken(*args, **kwargs):
        raise RuntimeError("no such luck")

    monkeypatch.setattr(REGISTRY["adamw"].cls, "step", broken)
    status = main(["compare", "--quick", "--seeds", "1", "--workers", "1", "--no-progress",
                   "--out", str(tmp_path)])  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert status == 1 and len(warnings) == 1, warnings
    assert "1 of 2 runs failed" in warnings[0] and "RuntimeError: no such luck" in warnings[0]


def test_runs_owned_by_another_live_process_are_named(tmp_path, capsys):
    from decoupled.cli import main
    from decoupled.lab.plan import plan_compare
    from decoupled.lab.tasks import get_task
    from decoupled.lab.workflow import threads_per_run

    task = get_task("mnist1d")
    spec = plan_compare(task, ["adam"], 1, task.quick_steps, threads=threads_per_run(1))[0]
    store = ResultStore(tmp_path / "results.db")
    assert store.claim(spec.key(), spec.config())  # this (live) process owns it
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
    result = run_cli("report", "--out", "", timeout=60)
    assert result.returncode == 2 and "argument --out: empty" in result.stderr


def test_report_on_a_store_without_experiments_says_there_is_nothing_to_report(tmp_path):
    from decoupled.lab.executor import open_store

    open_store(tmp_path / "results.db")  # an empty store, as an inspect folder's
    result = run_cli("report", "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "holds no compare or sweep experiment" in result.stderr
    assert not (tmp_path / "report.md").exists()


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


def test_a_compare_is_summarized_once_for_its_result_and_its_report(tmp_path, monkeypatch):
    """compare_task returns the very Comparison its report was built from: one summary."""
    from decoupled.lab import workflow

    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return summarize(*args, **kwargs)

    summarize = workflow.summarize
    monkeypatch.setattr(workflow, "summarize", counted)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def train_batches(seed):
        return [(x[:32], y[:32]), (x[32:], y[32:])]

    result = compare(
        lambda: nn.Linear(3, 2),
        train_batches,
        lambda model: (model(x).argmax(1) != y).float().mean().item(),
        steps=4,
        seeds=2,
        out=tmp_path,
        progress=False,
        name="once",
        threads=1,
    )
    assert len(calls) == 1
    assert [len(arm.records) for arm in result.arms] == [2, 2]
    assert format_table(result) in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------- divergence and failures


def _summarized(by_optimizer, seeds=5):
    """A comparison of adam and adamw on mnist1d from per-seed metrics (None: diverged,
    "missing": no finished record, as for a failed run)."""
    from decoupled.lab.comparison import summarize
    from decoupled.lab.plan import plan_compare
    from decoupled.lab.store import RunRecord
    from decoupled.lab.tasks import get_task

    task = get_task("mnist1d")
    specs = plan_compare(task, ["adam", "adamw"], seeds, 100)
    records = []
    for spec in specs:
        value = by_optimizer[spec.optimizer][spec.seed]
        if value == "missing":
            continue
        status, metrics = (
            ("diverged", {"metric": float("nan")})
            if value is None
            else ("done", {"metric": value, "weight_norms": {"total": 1.0}})
        )
        records.append(RunRecord(str(spec), {}, status, metrics, *[None] * 6))
    return summarize(task, specs, records, key_of=str)


ADAM_FINISHED = [0.020, 0.021, 0.019, 0.022, 0.020]


def test_a_verdict_never_names_a_winner_from_the_survivors_alone():
    """AdamW diverged on 3 of 5 seeds, Adam on none: more often, but 3 of 5 against 0 of 5
    is not evidence of instability (Fisher's exact p = 0.17), and AdamW's lower error on the
    2 seeds both finished is given as just that."""
    comparison = _summarized({"adam": ADAM_FINISHED, "adamw": [0.015, 0.016, None, None, None]})
    [adamw] = [arm for arm in comparison.arms if arm.optimizer == "adamw"]
    assert adamw.diverged() == 3
    [(_, _, paired, line)] = comparison.paired
    assert paired.n == 2
    assert line == (
        "AdamW diverged on 3 of 5 seeds, Adam on 0: AdamW diverged more often, not "
        "significantly (Fisher's exact p = 0.17); on the 2 seeds both finished: no significant "
        "difference in test error between Adam and AdamW: AdamW is lower by 0.5 points on "
        "every seed, but with all differences equal there is no t-test and the Wilcoxon "
        "signed-rank test gives p = 0.5 (n = 2 seeds)"
    )
    table = format_table(comparison)
    assert "paired t-test undefined (all differences equal), Wilcoxon p = 0.5, n = 2" in table


def test_equal_divergence_keeps_the_verdict_but_says_which_seeds_were_dropped():
    adamw = [0.015, 0.017, 0.014, 0.018, None]
    comparison = _summarized({"adam": [*ADAM_FINISHED[:4], None], "adamw": adamw})
    [(_, _, paired, line)] = comparison.paired
    assert line.startswith(
        "Adam diverged on 1 of 5 seeds, AdamW on 1; on the 4 seeds both finished: AdamW has "
        "lower test error than Adam by "
    )
    assert "less stable" not in line and paired.n == 4


def test_the_arm_named_is_the_one_that_lost_the_larger_share_of_its_seeds():
    """Adam lost 2 of 5 seeds, AdamW 1 of its 2 (3 failed): AdamW, by share, not by count
    (and far from significantly: Fisher's exact p = 1)."""
    comparison = _summarized(
        {"adam": [0.02, 0.021, 0.019, None, None], "adamw": [0.015, None, *["missing"] * 3]}
    )
    [(_, _, _, line)] = comparison.paired
    assert line.startswith(
        "AdamW diverged on 1 of 2 seeds, Adam on 2 of 5: AdamW diverged more often, not "
        "significantly (Fisher's exact p = 1)"
    )
    tied = _summarized(
        {"adam": [0.02, None, None, 0.02, "missing"], "adamw": [0.015, None, *["missing"] * 3]}
    )  # 2 of 4 against 1 of 2: the same share
    assert "more often" not in tied.paired[0][3] and "less stable" not in tied.paired[0][3]


def test_too_few_survivors_to_compare_still_say_who_diverged():
    comparison = _summarized({"adam": ADAM_FINISHED, "adamw": [0.015, None, None, None, None]})
    [(_, _, paired, line)] = comparison.paired
    assert paired is None
    assert line == (
        "AdamW diverged on 4 of 5 seeds, Adam on 0: AdamW is less stable at these settings "
        "(Fisher's exact p = 0.048); on the 1 seed both finished: cannot compare Adam and "
        "AdamW: need at least 2 seeds where both finished (have 1)"
    )


def test_no_divergence_leaves_the_verdict_as_it_was():
    comparison = _summarized({"adam": ADAM_FINISHED, "adamw": [0.015, 0.017, 0.014, 0.018, 0.016]})
    [(_, _, _, line)] = comparison.paired
    assert line.startswith("AdamW has lower test error than Adam by ") and "diverged" not in line


def test_per_seed_plot_marks_diverged_seeds(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from decoupled.lab.figures import plot_per_seed

    texts = []
    original = Axes.text

    def recording_text(self, x, y, s, *args, **kwargs):
        texts.append((x, y, s.strip()))
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", recording_text)
    comparison = _summarized({"adam": ADAM_FINISHED, "adamw": [0.015, 0.016, None, None, None]})
    plot_per_seed(comparison, tmp_path / "per-seed.png")
    [(x, y, label)] = texts
    assert (x, label) == (1, "3 diverged") and y > 2.2  # above every finished seed (in %)


def test_a_rebuilt_report_names_the_failed_runs(tmp_path):
    from decoupled.lab.experiments import save_experiment
    from decoupled.lab.plan import plan_compare
    from decoupled.lab.tasks import get_task
    from decoupled.lab.workflow import rebuild_reports

    task = get_task("mnist1d")
    specs = plan_compare(task, ["adam", "adamw"], 5, 100)
    db = tmp_path / "results.db"
    store = ResultStore(db)
    save_experiment(db, "compare-mnist1d-test", "compare", specs)
    for spec in specs:
        key = spec.key()
        if spec.seed == 4 and spec.optimizer == "adamw":
            continue  # never started
        assert store.claim(key, spec.config())
        if spec.seed == 3:  # seed 3 of both failed, e.g. out of memory
            store.fail(key, "Traceback (most recent call last):\nRuntimeError: boom")
        else:
            metric = 0.02 - 0.001 * (spec.optimizer == "adamw") + 0.0007 * spec.seed
            store.finish(key, "done", {"metric": metric, "weight_norms": {"total": 1.0}})
    store.close()
    with pytest.warns(UserWarning, match="No artists with labels"):  # no curves stored
        rebuild_reports(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert (
        "Warning: 2 of 10 runs failed (adam 1, adamw 1) and are left out of the report (first "
        "error: RuntimeError: boom)"
    ) in report
    assert (
        "Warning: 1 of 10 runs have not been run (adamw 1) and are left out of the report; run "
        "the command again to run them."
    ) in report
