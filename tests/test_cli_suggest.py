"""`decoupled suggest` and the command line's error behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from decoupled.cli import main

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
        ([], "the following arguments are required: --epochs"),
    ],
)
def test_bad_values_exit_2_with_one_line(extra, message):
    process = subprocess.run(
        [sys.executable, "-m", "decoupled", *BASE, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], process.stderr
    assert process.stdout == ""


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("decoupled ")
    assert main([]) == 0
    assert "suggest" in capsys.readouterr().out
