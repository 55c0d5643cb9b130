"""Sweeps: grid parsing, separability numbers on known landscapes, resume after kill -9, Ray."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from decoupled.lab.store import ResultStore
from decoupled.lab.sweep import Landscape, RangeError, parse_range, space_from_json
from tests.helpers import run_cli, wait_for_finished_runs


def test_parse_ranges():
    assert parse_range("1e-4:1e-2:3") == pytest.approx([1e-4, 1e-3, 1e-2])
    assert parse_range("0,1e-3, 1e-2") == [0.0, 1e-3, 1e-2]
    assert parse_range("5e-3") == [5e-3]
    assert parse_range("1e-3:1e-3:1") == [1e-3]


@pytest.mark.parametrize(
    "text,regex",
    [
        ("1e-2:1e-4:3", r"lo > hi"),
        ("0:1e-2:3", r"bounds must be > 0"),
        ("-1e-3:1e-2:3", r"bounds must be > 0"),
        ("1e-4:1e-2:0", r"empty range"),
        ("", r"empty range"),
        ("1e-4:1e-2", r"expected lo:hi:n"),
        ("-0.1,0.2", r"values must be finite and >= 0"),
        ("a,b", r"not a range"),
        ("1e-4:1e-3:1", r"one value needs lo = hi"),
    ],
)
def test_bad_ranges(text, regex):
    with pytest.raises(RangeError, match=regex):
        parse_range(text)


def test_json_search_space(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(
        json.dumps(
            {
                "lr": {"min": 1e-4, "max": 1e-2, "num": 3, "scaling": "log"},
                "wd_adamw": {"values": [0, 0.1]},
            }
        )
    )
    space = space_from_json(path)
    assert space["lr"] == pytest.approx([1e-4, 1e-3, 1e-2]) and space["wd_adamw"] == [0.0, 0.1]
    path.write_text(json.dumps({"momentum": {"values": [0.9]}}))
    with pytest.raises(RangeError, match="unknown key 'momentum'"):
        space_from_json(path)


def landscape(function, lrs, wds):
    values = np.array([[function(math.log10(lr), math.log10(wd)) for wd in wds] for lr in lrs])
    return Landscape("synthetic", lrs, wds, values)


LRS = [1e-4, 1e-3, 1e-2, 1e-1]
WDS = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def test_diagonal_basin_has_slope_minus_one():
    # the metric depends on γλ only: the best λ halves for each doubling of lr
    diagonal = landscape(lambda x, y: (x + y + 4) ** 2 + 0.1, LRS, WDS)
    assert diagonal.diagonal_slope() == pytest.approx(-1.0)


def test_separable_landscape_has_slope_zero():
    separable = landscape(lambda x, y: (x + 2) ** 2 + (y + 3) ** 2 + 0.1, LRS, WDS)
    assert separable.diagonal_slope() == pytest.approx(0.0)
    assert separable.best() == (2, 2) and not separable.best_on_edge()
    # only the best cell is within 10% of the best value 0.1 (others are ≥ 1.1)
    assert separable.share_near_best() == pytest.approx(1 / (len(LRS) * len(WDS)))


def test_edge_detection_and_nan_cells():
    edge = landscape(lambda x, y: x + y + 10, LRS, WDS)  # best at the smallest lr and λ
    assert edge.best() == (0, 0) and edge.best_on_edge()
    edge.values[0, 0] = np.nan  # diverged: never the best
    assert edge.best() != (0, 0)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "1e-2:1e-4:3"], "argument --lr: lo > hi"),
        (["--wd-adamw", "1e-4:1e-2:0"], "argument --wd-adamw: empty range"),
        (["--lr", "0,1e-3"], "argument --lr: learning rates must be > 0"),
        (["--optimizers", "adam,adam"], "argument --optimizers: empty or repeated names"),
        (["--seeds", "-1"], "argument --seeds: must be a positive integer"),
        (["--executor", "slurm"], "argument --executor: invalid choice"),
    ],
)
def test_bad_sweep_arguments_exit_2_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("sweep", *args, "--out", str(out), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


SMALL_SWEEP = [
    "sweep",
    "--budget",
    "40",
    "--lr",
    "1e-3,1e-2",
    "--wd-adam",
    "0,1e-3",
    "--wd-adamw",
    "1e-2,1e-1",
    "--no-progress",
]


def test_sweep_resumes_after_kill_9_with_every_run_done_once(tmp_path):
    out = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "decoupled",
        *SMALL_SWEEP,
        "--budget",
        "120",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "results.db"
    wait_for_finished_runs(db, minimum=2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    store = ResultStore(db)
    kept = {r.key: r.finished for r in store.records() if r.status == "done"}
    assert 2 <= len(kept) < 8

    result = run_cli(*args[3:])
    assert result.returncode == 0, result.stderr
    records = store.records()
    assert len(records) == 8 and all(r.status == "done" for r in records)
    assert all(next(r for r in records if r.key == k).finished == t for k, t in kept.items())
    report = (out / "report.md").read_text()
    assert (
        "slope log λ*/log lr" in report and (out / "plots" / "sweep-mnist1d-heatmap.png").exists()
    )


def test_sweep_on_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray-runs"
    result = run_cli(*SMALL_SWEEP, "--executor", "ray", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    records = ResultStore(out / "results.db").records()
    assert len(records) == 8 and all(r.status == "done" for r in records)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "sgdw"])
def test_batched_cells_equal_separate_runs(optimizer):
    """Each cell of a batched run equals a separate run with the same seed (float tolerance)."""
    from decoupled.lab.batched import run_batched
    from decoupled.lab.tasks import get_task
    from decoupled.lab.train import RunSpec, run

    task = get_task("mnist1d")
    data = task.load()
    momentum = 0.9 if optimizer.startswith("sgd") else 0.0
    specs = [
        RunSpec(
            "mnist1d",
            optimizer,
            lr=lr,
            weight_decay=wd,
            seed=3,
            steps=30,
            momentum=momentum,
            eval_every=10,
            warmup_steps=5,
        )
        for lr in (1e-3, 1e-2)
        for wd in (0.0, 0.1)
    ]
    batched = run_batched(specs, task, data)
    for cell, spec in zip(batched, specs):
        separate = run(spec, task=task, data=data)
        assert cell.status == separate.status == "done"
        assert cell.curves["step"] == separate.curves["step"]
        assert cell.curves["train_loss"] == pytest.approx(separate.curves["train_loss"], rel=2e-3)
        assert cell.curves["metric"] == pytest.approx(
            separate.curves["metric"], abs=5e-3
        )  # a few borderline test examples
        for name, norm in separate.weight_norms.items():
            assert cell.weight_norms[name] == pytest.approx(norm, rel=2e-3), name


def test_batched_executor_through_the_cli(tmp_path):
    out = tmp_path / "batched"
    result = run_cli(*SMALL_SWEEP, "--executor", "batched", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    records = ResultStore(out / "results.db").records()
    assert len(records) == 8 and all(r.status == "done" for r in records)
