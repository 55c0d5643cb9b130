"""DecayMonitor: what it records, its table's round-trips, scale invariance, and equilibrium
angular updates against theory (Kosson et al. 2024)."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch
from torch import nn

import decoupled
from decoupled.diagnostics import (
    DecayMonitor,
    DecayTable,
    adamw_angular_update,
    angle_between,
    scale_invariant_tensors,
    sgd_l2_angular_update,
    sgdw_angular_update,
    structurally_scale_invariant,
)
from decoupled.lab.store import ResultStore


def normalized_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),  # 0: feeds a BatchNorm, bias or not: invariant
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16, bias=False),  # 3: feeds a LayerNorm without a bias: invariant
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 3),  # 6: the head, not invariant
    )


def regression_batch(seed: int = 0, batch: int = 32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, generator=generator), torch.randn(batch, 3, generator=generator)


def mse(model, batch):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean()


def train(model, optimizer, steps: int, seed: int = 0):
    for step in range(steps):
        loss = mse(model, regression_batch(seed + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_closure_that_computes_the_gradients_inside_step_is_recorded_from_step_1():
    """Lightning's way: ``step(closure)``, the gradients made after the pre-hooks ran. The
    first step has none before it; it is recorded all the same, without the frozen tensor."""
    model = normalized_net()
    frozen = nn.Parameter(torch.ones(3))
    groups = decoupled.param_groups(model, 0.1, verbose=False)
    groups[1]["params"].append(frozen)
    optimizer = decoupled.AdamW(groups, lr=1e-2)
    monitor = DecayMonitor(optimizer, model, every=1)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)

        def closure(step=step):
            loss = mse(model, regression_batch(step))
            loss.backward()
            return loss

        optimizer.step(closure)
    table = monitor.table
    assert sorted(set(table.column("step"))) == [1, 2]
    assert set(table.tensors()) == {name for name, _ in model.named_parameters()}


def test_records_every_n_steps_for_tensors_with_gradients():
    model = normalized_net()
    frozen = nn.Parameter(torch.ones(3))  # in the optimizer, never gets a gradient
    groups = decoupled.param_groups(model, 0.1, verbose=False)
    groups[1]["params"].append(frozen)
    optimizer = decoupled.AdamW(groups, lr=1e-2)
    monitor = DecayMonitor(optimizer, model, every=3)
    train(model, optimizer, 10)
    table = monitor.table
    assert sorted(set(table.column("step"))) == [3, 6, 9] and monitor.steps == 10
    # every tensor of the model, named as in the model; not the one without a gradient
    assert set(table.tensors()) == {name for name, _ in model.named_parameters()}
    assert len(table) == 3 * len(list(model.parameters()))
    decayed = {row.tensor for row in table.where(decayed=True)}
    assert decayed == {"0.weight", "3.weight", "6.weight"}  # LayerNorm/BatchNorm/biases not
    assert {row.tensor for row in table.where(scale_invariant=True)} == {"0.weight", "3.weight"}
    for row in table.where(decayed=True):
        assert row.rate_mean == pytest.approx(1e-3) and row.rate_cv == 0.0
        assert row.decay_kind == "decoupled" and row.lr == 1e-2 and row.weight_decay == 0.1
    invariant = table.where(decayed=True, scale_invariant=True)
    assert all(r.predicted_angular_update == pytest.approx(adamw_angular_update(1e-3, 0.9))
               for r in invariant)  # fmt: skip
    assert all(math.isnan(r.predicted_angular_update) for r in table.where(tensor="6.weight"))
    monitor.remove()
    train(model, optimizer, 6)
    assert len(monitor.records) == len(table)  # detached: nothing more recorded


def test_norms_and_angles_match_a_direct_measurement():
    model = normalized_net()
    optimizer = decoupled.Adam(decoupled.param_groups(model, 1e-2, verbose=False), lr=1e-2)
    train(model, optimizer, 4)
    weight = model[0].weight
    before = weight.detach().clone()
    with DecayMonitor(optimizer, model, every=1) as monitor:
        train(model, optimizer, 1, seed=100)
        row = monitor.table.where(tensor="0.weight")[0]
    assert row.weight_norm == pytest.approx(weight.detach().norm().item(), rel=1e-6)
    assert row.update_norm == pytest.approx((weight.detach() - before).norm().item(), rel=1e-5)
    assert row.angular_update == pytest.approx(angle_between(before, weight.detach()), rel=1e-9)
    assert row.grad_to_weight == pytest.approx(weight.grad.norm().item() / before.norm().item())
    assert row.decay_kind == "L2" and row.rate_cv > 0 and row.rate_grad_rms_spearman < -0.99
    v_hat = optimizer.state[weight]["exp_avg_sq"] / (1 - 0.999**5)
    assert row.grad_rms_p50 == pytest.approx(v_hat.sqrt().median().item(), rel=1e-6)
    assert row.rate_mean == pytest.approx((1e-4 / (v_hat.sqrt() + 1e-8)).mean().item(), rel=1e-5)


def test_bad_arguments():
    optimizer = decoupled.AdamW([nn.Parameter(torch.ones(2))])
    for every in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="Invalid every value"):
            DecayMonitor(optimizer, every=every)
    with pytest.raises(TypeError, match="RMSprop"):
        DecayMonitor(torch.optim.RMSprop([nn.Parameter(torch.ones(2))]))


def test_table_round_trips_through_csv_and_sqlite(tmp_path):
    model = normalized_net()
    optimizer = decoupled.Adam(decoupled.param_groups(model, 1e-2, verbose=False), lr=1e-2)
    with DecayMonitor(optimizer, model, every=2) as monitor:
        train(model, optimizer, 6)
    table = monitor.table
    assert any(math.isnan(r.predicted_angular_update) for r in table)  # NaNs survive too
    assert DecayTable.read_csv(monitor.to_csv(tmp_path / "decay.csv")) == table

    db = tmp_path / "results.db"
    store = ResultStore(db)  # a real results store: the table goes beside `runs`
    store.save_decay_table("adam-run", monitor.table)
    store.save_decay_table("adam-run", table)  # written again: replaced, not doubled
    store.save_decay_table("other", DecayTable(table.rows[:3]))
    assert store.load_decay_table("adam-run") == table
    assert len(store.load_decay_table("other")) == 3
    assert store.decay_table_runs() == ["adam-run", "other"]
    store.close()
    with sqlite3.connect(db) as connection:
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
    assert {"runs", "decay_monitor"} <= tables
    assert DecayTable.read_csv(tmp_path / "decay.csv") != DecayTable(table.rows[1:])

    fresh = tmp_path / "fresh" / "results.db"  # a new file becomes a proper results store
    fresh.parent.mkdir()
    with ResultStore(fresh) as new_store:
        new_store.save_decay_table("run", table)
    with ResultStore(fresh, create=False) as reopened:
        assert reopened.records() == [] and len(reopened.load_decay_table("run"))
    with pytest.raises(FileNotFoundError):
        ResultStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_scale_invariance_structural_and_numerical():
    # seeded: the numerical check's 1e-3 tolerance can call a near-linear tanh or a tiny bias
    # "invariant" for some initializations (2 of 40 seeds)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),  # mean subtraction removes the bias: 0.weight invariant
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.LayerNorm(16),  # keeps a per-feature bias: 3.weight NOT invariant
        nn.Linear(16, 16, bias=False),
        nn.ReLU(),  # positively homogeneous: 5.weight still invariant
        nn.Dropout(0.0),
        nn.LayerNorm(16, elementwise_affine=False),
        nn.Linear(16, 16, bias=False),
        nn.Tanh(),  # not homogeneous: 9.weight NOT invariant
        nn.BatchNorm1d(16),
        nn.Linear(16, 3),  # the head
    )
    structural = structurally_scale_invariant(model)
    assert structural == {"0.weight", "5.weight"}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    numerical = scale_invariant_tensors(model, mse, regression_batch())
    assert structural <= numerical
    assert not {"3.weight", "9.weight", "12.weight", "12.bias"} & numerical
    assert "11.bias" not in numerical  # zero at initialization: skipped, not "invariant"
    # LayerNorm 4's scale feeds Linear 5 (no bias) → ReLU → LayerNorm: invariant as well
    assert "4.weight" in numerical
    for key, value in model.state_dict().items():  # weights and running stats untouched
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    "between,invariant",
    [
        ([], True),  # BatchNorm's mean subtraction cancels the bias
        ([nn.Identity()], True),
        ([nn.ReLU()], False),  # a bias that passed a ReLU is no longer a constant shift
        ([nn.LeakyReLU()], False),
        ([nn.Dropout(0.5)], False),  # the mask scales the bias per element
    ],
    ids=["direct", "identity", "relu", "leaky_relu", "dropout"],
)
def test_a_bias_is_cancelled_only_if_it_reaches_the_batchnorm_unchanged(between, invariant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), *between, nn.BatchNorm1d(16), nn.Linear(16, 3))
    assert ("0.weight" in structurally_scale_invariant(model)) is invariant
    assert ("0.weight" in scale_invariant_tensors(model, mse, regression_batch())) is invariant


@pytest.mark.parametrize(
    "pool,invariant",
    [
        (nn.AvgPool1d(3, 1), True),
        (nn.AvgPool1d(3, 1, padding=1, count_include_pad=False), True),
        (nn.AvgPool1d(3, 1, padding=1), False),  # zeros counted: the bias shrinks at the ends
        (nn.MaxPool1d(3, 1, padding=1), True),  # max pads with −inf: a constant passes
    ],
    ids=["avg", "avg-pad-excluded", "avg-pad-counted", "max-pad"],
)
def test_a_conv_bias_is_cancelled_only_through_pools_that_pass_a_constant(pool, invariant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), pool, nn.BatchNorm1d(4), nn.Flatten())
    length = 6 if pool.padding in (0, (0,)) else 8  # 10 → conv 8 → pool
    batch = (torch.randn(8, 2, 10), torch.randn(8, 4 * length))
    assert ("0.weight" in structurally_scale_invariant(model)) is invariant
    assert ("0.weight" in scale_invariant_tensors(model, mse, batch)) is invariant


def test_local_response_norm_is_not_a_scale_invariant_normalization():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, bias=False), nn.LocalResponseNorm(2), nn.Flatten())
    batch = (torch.randn(8, 2, 10), torch.randn(8, 32))
    assert structurally_scale_invariant(model) == set()
    assert scale_invariant_tensors(model, mse, batch) == set()


def equilibrium_angle(make_optimizer, steps: int = 1500, last: int = 500) -> tuple[float, float]:
    """Mean measured angular update of a scale-invariant layer (Linear → LayerNorm, pure-noise
    targets: the random-walk regime of the theory) over the last steps, and the prediction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.LayerNorm(32, elementwise_affine=False))
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(0)
    with DecayMonitor(optimizer, model, every=1) as monitor:
        for _ in range(steps):
            inputs = torch.randn(8, 16, generator=generator)
            targets = torch.randn(8, 32, generator=generator)
            loss = ((model(inputs) - targets) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    rows = monitor.table.rows[-last:]
    assert all(row.scale_invariant for row in rows)
    return sum(row.angular_update for row in rows) / len(rows), rows[-1].predicted_angular_update


@pytest.mark.parametrize(
    "make, predicted",
    [
        # c = γλ = 1e-2: equilibrium within ~1/(2c) = 50 steps
        (
            lambda p: decoupled.AdamW(p, lr=1e-2, weight_decay=1.0, betas=(0.9, 0.99)),
            adamw_angular_update(1e-2, 0.9),
        ),
        (
            lambda p: decoupled.SGDW(p, lr=0.1, momentum=0.9, weight_decay=0.1),
            sgdw_angular_update(1e-2, 0.9),
        ),
        (
            lambda p: decoupled.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
            sgd_l2_angular_update(0.1, 0.1, 0.9),
        ),
    ],
    ids=["AdamW", "SGDW", "SGD+L2"],
)
def test_equilibrium_angular_update_matches_theory(make, predicted):
    measured, recorded_prediction = equilibrium_angle(make)
    assert recorded_prediction == pytest.approx(predicted)
    assert measured == pytest.approx(predicted, rel=0.2)


def test_torch_optim_adamw_gives_the_same_records_as_decoupled_adamw():
    tables = []
    for optimizer_class, path in ((torch.optim.AdamW, {}), (decoupled.AdamW, {"fused": False})):
        model = normalized_net()
        groups = decoupled.param_groups(model, 0.1, verbose=False)
        optimizer = optimizer_class(groups, lr=1e-2, **path)
        with DecayMonitor(optimizer, model, every=2) as monitor:
            train(model, optimizer, 6)
        tables.append(monitor.table)
    assert tables[0] == tables[1]  # the optimizers are bit-identical, so are the measurements


def test_a_group_added_after_attaching_is_recorded_by_position():
    model = normalized_net()
    optimizer = decoupled.AdamW(model.parameters(), lr=1e-2)
    monitor = DecayMonitor(optimizer, model, every=1)
    extra = nn.Parameter(torch.ones(4))
    optimizer.add_param_group({"params": [extra], "weight_decay": 0.5})
    extra.grad = torch.ones(4)
    optimizer.step()
    row = monitor.table.where(tensor="group1.param0")[0]
    assert row.decayed and row.rate_mean == pytest.approx(1e-2 * 0.5)
