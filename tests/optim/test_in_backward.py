"""``step_in_backward``: each parameter stepped from its gradient hook, its gradient freed, with
the result of ``backward()`` then ``step()`` bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import decoupled
from decoupled.optim import step_in_backward
from tests.helpers import assert_same_training_state


def model(dtype=torch.float32) -> nn.Module:
    """Six parameters, two above one int8 block (256 elements), one a partial block."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 3)
    ).to(dtype)


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 12, generator=generator).to(next(net.parameters()).dtype)
    return net(x).float().square().mean()


def two_groups(net: nn.Module, **second) -> list[dict]:
    params = list(net.parameters())
    return [{"params": params[:3]}, {"params": params[3:], **second}]


def lambda_schedule(step: int) -> float:
    return 0.05 / step


CONFIGS = {
    "AdamW kernel": (decoupled.AdamW, {"weight_decay": 0.1}, {}),
    "AdamW reference": (decoupled.AdamW, {"weight_decay": 0.1, "fused": False}, {}),
    "Adam L2 amsgrad": (decoupled.Adam, {"weight_decay": 0.01, "amsgrad": True}, {}),
    "AdamW bfloat16 state": (decoupled.AdamW, {"state_dtype": torch.bfloat16}, {}),
    "AdamW int8 state": (decoupled.AdamW, {"state_dtype": "int8"}, {"lr": 3e-3}),
    "AdamW cautious to init": (decoupled.AdamW, {"cautious": True, "decay_to": "init"}, {}),
    "AdamW λ schedule": (decoupled.AdamW, {"weight_decay": lambda_schedule}, {}),
    "SGDW momentum": (decoupled.SGDW, {"momentum": 0.9, "weight_decay": 0.1}, {"lr": 0.05}),
    "SGD nesterov": (decoupled.SGD, {"momentum": 0.9, "nesterov": True}, {}),
}


def twins(cls, options, second, dtype=torch.float32):
    ours, theirs = model(dtype), model(dtype)
    make = lambda net: cls(two_groups(net, **second), lr=1e-2, **options)  # noqa: E731
    return ours, make(ours), theirs, make(theirs)


def train_both(ours, in_backward, theirs, stepped, steps=5, scheduler=False):
    schedulers = (
        [torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5) for o in (in_backward, stepped)]
        if scheduler
        else []
    )
    steps_in_backward = step_in_backward(in_backward)
    for step in range(steps):
        loss_of(ours, step).backward()
        assert all(p.grad is None for p in ours.parameters()), "a gradient was kept"
        loss_of(theirs, step).backward()
        stepped.step()
        stepped.zero_grad()
        for s in schedulers:
            s.step()
    steps_in_backward.remove()


@pytest.mark.filterwarnings("error::UserWarning")  # torch's LR schedulers: step() "ran"
@pytest.mark.parametrize("name", list(CONFIGS))
def test_stepping_in_backward_is_backward_then_step_bit_for_bit(name):
    cls, options, second = CONFIGS[name]
    ours, in_backward, theirs, stepped = twins(cls, options, second)
    train_both(ours, in_backward, theirs, stepped, scheduler=name.startswith("SGDW"))
    assert_same_training_state(in_backward, stepped, ours, theirs)
    for mine, its in zip(in_backward.param_groups, stepped.param_groups):
        assert mine["decay_steps"] == its["decay_steps"] == 5
        assert mine["lr"] == its["lr"]


@pytest.mark.parametrize("cls", [decoupled.AdamW, decoupled.SGDW])
def test_compensated_bfloat16_weights_step_alike_in_backward(cls):
    options = {"momentum": 0.9} if cls is decoupled.SGDW else {"state_dtype": "int8"}
    ours, in_backward, theirs, stepped = twins(cls, options, {}, dtype=torch.bfloat16)
    train_both(ours, in_backward, theirs, stepped)
    assert_same_training_state(in_backward, stepped, ours, theirs)
    assert any("remainder" in key for key in in_backward.state[next(ours.parameters())])


def test_at_most_two_gradients_are_alive_at_once():
    net = model()
    optimizer = decoupled.AdamW(net.parameters(), lr=1e-3)
    alive = []
    for p in net.parameters():  # registered first: runs before the step frees the gradient
        p.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(q.grad is not None for q in net.parameters()))
        )
    step_in_backward(optimizer)
    loss_of(net, 0).backward()
    assert len(alive) == 6 and max(alive) <= 2  # a layer's weight and bias, at most


def test_remove_gives_back_the_ordinary_step():
    net = model()
    optimizer = decoupled.AdamW(net.parameters(), lr=1e-3)
    step_in_backward(optimizer).remove()
    before = [p.detach().clone() for p in net.parameters()]
    loss_of(net, 0).backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    optimizer.step()
    assert not any(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_refused_step_stops_backward_and_the_next_pass_steps_again():
    net = model()
    optimizer = decoupled.AdamW(net.parameters(), lr=1e-3)
    step_in_backward(optimizer)
    before = copy.deepcopy(net.state_dict())
    optimizer.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="1.5"):
        loss_of(net, 0).backward()
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused step"
    assert optimizer.param_groups[0]["decay_steps"] == 0 and not optimizer.state
    optimizer.param_groups[0]["betas"] = (0.9, 0.999)
    for p in net.parameters():
        p.grad = None
    loss_of(net, 1).backward()
    assert optimizer.param_groups[0]["decay_steps"] == 1
    assert all(float(optimizer.state[p]["step"]) == 1 for p in net.parameters())


def test_what_cannot_step_in_backward_is_refused():
    net = model()
    with pytest.raises(TypeError, match="not AdamW"):
        step_in_backward(torch.optim.AdamW(net.parameters()))
    with pytest.raises(ValueError, match="skip_nonfinite"):
        step_in_backward(decoupled.AdamW(net.parameters(), skip_nonfinite=True))
    with pytest.raises(ValueError, match="differentiable=True"):
        step_in_backward(decoupled.AdamW(net.parameters(), differentiable=True))
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, "int8"])
def test_a_frozen_layer_is_left_out_and_the_rest_steps_as_step_does(state_dtype):
    """The frozen bias is first in its group: the parameters after it round at the positions
    step() gives them (it counts the ones with gradients)."""
    options = {"weight_decay": 0.1, "state_dtype": state_dtype}
    ours, in_backward, theirs, stepped = twins(decoupled.AdamW, options, {})
    for net in (ours, theirs):
        net[2].requires_grad_(False)
    frozen = [p.detach().clone() for p in ours[2].parameters()]
    train_both(ours, in_backward, theirs, stepped, steps=3)
    assert_same_training_state(in_backward, stepped, ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(frozen, ours[2].parameters()))


def test_sparse_gradients_step_where_the_optimizer_takes_them_and_are_refused_elsewhere():
    def embedding_and_loss():
        torch.manual_seed(0)
        table = nn.Embedding(10, 4, sparse=True)
        return table, lambda: table(torch.tensor([1, 3, 3])).square().sum()

    table, loss = embedding_and_loss()
    step_in_backward(decoupled.AdamW(table.parameters()))
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        loss().backward()
    (ours, ours_loss), (theirs, theirs_loss) = embedding_and_loss(), embedding_and_loss()
    in_backward, stepped = (decoupled.SGD(t.parameters(), lr=0.1) for t in (ours, theirs))
    step_in_backward(in_backward)
    ours_loss().backward()
    theirs_loss().backward()
    stepped.step()
    assert ours.weight.grad is None and torch.equal(ours.weight, theirs.weight)
    assert not torch.equal(ours.weight, embedding_and_loss()[0].weight)


class FailOnce(torch.autograd.Function):
    """Identity whose backward raises the first time: a pass that dies between two hooks."""

    armed = True

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if FailOnce.armed:
            FailOnce.armed = False
            raise RuntimeError("failed in backward")
        return grad


def test_each_pass_counts_one_step_after_a_pass_that_died_in_backward():
    net = model()
    optimizer = decoupled.AdamW(net.parameters(), lr=1e-2, weight_decay=lambda_schedule)
    step_in_backward(optimizer)
    x = torch.randn(4, 12)
    FailOnce.armed = True
    with pytest.raises(RuntimeError, match="failed in backward"):
        net[4](FailOnce.apply(net[:4](x))).square().mean().backward()
    assert optimizer.param_groups[0]["decay_steps"] == 1  # the last layer stepped
    for p in net.parameters():
        p.grad = None
    for passes in (2, 3, 4):
        net[4](FailOnce.apply(net[:4](x))).square().mean().backward()
        assert optimizer.param_groups[0]["decay_steps"] == passes
    assert float(optimizer.state[net[0].weight]["step"]) == 3
    assert float(optimizer.state[net[4].weight]["step"]) == 4


@pytest.mark.parametrize("segment", ["first layers", "last layer", "two segments"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_segments_step_once_per_backward(use_reentrant, segment):
    """Reentrant checkpointing steps the segment's parameters in a nested graph task: after
    the outer task's first hooks (segment first) or before them (segment last)."""
    from torch.utils.checkpoint import checkpoint

    ours, in_backward, theirs, stepped = twins(
        decoupled.AdamW, {"weight_decay": lambda_schedule}, {}
    )
    step_in_backward(in_backward)
    for step in range(3):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
        x.requires_grad_()  # reentrant checkpointing needs an input that takes a gradient
        for net in (ours, theirs):
            if segment == "first layers":
                out = net[4](checkpoint(net[:4], x, use_reentrant=use_reentrant))
            elif segment == "last layer":
                out = checkpoint(net[4], net[:4](x), use_reentrant=use_reentrant)
            else:  # every parameter in a segment: no hook runs in the outer graph task
                inner = checkpoint(net[:2], x, use_reentrant=use_reentrant)
                out = checkpoint(net[2:], inner, use_reentrant=use_reentrant)
            out.square().mean().backward()
        stepped.step()
        stepped.zero_grad()
    assert_same_training_state(in_backward, stepped, ours, theirs)
    assert [g["decay_steps"] for g in in_backward.param_groups] == [3, 3]


def test_a_loaded_state_dict_and_a_changed_lr_reach_the_hooks():
    net = model()
    optimizer = decoupled.AdamW(net.parameters(), lr=1e-2)
    step_in_backward(optimizer)
    loss_of(net, 0).backward()
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # new group dicts
    optimizer.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in net.parameters()]
    loss_of(net, 1).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert optimizer.param_groups[0]["decay_steps"] == 2


def test_skip_nonfinite_set_after_the_hooks_is_refused_at_the_next_pass():
    net = model()
    optimizer = decoupled.AdamW(net.parameters(), lr=1e-2)
    step_in_backward(optimizer)
    optimizer.skip_nonfinite = True
    with pytest.raises(ValueError, match="skip_nonfinite"):
        loss_of(net, 0).backward()
    assert not optimizer.state or all("step" not in s for s in optimizer.state.values())


def test_a_pass_after_one_that_died_is_a_new_pass_even_on_other_parameters():
    """Two heads on one trunk: the pass through head 1 dies after head 1 stepped; the next
    pass, through head 2, steps parameters that did not step in it."""
    torch.manual_seed(0)
    trunk, head1, head2 = nn.Linear(12, 8), nn.Linear(8, 1), nn.Linear(8, 1)
    params = [*trunk.parameters(), *head1.parameters(), *head2.parameters()]
    optimizer = decoupled.AdamW(params, lr=1e-2, weight_decay=lambda_schedule)
    step_in_backward(optimizer)
    x = torch.randn(4, 12)
    FailOnce.armed = True
    with pytest.raises(RuntimeError, match="failed in backward"):
        head1(FailOnce.apply(trunk(x))).sum().backward()
    assert optimizer.param_groups[0]["decay_steps"] == 1
    head2(trunk(x)).sum().backward()
    assert optimizer.param_groups[0]["decay_steps"] == 2
    assert float(optimizer.state[trunk.weight]["step"]) == 1
