"""`decoupled suggest` and the command line's error behaviour."""

from __future__ import annotations

import json

import pytest

from decoupled.cli import main
from tests.helpers import run_cli, run_cli_here

BASE = ["suggest", "--lr", "1e-3", "--batch-size", "128", "--dataset-size", "50000"]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["suggest", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--lr",
        "--batch-size",
        "--dataset-size",
        "--epochs",
        "--convention",
        "--weight-decay",
        "--timescale",
        "--lambda-norm",
        "--max-lr",
        "--json",
    ):
        assert option in text


def test_json_output_is_consistent_with_the_rules(capsys):
    assert main([*BASE, "--epochs", "10", "--timescale", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    normalized, timescale_rule = result["rules"]
    assert normalized["weight_decay"]["schedule"] == pytest.approx(0.05 * (128 / 500000) ** 0.5)
    assert timescale_rule["weight_decay"]["lr"] == pytest.approx(128 / (1e-3 * 4 * 50000))
    assert timescale_rule["timescale_epochs"] == pytest.approx(4.0)
    assert timescale_rule["timescale_steps"] == pytest.approx(4.0 * 50000 / 128)
    assert result["steps"] == pytest.approx(50000 * 10 / 128)


@pytest.mark.parametrize(
    "extra, zero_rule",
    [(["--weight-decay", "0"], 2), (["--lambda-norm", "0"], 0)],
)
def test_json_writes_the_infinite_timescale_of_no_decay_as_null(extra, zero_rule, capsys):
    # JSON has no infinity: λ = 0 used to crash json.dumps(allow_nan=False)
    assert main([*BASE, "--epochs", "100", *extra, "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out and "NaN" not in out
    rows = json.loads(out)["rules"]
    assert rows[zero_rule]["timescale_epochs"] is None
    assert rows[zero_rule]["timescale_steps"] is None
    assert set(rows[zero_rule]["weight_decay"].values()) == {0.0}
    assert "no decay" in rows[zero_rule]["warning"]
    assert rows[1]["timescale_epochs"] == pytest.approx(10.0)  # the others stay numbers


def test_table_prints_the_infinite_timescale_as_inf(capsys):
    assert main([*BASE, "--epochs", "100", "--weight-decay", "0"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("yours"))
    assert row.split()[-2:] == ["inf", "inf"]
    assert "warning: yours (weight_decay = 0): λ = 0, no decay (infinite timescale)" in out


def test_help_says_how_json_writes_infinity(capsys):
    with pytest.raises(SystemExit):
        main(["suggest", "--help"])
    assert "null" in capsys.readouterr().out


def test_table_and_warnings(capsys):
    assert main([*BASE, "--epochs", "100", "--weight-decay", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "normalized (lambda_norm = 0.05)" in out and "yours (weight_decay = 0.01)" in out
    assert (
        "warning: yours (weight_decay = 0.01): timescale 256 epochs is longer than the run" in out
    )
    assert main([*BASE, "--epochs", "100", "--weight-decay", "50"]) == 0
    assert "shorter than one epoch" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--epochs", "10", "--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--epochs", "-1"], "argument --epochs: must be > 0, got -1"),
        (["--epochs", "10", "--batch-size", "-5"], "argument --batch-size: must be a positive"),
        (["--epochs", "10", "--dataset-size", "0"], "argument --dataset-size: must be a positive"),
        (["--epochs", "10", "--convention", "paper"], "argument --convention: invalid choice"),
        (["--epochs", "nan"], "argument --epochs: must be finite"),
        # conversions that divide by zero or over/underflow float64 (γ² = 0 at γ = 1e-300)
        (
            ["--epochs", "10", "--lr", "1e-300", "--weight-decay", "1e-300"],
            "argument --lr: 1e-300 is out of range",
        ),
        (["--epochs", "10", "--lr", "1e200"], "argument --lr: 1e+200 is out of range"),
        (
            ["--epochs", "10", "--lr", "1e-160", "--weight-decay", "1e-300"],
            "argument --weight-decay: 1e-300 is out of range at --lr 1e-160",
        ),
        (["--epochs", "10", "--timescale", "1e-310"], "argument --timescale: 1e-310 is out of"),
        (["--epochs", "10", "--lambda-norm", "1e308"], "argument --lambda-norm: 1e+308 is out"),
        (["--epochs", "1e308"], "argument --epochs: 1e+308 is out of range"),
        ([], "the following arguments are required: --epochs"),
        (["--epochs", "10", "--max-lr", "1e-4"], "argument --max-lr: 0.0001 is below --lr 0.001"),
        (["--epochs", "10", "--batch-size", "10" * 3], "argument --batch-size: 101010 is larger"),
        (["--epochs", "10", "--batch-size", "9" * 400], "argument --batch-size: must be at most"),
        # fewer than one step: N·T/b = 3.9e-298 printed as "0 steps", λ ≈ 2.5e150
        (["--epochs", "1e-300"], "argument --epochs: 1e-300 is less than one step"),
        (["--epochs", "1e-3"], "argument --epochs: 0.001 is less than one step: N·T/b = 0.391"),
        # a timescale under one step: γ·λ > 1, the decay overshoots zero (printed as "0" steps)
        (
            ["--epochs", "10", "--timescale", "1e-300"],
            "argument --timescale: 1e-300 is out of range at --lr 0.001: rule 'timescale",
        ),
        (
            ["--epochs", "10", "--weight-decay", "1e300"],
            "argument --weight-decay: 1e+300 is out of range at --lr 0.001",
        ),
        (
            ["--epochs", "10", "--lr", "2", "--weight-decay", "1"],
            "rule 'yours (weight_decay = 1)' gives a timescale of 0.5 steps",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line(extra, message):
    process = run_cli_here(*BASE, *extra)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], process.stderr
    assert process.stdout == ""


def test_the_installed_command_exits_2_with_one_line():
    """A refusal through the real entry point (``python -m decoupled``)."""
    process = run_cli(*BASE, "--epochs", "-1", timeout=60)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "argument --epochs: must be > 0, got -1" in lines[0]
    assert process.stdout == ""


def test_a_huge_step_count_is_printed_in_e_notation(capsys):
    # thousands separators wrote 1e100 epochs as a 103-digit number
    assert main([*BASE, "--epochs", "1e100"]) == 0
    assert "1e+100 epochs = 3.91e+102 steps" in capsys.readouterr().out


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("decoupled ")
    assert main([]) == 0
    assert "suggest" in capsys.readouterr().out
