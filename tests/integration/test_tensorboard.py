"""decoupled.integrations: the monitor's scalars (one naming scheme), a plain loop's
TensorBoard logger, and the event files read back with TensorBoard's own EventAccumulator.

The logger tests need the ``tensorboard`` extra and are skipped, saying so, without it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import decoupled
from decoupled.diagnostics import DecayMonitor
from decoupled.integrations import TensorBoardDecayLogger, decay_scalars, read_scalars
from decoupled.integrations.scalars import LAYER_FIELDS, MODEL_FIELDS


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))


def _train(model, optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 4, generator=generator)).pow(2).mean().backward()
        optimizer.step()


def assert_matches_table(scalars: dict[str, dict[int, float]], table, step_offset: int = 0):
    """Every decayed tensor's logged fields equal the monitor's rows (TensorBoard stores
    float32), at the monitor's steps shifted by ``step_offset``; all values finite."""
    decayed = table.where(decayed=True)
    assert len(decayed)
    for row in decayed:
        for field in LAYER_FIELDS:
            expected = getattr(row, field)
            tag = f"decay/{row.tensor}/{field}"
            if math.isnan(expected):  # no theory value: not logged
                assert row.step + step_offset not in scalars.get(tag, {})
                continue
            assert scalars[tag][row.step + step_offset] == pytest.approx(expected, rel=1e-6)
    steps = sorted({row.step + step_offset for row in decayed})
    for field in MODEL_FIELDS:
        assert sorted(scalars[f"decay_model/{field}"]) == steps
    assert all(math.isfinite(v) for values in scalars.values() for v in values.values())


def test_decay_scalars_names_and_whole_model_values():
    model = _model()
    optimizer = decoupled.AdamW(decoupled.param_groups(model, 0.1, verbose=False), lr=1e-2)
    with DecayMonitor(optimizer, model, every=1) as monitor:
        _train(model, optimizer, 1)
    rows = list(monitor.table)
    scalars = decay_scalars(rows)
    decayed = [row for row in rows if row.decayed]
    assert [row.tensor for row in decayed] == ["0.weight", "2.weight"]
    defined = {
        f"decay/{row.tensor}/{field}"
        for row in decayed
        for field in LAYER_FIELDS
        if math.isfinite(getattr(row, field))
    }
    assert set(scalars) == defined | {f"decay_model/{field}" for field in MODEL_FIELDS}
    assert "decay/0.weight/angular_update" in defined
    assert scalars["decay_model/weight_norm"] == pytest.approx(
        math.hypot(*(row.weight_norm for row in decayed))
    )
    assert scalars["decay_model/rate_mean"] == pytest.approx(1e-2 * 0.1)  # γλ for every element
    assert scalars["decay_model/rate_cv"] == 0.0
    assert decay_scalars([row for row in rows if not row.decayed]) == {}


def test_plain_loop_writes_the_monitors_table_to_tensorboard(tmp_path):
    tensorboard = pytest.importorskip(
        "torch.utils.tensorboard", reason="needs the tensorboard extra"
    )
    model = _model()
    optimizer = decoupled.create_optimizer(model, "adam", lr=1e-2, weight_decay=1e-3)
    writer = tensorboard.SummaryWriter(str(tmp_path))
    with TensorBoardDecayLogger(optimizer, model, writer, every_n_steps=2) as logger:
        _train(model, optimizer, 6)
    writer.close()
    assert sorted(set(logger.monitor.table.column("step"))) == [2, 4, 6]
    assert_matches_table(read_scalars(tmp_path), logger.monitor.table)
    # Adam + L2 spreads its decay over the elements: the logged CV says so
    assert read_scalars(tmp_path)["decay_model/rate_cv"][6] > 0


def test_read_scalars_without_event_files_says_where(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
    with pytest.raises(FileNotFoundError, match=f"no TensorBoard event files under {tmp_path}"):
        read_scalars(tmp_path)


@pytest.mark.parametrize("every_n_steps", [0, -3, 2.5, True])
def test_logging_interval_must_be_a_positive_integer(every_n_steps):
    model = _model()
    optimizer = decoupled.AdamW(model.parameters())
    with pytest.raises(ValueError, match=rf"Invalid every_n_steps value: {every_n_steps!r} "):
        TensorBoardDecayLogger(optimizer, model, writer=None, every_n_steps=every_n_steps)


def test_unsupported_optimizer_is_refused_naming_the_supported_ones():
    model = _model()
    with pytest.raises(TypeError, match=r"TensorBoardDecayLogger cannot monitor .*support Adam, "
                       r"AdamW, SGD and SGDW .* not RMSprop"):  # fmt: skip
        TensorBoardDecayLogger(torch.optim.RMSprop(model.parameters()), model, writer=None)


def test_figure_rebuilds_the_table_and_draws_the_inspect_panels(tmp_path):
    tensorboard = pytest.importorskip(
        "torch.utils.tensorboard", reason="needs the tensorboard extra"
    )
    pytest.importorskip("matplotlib", reason="drawing needs the 'lab' extra (matplotlib)")
    from decoupled.integrations.figure import logged_run, main, table_from_scalars

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 1))
    optimizer = decoupled.create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    writer = tensorboard.SummaryWriter(str(tmp_path / "adamw"))
    with TensorBoardDecayLogger(optimizer, model, writer, every_n_steps=2) as logger:
        _train(model, optimizer, 6)
    writer.close()
    rebuilt = table_from_scalars(read_scalars(tmp_path / "adamw"))
    monitored = logger.monitor.table.where(decayed=True)
    assert [(r.step, r.tensor) for r in rebuilt] == [(r.step, r.tensor) for r in monitored]
    for ours, theirs in zip(rebuilt, monitored):
        assert ours.decay_kind == theirs.decay_kind == "decoupled"
        assert ours.scale_invariant == theirs.scale_invariant
        assert ours.numel == theirs.numel and ours.lr == pytest.approx(theirs.lr, rel=1e-6)
        assert ours.angular_update == pytest.approx(theirs.angular_update, rel=1e-6)
    assert rebuilt[0].scale_invariant and rebuilt[0].tensor == "0.weight"
    run = logged_run(tmp_path / "adamw")
    assert (run.spec.optimizer, run.spec.lr, run.spec.weight_decay) == ("adamw", 1e-2, 0.1)

    main([str(tmp_path / "adamw"), "--out", str(tmp_path / "figures")])
    names = {"angular_update.png", "weight_norms.png", "decay_over_time.png"}
    assert {path.name for path in (tmp_path / "figures").iterdir()} == names
    with pytest.raises(SystemExit) as exit_info:  # a logdir without event files: one line, 2
        main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2
