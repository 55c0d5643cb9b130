"""Sweeps: grid parsing, separability numbers on known landscapes, resume after kill -9, Ray."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from decoupled.lab.grid import RangeError, check_grid_size, parse_range, space_from_json
from decoupled.lab.store import ResultStore, RunRecord
from decoupled.lab.sweep import Landscape, format_landscapes, landscapes
from decoupled.lab.train import RunSpec
from tests.helpers import finish_interrupted_at, run_cli, run_cli_here, wait_for_finished_runs


def test_parse_ranges():
    assert parse_range("1e-4:1e-2:3") == pytest.approx([1e-4, 1e-3, 1e-2])
    assert parse_range("0,1e-3, 1e-2") == [0.0, 1e-3, 1e-2]
    assert parse_range("5e-3") == [5e-3]
    assert parse_range("1e-3:1e-3:1") == [1e-3]
    assert parse_range("1e-3,0.001, 1e-3,0") == [0.0, 1e-3]  # repeats are one cell


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
        ("1e-3:1e-3:3", r"lo = hi \(0.001\) gives one value, not n = 3"),
        ("1e-4:1e-2:100000000000", r"more than 10000"),
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
    # an integral JSON float counts as an integer; values come back sorted without repeats
    path.write_text(
        json.dumps(
            {
                "lr": {"min": 1e-4, "max": 1e-2, "num": 3.0},
                "weight_decay": {"values": [0.1, 0, 0.1]},
            }
        )
    )
    space = space_from_json(path)
    assert space["lr"] == pytest.approx([1e-4, 1e-3, 1e-2]) and space["weight_decay"] == [0, 0.1]


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"lr": {"min": "abc", "max": 1e-2, "num": 3}}', 'lr.min: expected a number, got "abc"'),
        ('{"lr": {"min": null, "max": 1e-2, "num": 3}}', "lr.min: expected a number, got null"),
        ('{"lr": {"min": true, "max": 1e-2, "num": 3}}', "lr.min: expected a number, got true"),
        (
            '{"lr": {"min": NaN, "max": 1e-2, "num": 3}}',
            "lr.min: expected a finite number, got NaN",
        ),
        ('{"lr": {"values": 5}}', "lr.values: expected a non-empty list of numbers, got 5"),
        ('{"lr": {"values": []}}', "lr.values: expected a non-empty list of numbers, got []"),
        ('{"lr": {"values": "0.1"}}', 'lr.values: expected a non-empty list of numbers, got "0.1"'),
        ('{"lr": {"values": [0.1, "x"]}}', 'lr.values: expected a number, got "x"'),
        ('{"lr": {"values": [1e-3, 1e400]}}', "lr.values: expected a finite number, got Infinity"),
        ('{"lr": {"values": [0, 1e-3]}}', "lr.values: learning rates must be > 0, got 0"),
        ('{"wd_adam": {"values": [-0.1]}}', "wd_adam.values: weight decay must be >= 0, got -0.1"),
        ('{"lr": {"min": 1e-4, "max": 1e-2, "num": 1e400}}', "lr.num: expected an integer >= 1"),
        ('{"lr": {"min": 1e-4, "max": 1e-2, "num": 2.7}}', "lr.num: expected an integer >= 1"),
        ('{"lr": {"min": 1e-4, "max": 1e-2, "num": 0}}', "lr.num: expected an integer >= 1"),
        (
            '{"lr": {"min": 1e-4, "max": 1e-2, "num": "3"}}',
            'lr.num: expected an integer >= 1, got "3"',
        ),
        (
            '{"lr": {"min": 1e-4, "max": 1e-2, "num": 1e30}}',
            "lr: n = 1000000000000000019884624838656 values is more than 10000",
        ),
        ('{"lr": {"min": 1e-3, "max": 1e-3, "num": 3}}', "lr: lo = hi (0.001) gives one value"),
        ('{"lr": {"min": 1e-4, "max": 1e-2}}', "lr: missing 'num'"),
        (
            '{"lr": {"min": 1e-4, "max": 1e-2, "num": 3, "scaling": "linear"}}',
            'lr.scaling: only "log"',
        ),
        ('{"lr": {"min": 1e-4, "max": 1e-2, "num": 3, "nmu": 5}}', "lr: unexpected field 'nmu'"),
        ('{"lr": {"values": [1e-3], "num": 5}}', "lr: unexpected field 'num'"),
        ('{"lr": [1e-3]}', "lr: expected an object with min/max/num or values, got [0.001]"),
        ('{"adam": {"values": [0.1]}}', "unknown key 'adam' (allowed: lr, weight_decay, wd_adam,"),
        ('{"wd_foo": {"values": [0.1]}}', "unknown key 'wd_foo'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_json_search_spaces_are_one_line_range_errors(tmp_path, text, message):
    path = tmp_path / "space.json"
    path.write_text(text)
    with pytest.raises(RangeError) as caught:
        space_from_json(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"search space {path}:")


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


def test_edge_warning_names_the_axis_and_side():
    # best at the lowest lr and the highest λ
    corner = landscape(lambda x, y: x - y + 10, LRS, WDS)
    assert corner.edges() == [("lr", "low", 1e-4), ("wd", "high", 1.0)]
    warnings = format_landscapes([corner], "loss").splitlines()[2:]
    assert warnings == [
        "warning: best synthetic cell is at the lowest lr (0.0001) of the grid: "
        "extend --lr below it",
        "warning: best synthetic cell is at the highest λ (1) of the grid: "
        "extend --wd-synthetic above it",
        "warning: synthetic rows at lr 0.0001, 0.001, 0.01, 0.1 have a best λ (or one tied "
        "for best) at the highest λ (1) of the grid, which may clip the slope: extend "
        "--wd-synthetic above it",
    ]
    top = landscape(lambda x, y: -x + (y + 3) ** 2, LRS, WDS)  # highest lr, inner λ
    assert format_landscapes([top], "loss").splitlines()[2:] == [
        "warning: best synthetic cell is at the highest lr (0.1) of the grid: extend --lr above it"
    ]


def test_no_edge_warning_for_lambda_zero():
    wds = [0.0, 1e-4, 1e-3]
    values = np.array([[2.0, 3.0, 4.0], [1.0, 3.0, 4.0], [2.0, 3.0, 4.0]])  # best: λ = 0
    zero = Landscape("adam", [1e-4, 1e-3, 1e-2], wds, values)
    assert zero.best() == (1, 0) and zero.edges() == [] and not zero.best_on_edge()
    assert "warning" not in format_landscapes([zero], "loss")


def _record(spec, status, metric=None):
    metrics = {"metric": metric} if status == "done" else None
    return RunRecord(str(spec), {}, status, metrics, None, None, None, None, None, None)


def test_empty_cells_say_why():
    """A cell where any seed diverged is "diverged" ("k/n diverged" if only some did); other
    empty cells are failed, running or missing."""
    wds = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    specs = [
        RunSpec("mnist1d", "adam", lr=1e-3, weight_decay=wd, seed=seed, steps=10)
        for wd in wds
        for seed in (0, 1)
    ]
    cell = {wd: specs[2 * k : 2 * k + 2] for k, wd in enumerate(wds)}
    records = [
        _record(cell[0.0][0], "done", 0.5),  # one finished, one diverged: diverged
        _record(cell[0.0][1], "diverged"),
        _record(cell[0.1][0], "diverged"),  # every seed diverged
        _record(cell[0.1][1], "done", math.nan),
        _record(cell[0.2][0], "diverged"),  # one diverged, one failed
        _record(cell[0.2][1], "failed"),
        _record(cell[0.3][0], "running"),  # one running, one missing
        _record(cell[0.5][0], "done", 0.25),  # a value (one seed failed): no label
        _record(cell[0.5][1], "failed"),
    ]  # 0.4: nothing in the store
    task = type("Task", (), {"higher_is_better": False})()
    (land,) = landscapes(task, specs, records, key_of=str)
    assert np.isnan(land.values[0, :5]).all() and land.values[0, 5] == 0.25
    labels = [land.cell_label(0, j) for j in range(len(wds))]
    assert labels == ["1/2 diverged", "diverged", "1/2 diverged", "running", "missing", ""]
    # a Landscape made by hand (no reasons) does not claim its empty cells diverged
    bare = Landscape("adam", [1e-3], [0.0, 0.1], np.array([[0.5, np.nan]]))
    assert bare.cell_label(0, 1) == "no result"


def _cell_records(specs, outcome):
    """Records for ``specs`` (key: str(spec)) from ``outcome(spec)`` -> (status, metric)."""
    return [_record(spec, *outcome(spec)) for spec in specs]


def test_a_cell_where_some_seeds_diverged_is_never_the_best(tmp_path, monkeypatch):
    """2 of 3 seeds diverge at the high lr and λ; the lucky seed's 1.5% must not make that
    cell the best, the share's denominator counts it, and the heatmap says "2/3 diverged"."""
    from decoupled.lab.plan import plan_sweep
    from decoupled.lab.tasks import get_task

    task = get_task("mnist1d")
    lrs, wds = [1e-3, 1e-2], [1e-2, 1e-1]
    specs = plan_sweep(task, ["adam"], {"adam": lrs}, {"adam": wds}, 3, 100)

    def outcome(spec):
        if (spec.lr, spec.weight_decay) == (1e-2, 1e-1):
            return ("done", 0.015) if spec.seed == 0 else ("diverged", None)
        return "done", 0.020 + 0.001 * spec.seed

    (land,) = landscapes(task, specs, _cell_records(specs, outcome), key_of=str)
    assert np.isnan(land.values[1, 1]) and land.cell_label(1, 1) == "2/3 diverged"
    assert land.best() != (1, 1) and land.values[land.best()] == pytest.approx(0.021)
    assert land.share_near_best() == pytest.approx(3 / 4)  # the diverged cell is not near
    assert land.best_wd_per_lr()[1] == 1e-2  # nor the best of its row
    texts = _heatmap_texts(tmp_path, monkeypatch, [land])
    assert "2/3 diverged" in texts


def _heatmap_texts(tmp_path, monkeypatch, items) -> list[str]:
    """The texts plot_heatmaps writes into its cells."""
    from matplotlib.axes import Axes

    from decoupled.lab.report import plot_heatmaps

    texts = []
    original = Axes.text

    def recording_text(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(Axes, "text", recording_text)
    plot_heatmaps(items, "loss", False, tmp_path / "heatmap.png")
    return texts


def test_heatmap_labels_empty_cells_by_reason(tmp_path, monkeypatch):
    reasons = np.array([["", "failed"], ["running", "diverged"]], dtype=object)
    values = np.array([[0.5, np.nan], [np.nan, np.nan]])
    land = Landscape("adam", [1e-3, 1e-2], [0.0, 0.1], values, reasons=reasons)
    texts = _heatmap_texts(tmp_path, monkeypatch, [land])
    assert sorted(texts) == ["0.5", "diverged", "failed", "running"]


# ---------------------------------------------------------------- share near the best

SHARE_LRS, SHARE_WDS = [1e-3, 1e-2], [1e-3, 1e-2]
NEGATIVE = np.array([[-1.0, -1.05], [-1.5, -3.0]])


@pytest.mark.parametrize(
    "values, higher_is_better, share",
    [
        (NEGATIVE, True, 2 / 4),  # best -1.0: -1.05 is within 0.1; -1.5, -3.0 are not
        (NEGATIVE, False, 1 / 4),  # best -3.0: within 0.3 means ≤ -2.7, only itself
        (np.array([[0.0, 0.001], [0.002, 0.5]]), False, 1 / 4),  # best 0: only ties count
        (np.array([[0.10, 0.15], [0.19, 0.30]]), False, 1 / 4),  # error: within 0.01
        (1 - np.array([[0.10, 0.15], [0.19, 0.30]]), True, 3 / 4),  # accuracy: within 0.09
    ],
)
def test_share_near_best_is_relative_to_the_best_magnitude(values, higher_is_better, share):
    land = Landscape("adamw", SHARE_LRS, SHARE_WDS, values, higher_is_better=higher_is_better)
    assert land.share_near_best() == pytest.approx(share)


def test_share_counts_only_cells_with_an_outcome_and_says_when_partial():
    specs = [
        RunSpec("mnist1d", "adamw", lr=lr, weight_decay=wd, seed=0, steps=10)
        for lr in SHARE_LRS
        for wd in SHARE_WDS
    ]
    statuses = [("done", 0.10), ("done", 0.105), ("diverged", None), ("running", None)]
    records = [_record(spec, *status) for spec, status in zip(specs, statuses)]
    task = type("Task", (), {"higher_is_better": False})()
    (land,) = landscapes(task, specs, records, key_of=str)
    assert land.has_outcome().tolist() == [[True, True], [True, False]]
    assert land.share_near_best() == pytest.approx(2 / 3)  # not 2/4: one cell is running
    text = format_landscapes([land], "test_error")
    assert (
        "note: the adamw grid is partial: 1 of 4 cells have no outcome yet (failed, running or "
        "missing); the share within 10% is of the 3 that do"
    ) in text.splitlines()
    assert "partial" not in format_landscapes([landscape(lambda x, y: x + y, LRS, WDS)], "loss")


def test_a_best_of_zero_is_noted():
    zero = Landscape("adamw", SHARE_LRS, SHARE_WDS, np.array([[0.0, 0.001], [0.002, 0.5]]))
    text = format_landscapes([zero], "test_error")
    assert "note: the best adamw test error is 0, so within 10% of it means equal to it" in text


def test_sweep_table_shows_error_rates_in_percent_like_the_compare_table():
    error = Landscape("adam", SHARE_LRS, SHARE_WDS, np.array([[0.012, 0.02], [0.03, 0.04]]))
    header, row = format_landscapes([error], "test_error").splitlines()[:2]
    assert "best test error" in header and row.split()[1] == "1.2%"
    loss = Landscape("adam", SHARE_LRS, SHARE_WDS, np.array([[0.012, 0.02], [0.03, 0.04]]))
    header, row = format_landscapes([loss], "loss").splitlines()[:2]
    assert "best loss" in header and row.split()[1] == "0.012"


# ---------------------------------------------------------------- the separability slope

SLOPE_LRS, SLOPE_WDS = [1e-4, 1e-3, 1e-2, 1e-1], [1e-5, 1e-4, 1e-3, 1e-2]


def test_slope_says_how_many_rows_it_used_and_which_it_left_out():
    wds = [0.0, 1e-4, 1e-3, 1e-2]
    values = np.array([[1.0, 2, 3, 4], [1.0, 2, 3, 4], [3, 2, 1.0, 4], [3, 1.0, 2, 4]])
    land = Landscape("adam", SLOPE_LRS, wds, values)
    assert land.best_wd_per_lr() == [0.0, 0.0, 1e-3, 1e-4] and land.slope_rows() == [2, 3]
    assert land.diagonal_slope() == pytest.approx(-1.0)
    row, *notes = format_landscapes([land], "loss").splitlines()[1:]
    assert row.split()[4:7] == ["-1.00", "(2/4", "rows)"]
    assert notes[-1:] == [
        "note: the adam slope leaves out the rows at lr 0.0001, 0.001 (best λ = 0, tied best "
        "λ values apart, or no finished cell)"
    ]


def test_rows_whose_best_lambda_is_on_the_grid_edge_are_warned():
    # a diagonal basin γλ = 1e-5 (true slope -1) bowled around lr = 1e-2: the best cell is
    # inside the grid, but the two lowest-lr rows want a λ above the grid's highest
    def bowl(x, y):
        return (x + y + 5) ** 2 + 0.3 * (x + 2) ** 2 + 0.1

    land = landscape(bowl, SLOPE_LRS, SLOPE_WDS)
    assert land.edges() == [] and land.best() == (2, 2)
    assert land.rows_at_wd_edge() == [(0, "high"), (1, "high")]
    assert land.diagonal_slope() == pytest.approx(-0.7)  # clipped: the true slope is -1
    assert format_landscapes([land], "loss").splitlines()[2:] == [
        "warning: synthetic rows at lr 0.0001, 0.001 have a best λ (or one tied for best) at "
        "the highest λ (0.01) of the grid, which may clip the slope: extend --wd-synthetic "
        "above it"
    ]


def test_a_row_tied_at_lambdas_apart_has_no_best_lambda_and_leaves_the_slope():
    """Row 0 ties at λ = 1e-4 and 1e-2 with a worse cell between: their mean, 1e-3, would be
    that row's worst cell."""
    values = np.array([[0.10, 0.14, 0.10], [0.10, 0.08, 0.12], [0.12, 0.08, 0.10]])
    land = Landscape("adamw", [1e-3, 1e-2, 1e-1], [1e-4, 1e-3, 1e-2], values)
    assert land.best_wd_per_lr() == [None, 1e-3, 1e-3]
    assert land.slope_rows() == [1, 2] and land.diagonal_slope() == pytest.approx(0.0)


def test_ties_in_a_row_resolve_to_the_geometric_mean_of_the_tied_lambdas():
    # a quantized metric: rows 0 and 1 tie between λ = 1e-4 and 1e-3
    values = np.array(
        [
            [0.02, 0.015, 0.015, 0.03],
            [0.02, 0.014, 0.014, 0.03],
            [0.02, 0.014, 0.013, 0.03],
            [0.02, 0.016, 0.015, 0.03],
        ]
    )
    land = Landscape("adamw", SLOPE_LRS, SLOPE_WDS, values)
    assert land.best_wd_per_lr()[:2] == pytest.approx([10**-3.5, 10**-3.5])
    assert land.best_wd_per_lr()[2:] == [1e-3, 1e-3]
    # mirroring the λ axis mirrors every best λ, so the slope only changes sign (a tie that
    # went to the smallest λ would give 0.4 one way and 0 the other)
    mirrored = Landscape("adamw", SLOPE_LRS, SLOPE_WDS, values[:, ::-1].copy())
    assert land.diagonal_slope() == pytest.approx(0.2)
    assert mirrored.diagonal_slope() == pytest.approx(-land.diagonal_slope())


def test_max_cells_raises_the_bound_on_a_grid():
    lrs, wds = {"adamw": [1.0] * 1000}, {"adamw": [0.0] * 1000}
    with pytest.raises(RangeError, match="1000000 cells"):
        check_grid_size(lrs, wds)
    assert check_grid_size(lrs, wds, max_cells=1_000_000) == 1_000_000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "1e-2:1e-4:3"], "argument --lr: lo > hi"),
        (["--wd-adamw", "1e-4:1e-2:0"], "argument --wd-adamw: empty range"),
        (["--lr", "0,1e-3"], "argument --lr: learning rates must be > 0"),
        (["--optimizers", "adam,adam"], "argument --optimizers: empty or repeated names"),
        (["--seeds", "-1"], "argument --seeds: must be a positive integer"),
        (["--executor", "slurm"], "argument --executor: invalid choice"),
        (["--lr", "1e-3:1e-3:3"], "argument --lr: lo = hi (0.001) gives one value, not n = 3"),
        (
            ["--optimizers", "adam", "--wd-adamw", "0,1e-2"],
            "argument --wd-adamw: adamw is not being swept (--optimizers adam)",
        ),
        (
            ["--lr", "1e-4:1:1000", "--wd-adamw", "1e-4:1:1000"],
            "the grid has 1005000 cells (lr x weight decay: adam 1000 x 5, adamw 1000 x 1000), "
            "more than 10000; pass --max-cells 1005000",
        ),
        (
            ["--optimizers", "adamw", "--lr", "1e-3,1e-2", "--wd-adamw", "0,1e-2"]
            + ["--max-cells", "3"],
            "the grid has 4 cells (lr x weight decay: adamw 2 x 2), more than 3",
        ),
        (["--max-cells", "0"], "argument --max-cells: must be a positive integer"),
    ],
)
def test_bad_sweep_arguments_exit_2_with_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli_here("sweep", *args, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_the_installed_sweep_command_refuses_bad_arguments_with_one_line(tmp_path):
    """The same refusal through the real entry point (``python -m decoupled``)."""
    out = tmp_path / "out"
    result = run_cli("sweep", "--lr", "1e-2:1e-4:3", "--out", str(out), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --lr: lo > hi" in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "space,args,message",
    [
        ({"lr": {"min": "abc", "max": 1e-2, "num": 3}}, [], 'lr.min: expected a number, got "abc"'),
        ({"adam": {"values": [0.1]}}, [], "unknown key 'adam' (allowed: lr, weight_decay"),
        (
            {"wd_adamw": {"values": [0.1]}},
            ["--optimizers", "adam,sgd"],
            "key 'wd_adamw': adamw is not being swept (--optimizers adam, sgd)",
        ),
    ],
)
def test_bad_search_space_exits_2_with_one_line(tmp_path, space, args, message):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    out = tmp_path / "out"
    result = run_cli_here("sweep", "--space", str(path), *args, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], result.stderr
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


@pytest.mark.xdist_group("processes")
def test_sweep_resumes_after_kill_9_with_every_run_done_once(tmp_path):
    out = tmp_path / "runs"
    args = [
        sys.executable,
        "-m",
        "decoupled",
        *SMALL_SWEEP,
        "--budget",
        "80",
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
    assert "slope log λ*/log lr" in report
    # the plot is named after the experiment (sweep-mnist1d, or with its plan digest after it)
    assert len(list((out / "plots").glob("sweep-mnist1d*-heatmap.png"))) == 1


@pytest.mark.xdist_group("processes")
def test_sweep_on_a_local_ray_instance(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray-runs"
    result = run_cli(*SMALL_SWEEP, "--executor", "ray", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    records = ResultStore(out / "results.db").records()
    assert len(records) == 8 and all(r.status == "done" for r in records)


@functools.cache
def _mnist1d_in_float64():
    import torch

    from decoupled.lab.tasks import get_task
    from decoupled.lab.tasks.base import TaskData

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        task = get_task("mnist1d")
        data = task.load()
    finally:
        torch.set_default_dtype(previous)
    tensors = {k: v.double() if v.is_floating_point() else v for k, v in data.tensors.items()}
    return task, TaskData(tensors, data.train_size, data.info)  # loaded once per process


@pytest.fixture
def float64_mnist1d():
    """The default task in float64, its data too. In float32 a batched cell and a separate run
    differ by rounding (about 1e-7 per step), and one ReLU or max that flips on it changes a
    gradient by 1e-3: seen after 9 of 30 steps for one cell on an AVX-512 machine, not on
    another. In float64 the rounding is 1e-16 and nothing flips, so the comparison can be
    tight and still mean what it says."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the models the tests build
    yield _mnist1d_in_float64()
    torch.set_default_dtype(previous)


def batched_and_separate(task, data, specs):
    from decoupled.lab.batched import run_batched
    from decoupled.lab.train import run

    return zip(run_batched(specs, task, data), (run(s, task=task, data=data) for s in specs))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "sgdw"])
def test_batched_cells_equal_separate_runs(optimizer, float64_mnist1d):
    """Each cell of a batched run equals a separate run with the same seed: curves, metric
    and every weight's norm, to float64 rounding."""
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
    for cell, separate in batched_and_separate(*float64_mnist1d, specs):
        assert cell.status == separate.status == "done"
        assert cell.curves["step"] == separate.curves["step"]
        assert cell.curves["train_loss"] == pytest.approx(separate.curves["train_loss"], rel=1e-12)
        assert cell.curves["metric"] == separate.curves["metric"]
        for name, norm in separate.weight_norms.items():
            assert cell.weight_norms[name] == pytest.approx(norm, rel=1e-12), name


@pytest.mark.parametrize("optimizer", ["adamw", "sgdw"])
def test_a_batched_run_of_one_cell_equals_a_separate_run(optimizer, float64_mnist1d):
    """One cell: its (1, 1, ...)-shaped lr is a per-cell tensor, not a scalar."""
    spec = RunSpec("mnist1d", optimizer, lr=1e-2, weight_decay=0.1, seed=1, steps=10)
    [(cell, separate)] = batched_and_separate(*float64_mnist1d, [spec])
    assert cell.metric == separate.metric
    assert cell.weight_norms["total"] == pytest.approx(separate.weight_norms["total"], rel=1e-12)


@pytest.mark.xdist_group("processes")
def test_batched_executor_through_the_cli(tmp_path):
    out = tmp_path / "batched"
    result = run_cli(*SMALL_SWEEP, "--executor", "batched", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    records = ResultStore(out / "results.db").records()
    assert len(records) == 8 and all(r.status == "done" for r in records)


def test_a_lone_pending_cell_trains_beside_a_twin(tmp_path, monkeypatch):
    """A group of one cell rounds otherwise than a group of several (measured: weight norms
    differ in the 9th digit), so a lone pending cell gets a throwaway twin: its stored result
    is the one its key gives in a full group."""
    from decoupled.lab import batched

    groups = []
    real = batched.run_batched

    def spy(specs, task, data, on_evaluation):
        groups.append(len(specs))
        return real(specs, task, data, on_evaluation)

    monkeypatch.setattr(batched, "run_batched", spy)
    spec = RunSpec("mnist1d", "adamw", 1e-2, 1e-2, seed=0, steps=6, batched=True)
    counts = batched.execute_batched([spec], tmp_path / "results.db", progress=False)
    assert groups == [2] and counts["done"] == 1
    [record] = ResultStore(tmp_path / "results.db").records()
    assert record.heartbeat > record.started  # beat at its evaluations (none did before)


@pytest.mark.xdist_group("processes")
def test_a_worker_killed_mid_run_fails_its_run_and_the_sweep_goes_on(tmp_path):
    """kill -9 of one pool worker (as the OOM killer would): the pool breaks and stops every
    worker; their runs are marked failed (retried next time), the others still run, and the
    command ends with status 1 and a warning, not a BrokenProcessPool traceback."""
    import sqlite3
    import time
    from contextlib import closing

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "decoupled", *SMALL_SWEEP, "--budget", "150"]
    process = subprocess.Popen(
        [*args, "--workers", "2", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:  # a worker's pid, from a running row
        if (out / "results.db").exists():
            with closing(sqlite3.connect(out / "results.db", timeout=5)) as connection:
                with contextlib.suppress(sqlite3.OperationalError):
                    row = connection.execute(
                        "SELECT owner FROM runs WHERE status = 'running'"
                    ).fetchone()
                    if row:
                        victim = int(row[0].rpartition(":")[2].partition("/")[0])
        time.sleep(0.05)
    assert victim is not None and victim != process.pid
    os.kill(victim, signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr and "failed" in stderr
    records = ResultStore(out / "results.db").records()
    failed = [r for r in records if r.status == "failed"]
    assert len(records) == 8 and 1 <= len(failed) <= 2
    assert all("worker process died" in r.error for r in failed)
    assert all(r.status == "done" for r in records if r not in failed)
    rerun = run_cli(*SMALL_SWEEP, "--budget", "150", "--workers", "2", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert all(r.status == "done" for r in ResultStore(out / "results.db").records())


def test_a_cell_that_diverges_in_its_group_is_decided_by_a_run_of_its_own(tmp_path):
    """At lr 1e3 the vmapped BatchNorm backward overflows to NaN where a separate run's stays
    finite (measured): the group said "diverged", the cell finishes. Each stored status is
    the separate run's."""
    from decoupled.lab.batched import execute_batched
    from decoupled.lab.train import run

    specs = [
        RunSpec("mnist1d", "sgd", lr, wd, seed=0, steps=100, momentum=0.9, batched=True)
        for lr in (1e-2, 1e3)
        for wd in (0.0, 1e-3)
    ]
    execute_batched(specs, tmp_path / "results.db", progress=False)
    stored = {(r.config["lr"], r.config["weight_decay"]): r for r in ResultStore(
        tmp_path / "results.db").records()}  # fmt: skip
    for spec in specs[2:]:
        separate = run(spec)
        record = stored[(spec.lr, spec.weight_decay)]
        assert record.status == separate.status == "done"
        assert record.metrics["metric"] == separate.metric


def test_ctrl_c_while_a_batched_group_is_recorded_releases_the_rest_of_its_claims(tmp_path):
    from decoupled.lab.batched import execute_batched
    from decoupled.lab.executor import open_store

    db = tmp_path / "results.db"
    specs = [
        RunSpec("mnist1d", "adamw", lr, 0.01, seed=0, steps=4, eval_every=2)
        for lr in (1e-3, 1e-2, 0.1)
    ]
    calls = finish_interrupted_at(open_store(db), 2)
    with pytest.raises(KeyboardInterrupt):
        execute_batched(specs, db, progress=False)
    rows = {r.key: (r.status, r.error) for r in ResultStore(db).records()}
    first, interrupted = calls
    assert rows == {
        key: ("done", None) if key == first else ("failed", "interrupted")
        for key in (spec.key() for spec in specs)
    }
    assert interrupted != first


def test_ctrl_c_while_a_run_is_recorded_releases_its_claim(tmp_path):
    from decoupled.lab.executor import open_store, run_into_store

    db = tmp_path / "results.db"
    spec = RunSpec("mnist1d", "adamw", 1e-3, 0.01, seed=0, steps=4, eval_every=2)
    finish_interrupted_at(open_store(db), 1)
    with pytest.raises(KeyboardInterrupt):
        run_into_store(spec, str(db))
    (row,) = ResultStore(db).records()
    assert (row.key, row.status, row.error) == (spec.key(), "failed", "interrupted")


def test_ctrl_c_between_a_claim_and_its_run_releases_the_claim(tmp_path, monkeypatch):
    from decoupled.lab import executor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "run_claimed", interrupted)
    db = tmp_path / "results.db"
    spec = RunSpec("mnist1d", "adamw", 1e-3, 0.01, seed=0, steps=4, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        executor.run_into_store(spec, str(db))
    (row,) = ResultStore(db).records()
    assert (row.key, row.status, row.error) == (spec.key(), "failed", "interrupted")
