"""The runner: determinism, pairing by seed, divergence, and what a result holds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import decoupled
from decoupled.lab.custom import CustomTask
from decoupled.lab.store import config_key
from decoupled.lab.tasks import get_task
from decoupled.lab.tasks.base import Hyperparameters
from decoupled.lab.train import RunSpec, build_optimizer, decay_summary, run


@pytest.fixture(scope="module")
def mnist1d():
    task = get_task("mnist1d")
    return task, task.load()


def spec(optimizer="adamw", seed=0, steps=20, **kwargs):
    defaults = {"lr": 3e-3, "weight_decay": 0.1 if optimizer == "adamw" else 1e-4}
    return RunSpec(
        task="mnist1d", optimizer=optimizer, seed=seed, steps=steps, **{**defaults, **kwargs}
    )


def test_same_spec_same_result(mnist1d):
    task, data = mnist1d
    first, second = (run(spec(), task=task, data=data) for _ in range(2))
    assert first.status == second.status == "done"
    assert first.curves == second.curves and first.metric == second.metric
    assert first.weight_norms == second.weight_norms


def test_seed_changes_the_result(mnist1d):
    task, data = mnist1d
    assert (
        run(spec(seed=0), task=task, data=data).curves
        != run(spec(seed=1), task=task, data=data).curves
    )


def test_optimizers_with_the_same_seed_start_from_the_same_weights_and_batches(mnist1d):
    """With lr so small that the weights barely move, Adam and AdamW see the same losses."""
    task, data = mnist1d
    kwargs = dict(lr=1e-9, weight_decay=0.0, schedule="constant", eval_every=1, steps=5)
    adam, adamw = (run(spec(name, **kwargs), task=task, data=data) for name in ("adam", "adamw"))
    assert adam.curves["train_loss"] == pytest.approx(adamw.curves["train_loss"], rel=1e-6)


def test_result_contents(mnist1d):
    task, data = mnist1d
    result = run(spec(steps=30, eval_every=10, warmup_steps=5), task=task, data=data)
    assert result.curves["step"] == [10, 20, 30]
    assert len(result.curves["train_loss"]) == len(result.curves["metric"]) == 3
    assert result.curves["lr"][0] < 3e-3  # warm-up, then cosine
    assert 0.0 <= result.metric <= 1.0 and result.metric_name == "test_error"
    assert result.weight_norms["total"] > 0 and result.wall_time > 0
    assert result.decay_summary["cv"] < 1e-9  # decoupled: the same rate for every weight
    metrics = result.metrics()
    assert metrics["metric"] == result.metric and metrics["final_train_loss"] is not None


def test_adam_l2_decay_summary_is_uneven(mnist1d):
    task, data = mnist1d
    result = run(spec("adam", steps=30), task=task, data=data)
    summary = result.decay_summary
    assert summary["spread_p95_p5"] > 1.5 and summary["cv"] > 0.1


def test_cautious_decay_summary_counts_only_the_masked_elements():
    """AdamW + CWD: rate c where sign(m) agrees with sign(θ), 0 elsewhere; the median and the
    percentiles come from that mix, not from c alone."""
    torch.manual_seed(0)
    model = nn.Linear(40, 30)
    optimizer = decoupled.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, cautious=True)
    for _ in range(5):
        model.zero_grad()
        model(torch.randn(8, 40)).pow(2).mean().backward()
        optimizer.step()
    masks = [
        (torch.sign(optimizer.state[p]["exp_avg"]) * torch.sign(p.detach()) >= 0).flatten()
        for p in model.parameters()
    ]
    expected = torch.cat(masks).double() * (1e-2 * 0.1)
    assert 0.2 < float(torch.cat(masks).double().mean()) < 0.8  # both kinds occur
    p5, p50, p95 = torch.quantile(expected, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    summary = decay_summary(optimizer)
    assert summary["median"] == pytest.approx(p50.item())
    assert summary["p5"] == pytest.approx(p5.item()) and summary["p95"] == pytest.approx(p95.item())
    cv = (expected.std(correction=0) / expected.mean()).item()
    assert summary["cv"] == pytest.approx(cv, rel=1e-6)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_l2_decay_summary_is_the_formula_at_the_peak_lr(amsgrad):
    """γλ/(sqrt(v̂)+ε) per element at α, with v^max under amsgrad, after a schedule to lr 0."""
    torch.manual_seed(0)
    model = nn.Linear(40, 30)
    optimizer = decoupled.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3, amsgrad=amsgrad)
    for step in range(12):
        optimizer.param_groups[0]["lr"] = 1e-2 * (1 - step / 11)  # ends at 0
        model.zero_grad()
        model(torch.randn(8, 40) * (1 + step % 3)).pow(2).mean().backward()
        optimizer.step()
    group = optimizer.param_groups[0]
    rates = []
    for p in group["params"]:
        state = optimizer.state[p]
        v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"].double()
        v_hat = v / (1 - 0.999 ** float(state["step"]))
        rates.append((1e-2 * 1e-3 / (v_hat.sqrt() + group["eps"])).flatten())
    expected = torch.cat(rates)
    p5, p50, p95 = torch.quantile(expected, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    summary = decay_summary(optimizer)
    assert summary["median"] == pytest.approx(p50.item(), rel=1e-6)
    assert summary["p5"] == pytest.approx(p5.item(), rel=1e-6)
    assert summary["p95"] == pytest.approx(p95.item(), rel=1e-6)
    cv = (expected.std(correction=0) / expected.mean()).item()
    assert summary["cv"] == pytest.approx(cv, rel=1e-5)


def nan_task(nan_at_step: int) -> CustomTask:
    """A linear regression whose loss turns NaN at a given step."""
    counter = {"step": 0}

    def loss_fn(model, batch):
        counter["step"] += 1
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        return loss * math.nan if counter["step"] >= nan_at_step else loss

    def batches(seed):
        generator = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(8, 3, generator=generator)
            yield x, x.sum(1, keepdim=True)

    return CustomTask(
        "custom:nan",
        lambda: nn.Linear(3, 1),
        batches,
        lambda m: 0.5,
        loss_fn,
        "metric",
        False,
        50,
        5,
        {"adamw": Hyperparameters(0.01, 0.01)},
    )


def test_divergence_ends_the_run_as_diverged_not_a_crash():
    task = nan_task(nan_at_step=12)
    result = run(
        RunSpec("custom:nan", "adamw", 0.01, 0.01, seed=0, steps=50), task=task, data=task.load()
    )
    assert result.status == "diverged" and math.isnan(result.metric)
    assert result.curves["step"] == [5, 10]  # stopped at step 12, before any update with NaN


def test_a_blow_up_on_the_last_update_is_diverged_not_done(mnist1d):
    """No later loss can show it, so the finished weights are checked (both executors)."""
    from decoupled.lab.batched import run_batched

    task, data = mnist1d
    blow_up = spec("adam", steps=1, lr=1e38, schedule="constant")
    fine = spec("adam", steps=1, lr=1e-3, schedule="constant")
    assert run(blow_up, task=task, data=data).status == "diverged"
    assert run(fine, task=task, data=data).status == "done"
    cells = run_batched([blow_up, fine], task, data)
    assert [cell.status for cell in cells] == ["diverged", "done"]
    assert math.isnan(cells[0].metric) and not math.isnan(cells[1].metric)


def test_a_run_keeps_the_callers_random_stream(mnist1d):
    task, data = mnist1d
    torch.manual_seed(1234)
    run(spec(steps=2), task=task, data=data)
    after_run = torch.rand(3)
    torch.manual_seed(1234)
    assert torch.equal(after_run, torch.rand(3))


def _linear_task(train_batches) -> CustomTask:
    """Linear regression on the (x, y) batches of a user's ``train_batches``."""

    def loss_fn(model, batch):
        x, y = batch
        return (model(x) - y).pow(2).mean()

    return CustomTask(
        "custom:linear",
        lambda: nn.Linear(3, 1),
        train_batches,
        lambda m: 0.5,
        loss_fn,
        "metric",
        False,
        10,
        5,
        {"adamw": Hyperparameters(0.01, 0.01)},
    )


def _fixed_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, generator=generator) for _ in range(count)]
    return [(x, x.sum(1, keepdim=True)) for x in xs]


def test_a_finite_re_iterable_is_read_epoch_after_epoch():
    data = _fixed_batches(3)
    seen = []
    task = _linear_task(lambda seed: data)
    original = task._loss_fn
    task._loss_fn = lambda model, batch: seen.append(batch) or original(model, batch)
    result = run(RunSpec("custom:linear", "adamw", 0.01, 0.01, seed=0, steps=7), task=task)
    assert result.status == "done"
    assert [[b[0] is d[0] for d in data].index(True) for b in seen] == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize(
    "train_batches",
    [lambda seed: iter(_fixed_batches(3)), lambda seed: (b for b in _fixed_batches(3))],
)
def test_a_one_shot_iterator_that_ends_says_so(train_batches):
    task = _linear_task(train_batches)
    with pytest.raises(ValueError, match="ran out after 3 batches.*endless generator"):
        run(RunSpec("custom:linear", "adamw", 0.01, 0.01, seed=0, steps=7), task=task)


def test_an_empty_loader_says_so():
    task = _linear_task(lambda seed: [])
    with pytest.raises(ValueError, match="ran out after 0 batches"):
        run(RunSpec("custom:linear", "adamw", 0.01, 0.01, seed=0, steps=7), task=task)


def test_batches_may_be_named_tuples_or_dicts():
    from collections import namedtuple

    from decoupled.lab.loop import to_device as _to_device

    Batch = namedtuple("Batch", "inputs targets")
    x, y = _fixed_batches(1)[0]
    moved = _to_device(Batch(x, y), torch.device("meta"))
    assert type(moved) is Batch and moved.inputs.device.type == "meta"
    moved = _to_device({"inputs": x, "targets": [y, "label"]}, torch.device("meta"))
    assert moved["inputs"].device.type == "meta" and moved["targets"][0].device.type == "meta"
    assert moved["targets"][1] == "label"
    task = _linear_task(lambda seed: [Batch(x, y)])
    result = run(RunSpec("custom:linear", "adamw", 0.01, 0.01, seed=0, steps=3), task=task)
    assert result.status == "done"


@pytest.mark.parametrize(
    "changes,regex",
    [
        ({"optimizer": "lion"}, "Invalid optimizer value: 'lion'"),
        ({"steps": 0}, "Invalid steps value: 0"),
        ({"seed": -1}, "Invalid seed value: -1"),
        ({"lr": 0.0}, "Invalid lr value: 0.0"),
        ({"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
        ({"schedule": "step"}, "Invalid schedule value: 'step'"),
        ({"threads": 0}, "Invalid threads value: 0"),
        ({"warmup_steps": 1}, r"Invalid warmup_steps value: 1 \(must be below steps, 1\)"),
    ],
)
def test_bad_specs(changes, regex):
    args = dict(task="mnist1d", optimizer="adam", lr=1e-3, weight_decay=0.0, seed=0, steps=1)
    with pytest.raises(ValueError, match=regex):
        RunSpec(**{**args, **changes}).validate()


def test_a_run_uses_its_specs_thread_count_and_restores_the_callers(mnist1d):
    task, data = mnist1d
    seen = []
    previous = torch.get_num_threads()
    run(
        spec(threads=2),
        task=task,
        data=data,
        on_progress=lambda *_: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {2} and torch.get_num_threads() == previous


def test_the_run_key_holds_what_changes_the_numbers_and_nothing_else():
    """Thread count and batching change float rounding, so they are part of a run's key;
    decay_scale is not, for L2 optimizers, which do not use it."""
    key = lambda s: config_key(s.config())  # noqa: E731
    assert key(spec(threads=1)) != key(spec(threads=2))
    assert key(spec()) != key(spec(batched=True))
    assert key(spec("adam", decay_scale="lr")) == key(spec("adam", decay_scale="schedule"))
    assert key(spec("adamw", decay_scale="lr")) != key(spec("adamw", decay_scale="schedule"))


def test_threads_per_run_depends_on_the_requested_workers_only(monkeypatch):
    from decoupled.lab import workflow

    monkeypatch.setattr(workflow.os, "cpu_count", lambda: 8)
    assert [workflow.threads_per_run(w) for w in (None, 8, 4, 1, 16)] == [1, 1, 2, 8, 1]


def test_a_stored_run_sends_heartbeats_while_it_trains(mnist1d, tmp_path, monkeypatch):
    from decoupled.lab.executor import preload, run_into_store
    from decoupled.lab.store import ResultStore

    beats = []
    monkeypatch.setattr(ResultStore, "heartbeat", lambda self, key: beats.append(key) or True)
    preload(*mnist1d)
    assert run_into_store(spec(steps=20), str(tmp_path / "results.db")) == "done"
    assert len(beats) >= 5 and len(set(beats)) == 1  # one per evaluation (every 4 steps)


def test_biases_and_norms_are_not_decayed_by_the_runner(mnist1d):
    task, _ = mnist1d
    model = task.build_model()
    optimizer = build_optimizer(spec(), model)
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0][0]
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][0]
    assert any(p is bn.weight for p in no_decay["params"])
    assert decay_summary(optimizer) != {}


# ---------------------------------------------------------------- the optimizer registry


def test_the_registry_describes_each_optimizer_as_its_class_behaves():
    """Each entry's decay kind is what its class does, its torch twin runs the same update,
    and the defaults the batched executor passes to the functional core are the class's."""
    import inspect

    from decoupled.diagnostics.rates import decay_kind
    from decoupled.optim.registry import REGISTRY, pairs

    assert list(REGISTRY) == ["adam", "adamw", "sgd", "sgdw", "adamw-cautious", "sgdw-cautious"]
    assert list(pairs()) == [("adam", "adamw"), ("sgd", "sgdw")]
    for name, info in REGISTRY.items():
        model = nn.Linear(3, 2)
        optimizer = info.cls(model.parameters(), lr=0.1, weight_decay=0.1)
        assert decay_kind(optimizer).decoupled == info.decoupled, name
        assert decay_kind(optimizer).family == info.family, name
        assert optimizer.param_groups[0].get("cautious", False) == name.endswith("-cautious")
        if info.variant_of is None:
            assert REGISTRY[info.twin].twin == name and REGISTRY[info.twin].decay != info.decay
        else:  # a variant's L2 twin is its base's (Adam has no cautious decay)
            assert info.twin == REGISTRY[info.variant_of].twin
            assert REGISTRY[info.variant_of].family == info.family
        signature = inspect.signature(info.cls).parameters
        if info.family == "adam":
            assert signature["betas"].default == (info.defaults["beta1"], info.defaults["beta2"])
            assert signature["eps"].default == info.defaults["eps"]
        else:
            assert {k: signature[k].default for k in info.defaults} == dict(info.defaults)
        assert ("momentum" in signature) == info.momentum
        assert ("state_dtype" in signature) == info.state_dtype
        assert ("decay_scale" in signature) == info.takes_decay_scale
        if info.torch_twin is not None:
            torch.manual_seed(0)
            ours, theirs = nn.Linear(3, 2), nn.Linear(3, 2)
            theirs.load_state_dict(ours.state_dict())
            first = info.cls(ours.parameters(), lr=0.1, weight_decay=0.1)
            second = info.torch_twin(theirs.parameters(), lr=0.1, weight_decay=0.1)
            for _ in range(3):
                for net, opt in ((ours, first), (theirs, second)):
                    opt.zero_grad()
                    net(torch.ones(4, 3)).square().sum().backward()
                    opt.step()
            torch.testing.assert_close(ours.weight, theirs.weight)


def test_an_unknown_optimizer_is_one_error_everywhere(mnist1d):
    import re

    from decoupled.lab.plan import plan_compare

    message = re.escape(
        "Invalid optimizer value: 'adan' "
        "(choose from adam, adamw, sgd, sgdw, adamw-cautious, sgdw-cautious)"
    )
    with pytest.raises(ValueError, match=f"^{message}$"):
        spec(optimizer="adan").validate()
    with pytest.raises(ValueError, match=f"^{message}$"):
        plan_compare(mnist1d[0], ["adan"], 1, 10)


# ---------------------------------------------------------------- the one training loop


def test_inspect_trains_exactly_as_the_runner_does(mnist1d):
    """The monitored run of `decoupled inspect` and the runner share one loop: the same spec
    ends at the same metric (the monitor only reads)."""
    from decoupled.lab.inspection import train_monitored

    task, data = mnist1d
    runner_spec = spec(optimizer="adam", steps=12)
    result = run(runner_spec, task=task, data=data, device="cpu")
    inspected = train_monitored(task, data, runner_spec, every=4)
    assert inspected.metric == result.metric
    assert len(inspected.table) and inspected.label == "Adam + L2"


def test_the_loop_stops_at_the_step_that_diverged_and_evaluates_on_schedule():
    from decoupled.lab.loop import run_loop

    evaluated = []
    assert run_loop(10, 4, lambda step: True, evaluated.append) is None
    assert evaluated == [4, 8, 10]
    evaluated.clear()
    assert run_loop(10, 4, lambda step: step < 6, evaluated.append) == 6
    assert evaluated == [4]


PATH_OF_UPDATE = {"kernel": "kernel", "fused": "torch-fused"}  # by the update's name prefix


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize(
    "changes",
    [{"optimizer": "adamw"}, {"optimizer": "adam"}, {"optimizer": "sgdw", "momentum": 0.9},
     {"optimizer": "adamw", "state_dtype": "bfloat16"},
     {"optimizer": "adamw", "state_dtype": "int8"}],
    ids=["adamw", "adam", "sgdw", "adamw-bf16", "adamw-int8"],
)  # fmt: skip
def test_the_run_key_names_the_path_that_really_steps(mnist1d, monkeypatch, kernel, changes):
    """The kernel and the other paths round differently (final losses 0.43001533349 vs
    0.43001533647), so a run's key holds the path that stepped it: each path the optimizers
    chose during a run is the one its spec names, and the key changes with it."""
    import decoupled.optim._kernels as kernels
    from decoupled.optim import adam as adam_module
    from decoupled.optim import sgd as sgd_module

    if not kernel:
        monkeypatch.setattr(kernels, "kernel_ops", lambda: None)
    elif not decoupled.optim.kernel_available():
        pytest.skip("the C++ kernel cannot be built here")
    chosen = []

    def spying(choose):
        def choose_and_record(*args, **kwargs):
            update = choose(*args, **kwargs)
            prefix = update.__name__.split("_")[0]
            chosen.append(PATH_OF_UPDATE.get(prefix, "reference"))
            return update

        return choose_and_record

    for module, name in ((adam_module, "choose_adam_update"), (sgd_module, "choose_sgd_update")):
        monkeypatch.setattr(module, name, spying(getattr(module, name)))
    run_spec = spec(steps=3, **changes)
    task, data = mnist1d
    run(run_spec, task=task, data=data)
    assert chosen and set(chosen) == {run_spec.step_path()}
    assert run_spec.config()["step_path"] == run_spec.step_path()
    expected = {"adamw": "torch-fused", "adam": "torch-fused"}.get(
        run_spec.optimizer if run_spec.state_dtype is None else "", "reference"
    )
    assert run_spec.step_path() == ("kernel" if kernel else expected)


def test_a_batched_run_is_keyed_by_the_reference_path():
    assert spec(batched=True).step_path() == "reference"
    assert spec(batched=True).key() != spec().key()
