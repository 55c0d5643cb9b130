"""`decoupled inspect` and `decoupled inspect fixed-points`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from decoupled.cli import main
from decoupled.lab.store import ResultStore

PLOTS = (
    "decay_distribution.png",
    "angular_update.png",
    "weight_norms.png",
    "decay_over_time.png",
    "decay_vs_grad_rms.png",
)


def test_inspect_writes_plots_table_and_monitor_rows(tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", "--task", "mnist1d", "--steps", "40", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("Adam + L2", "AdamW", "uniformity: CV across elements", "rank corr."):
        assert expected in text
    for name in PLOTS:
        assert (out / name).stat().st_size > 10_000, name
    store = ResultStore(out / "results.db", create=False)
    assert store.decay_table_runs() == [
        "inspect-mnist1d-adam",
        "inspect-mnist1d-adamw",
        "inspect-mnist1d-adamw-cautious",
    ]
    adamw = store.load_decay_table("inspect-mnist1d-adamw")
    assert {row.rate_cv for row in adamw.where(decayed=True)} == {0.0}
    # AdamW + CWD (arXiv 2510.12402): the mask decays a share of each tensor, c on it, 0 elsewhere
    cautious = store.load_decay_table("inspect-mnist1d-adamw-cautious").where(decayed=True)
    assert all(0 < row.rate_mean < row.lr * row.weight_decay for row in cautious)
    assert "AdamW + CWD" in text and "share of elements decayed (CWD mask)" in text
    adam = store.load_decay_table("inspect-mnist1d-adam")
    assert all(row.rate_grad_rms_spearman < -0.9 for row in adam.where(decayed=True))


def test_inspect_a_task_whose_adam_has_no_decay(tmp_path, capsys):
    """charlm's tuned Adam + L2 has λ = 0, so it decays no tensor: the plots still come."""
    out = tmp_path / "inspect"
    assert (
        main(["inspect", "--task", "charlm", "--steps", "4", "--every", "2", "--out", str(out)])
        == 0
    )
    assert "0.01, 0" in capsys.readouterr().out  # peak lr γ, λ of Adam + L2
    for name in PLOTS:
        assert (out / name).stat().st_size > 10_000, name


def test_inspect_fixed_points(tmp_path, capsys):
    out = tmp_path / "fp"
    assert main(["inspect", "fixed-points", "--steps", "2000", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exact ℓ∞ optimum" in text and "AdamW" in text
    # 2000 steps are not enough for AdamW (distance 0.2, KKT gap 0.03): the report says so
    assert "AdamW has not converged after 2000 steps" in text
    assert "Adam + L2 ends at the L2 optimum" in text
    assert (out / "fixed_points.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["--task", "nope"], "argument --task: Invalid task value: 'nope'"),
        (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["--steps", "ten"], "argument --steps: not a valid int: 'ten'"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--seed", "1" * 20], "argument --seed: must be at most 2**63 - 1"),
        (["--steps", "10", "--every", "20"], "argument --every: 20 is more than --steps (10)"),
        (["fixed-points", "--weight-decay", "-1"], "argument --weight-decay: must be > 0"),
        (["fixed-points", "--every", "5"], "argument --every: only for `inspect train`"),
        (["fixed-points", "--task", "mnist1d"], "argument --task: only for `inspect train`"),
        (["fixed-points", "--seed", "0"], "argument --seed: only for `inspect train`"),
        (["fixed-points", "--seed", "3"], "argument --seed: only for `inspect train`"),
        (["--weight-decay", "1"], "argument --weight-decay: only for `inspect fixed-points`"),
        # λ whose runs overflow float64: a crash in plotting (1e200), NaN rows (1e20, 20)
        (
            ["fixed-points", "--weight-decay", "1e200"],
            "argument --weight-decay: Invalid weight_decay value: 1e+200 (SGD + L2",
        ),
        (
            ["fixed-points", "--weight-decay", "1e20"],
            "argument --weight-decay: Invalid weight_decay value: 1e+20 (SGD + L2",
        ),
        (["fixed-points", "--weight-decay", "20"], "Invalid weight_decay value: 20.0 (SGD + L2"),
        (
            ["fixed-points", "--weight-decay", "1e-310"],
            "Invalid weight_decay value: 1e-310 (the bound 1/λ of AdamW's ℓ∞ ball overflows",
        ),
        (["--data-dir", "x"], "argument --data-dir: task mnist1d reads no data folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *args, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decoupled inspect: error: "), lines
    assert message in lines[0]
    assert not (tmp_path / "x").exists()  # nothing written before the arguments are checked


def test_train_defaults_task_and_seed_when_not_given(tmp_path, capsys):
    # --task and --seed default to None in the parser (so that fixed-points can refuse them);
    # train mode still fills in mnist1d and seed 0
    assert main(["inspect", "--steps", "2", "--out", str(tmp_path / "t")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "task mnist1d" in header and "seed 0" in header


def test_an_out_folder_with_a_foreign_results_db_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "results.db").write_text("not a database")
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--steps", "5", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("decoupled inspect: error: argument --out:") and "\n" not in error


def test_help_as_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "decoupled", "inspect", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for option in ("fixed-points", "--task", "--steps", "--every", "--out", "--weight-decay"):
        assert option in result.stdout
