"""`decoupled compare --seeds auto`, --resolution and --pairs: bad input, sequential rounds,
resume, several arms with Holm-adjusted p-values."""

from __future__ import annotations

import numpy as np
import pytest

from decoupled.cli import main
from decoupled.lab.compare_options import Sequential, compare_kind, compare_options
from decoupled.lab.comparison import format_bound, format_table, summarize
from decoupled.lab.plan import plan_compare
from decoupled.lab.stats import holm, paired_difference
from decoupled.lab.store import ResultStore, RunRecord
from decoupled.lab.tasks import get_task

QUICK = ["compare", "--budget", "20", "--no-progress", "--workers", "1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "auto:1"], "argument --seeds: maximum 1 in 'auto:1' is below 3"),
        (["--seeds", "auto:0"], "argument --seeds: maximum 0 in 'auto:0' is below 3"),
        (["--seeds", "auto:x"], "argument --seeds: invalid maximum in 'auto:x'"),
        (["--seeds", "auto:"], "argument --seeds: invalid maximum in 'auto:'"),
        (["--seeds", "auto:5000"], "argument --seeds: 5000 is more than 1000"),
        (["--seeds", "auto", "--resolution", "0"], "argument --resolution: must be > 0, got 0"),
        (["--seeds", "auto", "--resolution", "-1"], "argument --resolution: must be > 0, got -1"),
        (["--seeds", "auto", "--resolution", "inf"], "argument --resolution: must be finite"),
        (["--seeds", "auto", "--resolution", "nan"], "argument --resolution: must be finite"),
        (["--resolution", "0.5"], "argument --resolution: 0.5 is only used with --seeds auto"),
        (["--pairs", "sgd:adam"], "argument --pairs: 'sgd' in 'sgd:adam' is not compared"),
        (["--pairs", "adam-adamw"], "argument --pairs: malformed pair 'adam-adamw'"),
        (["--pairs", "adam:adam"], "argument --pairs: malformed pair 'adam:adam'"),
        (["--pairs", "adam:adamw,"], "argument --pairs: malformed pair ''"),
        (["--pairs", ":adamw"], "argument --pairs: malformed pair ':adamw'"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_value_and_writes_nothing(
    tmp_path, capsys, args, message
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *args, "--out", str(out)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def _records(specs, metric_of):
    return [
        RunRecord(
            str(spec),
            {},
            "done",
            {"metric": metric_of(spec), "weight_norms": {"total": 1.0}},
            *[None] * 6,
        )
        for spec in specs
    ]


def test_four_arms_report_both_twins_and_extra_pairs_with_holm_adjusted_p_values():
    task = get_task("mnist1d")
    names = ["adam", "adamw", "sgd", "sgdw"]
    specs = plan_compare(task, names, 6, 100)
    rng = np.random.default_rng(3)
    base = rng.normal(0.2, 0.01, 6)
    shift = {"adam": 0.0, "adamw": -0.006, "sgd": 0.004, "sgdw": 0.003}
    noise = {(s.optimizer, s.seed): rng.normal(0, 0.002) for s in specs}
    metric = {str(s): base[s.seed] + shift[s.optimizer] + noise[s.optimizer, s.seed] for s in specs}
    records = _records(specs, lambda spec: metric[str(spec)])
    comparison = summarize(task, specs, records, str, extra_pairs=[("sgd", "adam")])
    assert [(a.optimizer, b.optimizer) for a, b, _, _ in comparison.paired] == [
        ("adam", "adamw"),
        ("sgd", "sgdw"),
        ("sgd", "adam"),
    ]

    def values(name):
        return [metric[str(s)] for s in specs if s.optimizer == name]

    raw = [paired_difference(values(a), values(b)) for a, b in comparison_pairs(comparison)]
    expected = holm([r.p_value for r in raw])
    assert [paired.p_value for _, _, paired, _ in comparison.paired] == pytest.approx(expected)
    assert all(paired.adjusted_over == 3 for _, _, paired, _ in comparison.paired)
    table = format_table(comparison)
    assert table.count("paired t-test p (Holm) = ") == 3
    assert "Holm-adjusted across the 3 pairs reported" in table
    assert "(Holm-adjusted over 3 pairs" in comparison.paired[0][3]
    assert all(line is not None and "α = 0.0167" in line for line in comparison.power)
    # an extra pair that repeats a twin (either order) is reported once
    again = summarize(task, specs, records, str, extra_pairs=[("adamw", "adam")])
    assert len(again.paired) == 2


def test_power_levels_count_only_the_pairs_that_were_compared():
    """Two twin pairs, SGDW finished on one seed only (NaN: diverged): Adam–AdamW is the one
    pair compared, so neither Holm nor its power line divides α by 2."""
    task = get_task("mnist1d")
    specs = plan_compare(task, ["adam", "adamw", "sgd", "sgdw"], 5, 100)
    offsets = [0.004, -0.003, 0.006, 0.001, 0.009]

    def metric(spec):
        if spec.optimizer == "sgdw" and spec.seed > 0:
            return float("nan")
        return 0.2 + 0.001 * spec.seed + (offsets[spec.seed] if spec.optimizer == "adamw" else 0)

    comparison = summarize(task, specs, _records(specs, metric), str)
    assert [paired is None for _, _, paired, _ in comparison.paired] == [False, True]
    assert "α = 0.05 " in comparison.power[0] and comparison.power[1] is None


def comparison_pairs(comparison):
    return [(a.optimizer, b.optimizer) for a, b, _, _ in comparison.paired]


def test_one_pair_is_not_adjusted_and_its_verdict_has_a_power_line():
    task = get_task("mnist1d")
    specs = plan_compare(task, ["adam", "adamw"], 5, 100)
    offsets = [0.004, -0.003, 0.006, 0.001, 0.009]  # adamw − adam: not significant
    records = _records(
        specs, lambda s: 0.2 + 0.001 * s.seed + (offsets[s.seed] if s.optimizer == "adamw" else 0)
    )
    comparison = summarize(task, specs, records, str)
    table = format_table(comparison)
    assert "(Holm)" not in table and "Holm" not in comparison.paired[0][3]
    [power] = [line for line in table.splitlines() if line.startswith("power: ")]
    assert power.startswith("power: 5 seeds detect a difference of ±")
    assert "would need about" in power and "planning estimate" in power


def test_the_options_of_a_compare_survive_in_its_kind():
    design = Sequential(max_seeds=12, resolution=0.005)
    kind = compare_kind([("sgd", "adam")], design)
    assert kind.startswith("compare ")
    assert compare_options(kind) == {"extra_pairs": [("sgd", "adam")], "sequential": design}
    assert compare_kind() == "compare" and compare_options("compare") == {"extra_pairs": []}


def test_sequential_verdict_names_the_procedure_and_stops_when_the_interval_excludes_zero():
    task = get_task("mnist1d")
    specs = plan_compare(task, ["adam", "adamw"], 7, 100)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.001, 7)
    records = _records(
        specs, lambda s: 0.2 + (-0.01 + noise[s.seed] if s.optimizer == "adamw" else 0.0)
    )
    design = Sequential(max_seeds=20)
    comparison = summarize(task, specs, records, str, sequential=design)
    [pair] = comparison.sequential
    assert pair.reason == "excludes 0" and pair.look.n == 7 and pair.looks == 5
    assert comparison.should_stop()
    line = comparison.paired[0][3]
    assert line.startswith("AdamW has lower test error than Adam: the 95% confidence sequence")
    assert "always-valid t confidence sequence (Lai 1976 mixture, g = 1), 5 looks" in line
    table = format_table(comparison)
    assert "fixed-n, for reference" in table
    # the power line is a fixed-n t-test's too, and says so
    [power] = [line for line in table.splitlines() if line.startswith("power")]
    assert power.startswith("power (of a fixed-n t-test, for reference; the confidence ")
    # three seeds only: the sequence is still the whole line, and the compare goes on
    early = summarize(task, specs[:3] + specs[7:10], records, str, sequential=design)
    assert early.sequential[0].reason is None and not early.should_stop()
    assert "not decided yet" in early.paired[0][3]
    # a resolution wider than the interval stops it without a winner
    wide = summarize(task, specs, records, str, sequential=Sequential(20, resolution=1.0))
    assert wide.sequential[0].reason == "excludes 0"  # excluding 0 is checked first


def test_seeds_auto_trains_rounds_resumes_from_stored_seeds_and_rebuilds_its_report(
    tmp_path, capsys
):
    out = tmp_path / "runs"
    # three seeds stored by an earlier (fixed) compare: the sequential one reuses them
    assert main([*QUICK, "--seeds", "3", "--out", str(out)]) == 0
    store = ResultStore(out / "results.db")
    kept = {r.key: r.finished for r in store.records()}
    capsys.readouterr()
    assert main([*QUICK, "--seeds", "auto:4", "--resolution", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = store.records()
    assert len(records) == 8 and all(r.status == "done" for r in records)
    assert all(next(r for r in records if r.key == k).finished == t for k, t in kept.items())
    assert "after 3 seeds: AdamW − Adam (−∞, +∞), going on" in printed
    assert "after 4 seeds: AdamW − Adam (−∞, +∞), max seeds" in printed
    assert "stopped at the maximum of 4 seeds" in printed
    report = (out / "report.md").read_text()
    assert "always-valid confidence sequence" in report and "Power, AdamW − Adam" in report
    # run again: nothing is trained, the same verdict comes back, the report is rebuilt alike
    finished = {r.key: r.finished for r in records}
    assert main([*QUICK, "--seeds", "auto:4", "--resolution", "50", "--out", str(out)]) == 0
    assert {r.key: r.finished for r in store.records()} == finished
    assert capsys.readouterr().out.split("\n", 1)[1] == printed.split("\n", 1)[1]
    (out / "report.md").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == report


@pytest.mark.parametrize(
    "value, text",
    [(-0.58, "-0.58"), (0.123, "+0.12"), (-0.0035, "-0.0035"), (0.004, "+0.004"), (0.0, "+0.00")],
)
def test_a_bound_just_past_zero_does_not_print_as_zero(value, text):
    assert format_bound(value) == text
