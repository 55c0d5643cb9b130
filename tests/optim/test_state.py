"""State: torch interop both ways, round-trips, copies, and skipped non-finite steps."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import decoupled
from tests.helpers import assert_same_training_state, train, twin_models
from tests.optim.optim_db import cases

# the entries with a torch twin and state-test kwargs; interop on the paths exact with torch
INTEROP_CASES = cases(paths=lambda path: path.exact_twin, entries=lambda info: info.state_kwargs)
ROUND_TRIP_CASES = cases(entries=lambda info: info.state_kwargs)


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("info,path", INTEROP_CASES)
@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_interop_continues_identically(info, path, direction):
    """Train 20 steps with one library, save, load into the other, train 20 more: the result
    equals 40 uninterrupted steps of torch.optim."""
    ours_cls, torch_cls, kwargs = info.cls, info.torch_cls, info.state_kwargs
    first_cls, second_cls = (
        (torch_cls, ours_cls) if direction == "torch->ours" else (ours_cls, torch_cls)
    )
    extra = lambda cls: {"foreach": False} if cls is torch_cls else path.kwargs  # noqa: E731
    model, model_ref, shape = twin_models("convnet", torch.float64)

    first = first_cls(model.parameters(), **kwargs, **extra(first_cls))
    train(model, first, shape, 20, torch.float64, seed=1)
    second = second_cls(model.parameters(), **kwargs, **extra(second_cls))
    second.load_state_dict(save_and_load(first.state_dict()))
    if second_cls is torch_cls:  # torch's loaded groups bring the saved "fused"/"foreach";
        for group in second.param_groups:  # ours keep their own (tested: bit-identical here)
            group.update(extra(second_cls))
    train(model, second, shape, 20, torch.float64, seed=2)

    reference = torch_cls(model_ref.parameters(), foreach=False, **kwargs)
    train(model_ref, reference, shape, 20, torch.float64, seed=1)
    train(model_ref, reference, shape, 20, torch.float64, seed=2)
    assert_same_training_state(second, reference, model, model_ref)


@pytest.mark.parametrize("info,path", ROUND_TRIP_CASES)
def test_round_trip_deepcopy_and_pickle(info, path, monkeypatch):
    if path.hide_kernel:
        monkeypatch.setattr(decoupled.optim._build, "_ops", None)
    ours_cls, kwargs = info.cls, {**info.state_kwargs, **path.kwargs}
    model, _, shape = twin_models("mlp", torch.float64)
    optimizer = ours_cls(model.parameters(), **kwargs)
    train(model, optimizer, shape, 5, torch.float64)
    saved = copy.deepcopy(optimizer.state_dict())

    restored = ours_cls(model.parameters(), **kwargs)
    restored.load_state_dict(save_and_load(saved))
    assert restored.state_dict()["param_groups"] == saved["param_groups"]

    model_copy = copy.deepcopy(model)
    optimizer_copy = copy.deepcopy(optimizer)  # a deep copy refers to copied parameters…
    unpickled = pickle.loads(pickle.dumps(optimizer))
    for clone in (optimizer_copy, unpickled):
        assert type(clone) is ours_cls and clone.skip_nonfinite is False
        for p_orig, p_clone in zip(
            optimizer.param_groups[0]["params"], clone.param_groups[0]["params"]
        ):
            for key, value in optimizer.state[p_orig].items():
                torch.testing.assert_close(clone.state[p_clone][key], value, rtol=0, atol=0)
    # …and training the restored optimizer on a copy gives the same as the original
    train(model, optimizer, shape, 5, torch.float64, seed=3)
    rebuilt = ours_cls(model_copy.parameters(), **kwargs)
    rebuilt.load_state_dict(saved)
    train(model_copy, rebuilt, shape, 5, torch.float64, seed=3)
    assert_same_training_state(rebuilt, optimizer, model_copy, model)


SAVED_BY_OTHER_ALGORITHM = [
    (decoupled.Adam, lambda p: torch.optim.AdamW(p, lr=0.5, weight_decay=0.3), "AdamW"),
    (decoupled.Adam, lambda p: decoupled.AdamW(p, lr=0.5, weight_decay=0.3), "AdamW"),
    (decoupled.AdamW, lambda p: torch.optim.Adam(p, lr=0.5, weight_decay=0.3), "Adam"),
    (decoupled.AdamW, lambda p: decoupled.Adam(p, lr=0.5, weight_decay=0.3), "Adam"),
    (decoupled.SGD, lambda p: decoupled.SGDW(p, lr=0.5, weight_decay=0.3), "SGDW"),
    (decoupled.SGDW, lambda p: torch.optim.SGD(p, lr=0.5, weight_decay=0.3), "SGD"),
    (decoupled.SGDW, lambda p: decoupled.SGD(p, lr=0.5, weight_decay=0.3), "SGD"),
]


@pytest.mark.parametrize(
    "cls,make_saver,saver_name",
    SAVED_BY_OTHER_ALGORITHM,
    ids=[
        f"{saver}->{cls.__name__}-{i}" for i, (cls, _, saver) in enumerate(SAVED_BY_OTHER_ALGORITHM)
    ],
)
def test_state_saved_by_the_other_algorithm_is_refused_and_nothing_changes(
    cls, make_saver, saver_name
):
    """λ means a different thing in L2 and decoupled decay: such a checkpoint is refused, and
    the refusal happens before the optimizer's groups or state are touched."""
    param = torch.nn.Parameter(torch.ones(2))
    saver = make_saver([param])
    param.grad = torch.ones(2)
    saver.step()
    optimizer = cls([param], lr=1e-3)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(
        ValueError, match=f"saved by {saver_name}; load it into decoupled.{saver_name}"
    ):
        optimizer.load_state_dict(saver.state_dict())
    assert optimizer.state_dict() == before


def test_torch_and_older_dicts_load_into_the_matching_algorithm():
    param = torch.nn.Parameter(torch.zeros(2))
    decoupled.AdamW([param]).load_state_dict(torch.optim.AdamW([param]).state_dict())
    decoupled.SGD([param]).load_state_dict(torch.optim.SGD([param]).state_dict())
    older_sgdw = decoupled.SGDW([param], weight_decay=0.1).state_dict()
    del older_sgdw["param_groups"][0]["decoupled_weight_decay"]  # saved before the flag existed
    decoupled.SGDW([param]).load_state_dict(older_sgdw)
    with pytest.raises(ValueError, match="saved by SGDW"):
        decoupled.SGD([param]).load_state_dict(older_sgdw)
    older_torch_adamw = torch.optim.AdamW([param]).state_dict()  # torch < 2.7 had no flag
    del older_torch_adamw["param_groups"][0]["decoupled_weight_decay"]
    decoupled.AdamW([param]).load_state_dict(older_torch_adamw)  # cannot tell: trusted


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW, decoupled.SGD, decoupled.SGDW])
def test_decay_to_init_state_round_trips_before_and_without_a_first_step(cls):
    """With decay_to="init" a parameter's state holds only θ₀ until its first gradient (or
    forever, for a parameter that never gets one): loading, copying and pickling work."""
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = cls([used, unused], lr=0.1, weight_decay=0.1, decay_to="init")
    for stepped in (False, True):
        if stepped:
            used.grad = torch.ones(3)
            optimizer.step()
        saved = save_and_load(optimizer.state_dict())
        restored = cls([used, unused], lr=0.1, weight_decay=0.1, decay_to="init")
        restored.load_state_dict(saved)
        expected = optimizer.state_dict()["state"]
        for clone in (restored, copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
            state = clone.state_dict()["state"]
            assert {i: sorted(s) for i, s in state.items()} == {
                i: sorted(s) for i, s in expected.items()
            }
            for index, entries in expected.items():
                for key, value in entries.items():
                    assert torch.equal(torch.as_tensor(state[index][key]), torch.as_tensor(value))


def test_loaded_state_keeps_this_optimizers_fused_choice():
    """How steps are computed is this process's choice, like state_dtype: a torch dict
    (fused: None) does not switch an optimizer built with fused=False to the kernel."""
    param = torch.nn.Parameter(torch.ones(4))
    for cls in (decoupled.AdamW, decoupled.SGD):
        optimizer = cls([param], fused=False)
        optimizer.load_state_dict(cls([param], fused=None).state_dict())
        assert optimizer.param_groups[0]["fused"] is False


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGD])
def test_a_weight_decay_schedule_is_saved_as_its_latest_value_and_kept_on_load(cls):
    """A callable cannot go into a ``weights_only`` checkpoint (nor a lambda into any): the
    saved group holds the λ of the latest step; loading keeps the loading optimizer's
    schedule, and the run continues exactly as an uninterrupted one."""
    model, model_ref, shape = twin_models("mlp", torch.float64)
    schedule = lambda step: 0.1 / step  # noqa: E731  (a lambda: not picklable)
    first = cls(model.parameters(), lr=0.01, weight_decay=schedule)
    train(model, first, shape, 4, torch.float64, seed=1)
    saved = save_and_load(first.state_dict())
    assert saved["param_groups"][0]["weight_decay"] == pytest.approx(0.1 / 4)
    assert saved["param_groups"][0]["weight_decay_schedule"] is True

    second = cls(model.parameters(), lr=0.01, weight_decay=schedule)
    second.load_state_dict(saved)
    assert second.param_groups[0]["weight_decay"] is schedule
    assert "weight_decay_schedule" not in second.param_groups[0]
    train(model, second, shape, 4, torch.float64, seed=2)

    reference = cls(model_ref.parameters(), lr=0.01, weight_decay=schedule)
    train(model_ref, reference, shape, 4, torch.float64, seed=1)
    train(model_ref, reference, shape, 4, torch.float64, seed=2)
    assert_same_training_state(second, reference, model, model_ref)

    plain = cls(model.parameters(), lr=0.01, weight_decay=0.5)
    plain.load_state_dict(saved)  # no schedule here: the saved λ is used, as torch would
    assert plain.param_groups[0]["weight_decay"] == pytest.approx(0.1 / 4)


@pytest.mark.parametrize("cls", [decoupled.Adam, decoupled.AdamW, decoupled.SGD, decoupled.SGDW])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_nonfinite_leaves_everything_untouched(cls, bad):
    model, _, shape = twin_models("mlp", torch.float32)
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    if cls in (decoupled.SGD, decoupled.SGDW):
        kwargs["momentum"] = 0.9
    optimizer = cls(model.parameters(), skip_nonfinite=True, **kwargs)
    train(model, optimizer, shape, 3, torch.float32)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = copy.deepcopy(optimizer.state_dict()["state"])

    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(iter(model.parameters())).grad[0, 0] = bad  # one bad element anywhere
    optimizer.step()

    assert optimizer.skipped_steps == 1
    for p, before in zip(model.parameters(), before_params):
        assert torch.equal(p, before)
    after_state = optimizer.state_dict()["state"]
    for index, state in before_state.items():
        for key, value in state.items():
            assert torch.equal(after_state[index][key], value), key

    train(model, optimizer, shape, 1, torch.float32)  # finite again: steps resume
    assert optimizer.skipped_steps == 1
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before_params))


def test_without_skip_nonfinite_a_nan_gradient_behaves_as_in_torch():
    for ours_cls, torch_cls in [
        (decoupled.AdamW, torch.optim.AdamW),
        (decoupled.SGD, torch.optim.SGD),
    ]:
        params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
        ours, theirs = ours_cls([params[0]], lr=0.1), torch_cls([params[1]], lr=0.1, foreach=False)
        for p, opt in zip(params, (ours, theirs)):
            p.grad = torch.tensor([1.0, math.nan, 2.0])
            opt.step()
        torch.testing.assert_close(params[0], params[1], equal_nan=True, rtol=0, atol=0)
        assert ours.skipped_steps == 0


def test_parameters_without_gradient_are_not_touched():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    for cls in (decoupled.AdamW, decoupled.SGDW):
        optimizer = cls([used, unused], lr=0.1, weight_decay=0.5)
        used.sum().backward()
        optimizer.step()
        assert torch.equal(unused.detach(), torch.ones(2)) and unused not in optimizer.state
        assert not torch.equal(used.detach(), torch.ones(2))
        used.grad = None
