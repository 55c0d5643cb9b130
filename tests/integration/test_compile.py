"""torch.compile: a training step that calls ``optimizer.step()``, with the lr changed every step
by a torch lr scheduler, compiles and stops recompiling after a warm-up (pytorch issues 106802,
107076), like torch.optim.AdamW under the same setup.

Where the step function breaks into several graphs (torch 2.13, both for torch.optim.AdamW and
for ours; seen with ``TORCH_LOGS=graph_breaks``):

* ``loss.backward()``: Dynamo does not trace ``Tensor.backward`` (the forward is one graph);
* ``optimizer.step()``: an lr scheduler wraps ``step`` in a function of ``lr_scheduler.py``,
  which Dynamo skips; the optimizer's own ``step`` frame is then compiled by itself, as one
  graph holding the whole update of every parameter (checked below);
* ``optimizer.zero_grad()``: skipped by Dynamo on purpose, it runs eagerly.

Warm-up: torch's AdamW creates its state while tracing (Dynamo special-cases torch's
``_init_group``), ours creates it lazily inside the first step, so our step compiles twice:
once with the state initialization, once for every later step. A tensor lr is a graph input
and never causes a recompilation. A float lr: for Adam, the second value makes Dynamo treat it
as a symbolic float and it then stays; for SGD (torch's and ours), ``add_(grad, alpha=-lr)``
needs a concrete number, so every new float lr recompiles — hence the tensor lr.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import decoupled

# torch's own compile machinery still calls torch.jit.script_method (deprecated in 2.13).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

STEPS, WARMUP = 6, 2


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(optimizer_class, lr, *, backend=None, steps=STEPS, **kwargs):
    """Run ``steps`` steps of a (compiled, if ``backend``) step function; return the model,
    the lrs seen, and the graphs compiled by the end of warm-up and by the end."""
    torch._dynamo.reset()
    model = _tiny_model()
    if isinstance(lr, torch.Tensor):
        lr = lr.clone()  # schedulers fill a tensor lr in place: one tensor per run
    optimizer = optimizer_class(model.parameters(), lr=lr, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))

    def step_fn(inputs, targets):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend(backend)(graph_module, example_inputs)

    step = torch.compile(step_fn, backend=counting_backend) if backend else step_fn
    lrs = []
    for index in range(steps):
        if index == WARMUP:
            graphs_after_warmup = len(graphs)
        # After warm-up, any recompilation raises instead of silently compiling again.
        with torch._dynamo.config.patch(error_on_recompile=index >= WARMUP):
            step(inputs, targets)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        scheduler.step()
    return model, lrs, graphs_after_warmup if backend else 0, graphs


def _calls(graph_module, method: str) -> int:
    return sum(node.target == method for node in graph_module.graph.nodes)


# (optimizer, kwargs, the in-place op that updates each parameter in the step's graph)
ADAM_CASES = [
    pytest.param(decoupled.AdamW, {"weight_decay": 0.1}, "lerp_", id="decoupled.AdamW"),
    pytest.param(decoupled.Adam, {"weight_decay": 0.1}, "lerp_", id="decoupled.Adam"),
    pytest.param(torch.optim.AdamW, {"weight_decay": 0.1}, "lerp_", id="torch.optim.AdamW"),
]
SGD_KWARGS = {"momentum": 0.9, "weight_decay": 0.1}
SGD_CASES = [
    pytest.param(decoupled.SGDW, SGD_KWARGS, "add_", id="decoupled.SGDW"),
    pytest.param(decoupled.SGD, SGD_KWARGS, "add_", id="decoupled.SGD"),
    pytest.param(torch.optim.SGD, SGD_KWARGS, "add_", id="torch.optim.SGD"),
]


def _check_compiled_run(optimizer_class, kwargs, update_op, lr):
    # aot_eager: Dynamo + AOTAutograd without code generation; recompilation is decided by
    # Dynamo's guards, the same for every backend (the inductor test below checks the numbers).
    model, lrs, after_warmup, graphs = _train(optimizer_class, lr, backend="aot_eager", **kwargs)
    assert len(set(lrs)) == STEPS  # the scheduler really changed the lr each step
    assert len(graphs) == after_warmup, "recompiled after warm-up"
    # The whole update, every parameter, is in one graph: no graph break inside step().
    n_params = len(list(model.parameters()))
    assert max(_calls(g, update_op) for g in graphs) >= n_params
    eager_model, eager_lrs, _, _ = _train(optimizer_class, lr, **kwargs)
    assert lrs == eager_lrs
    for compiled, eager in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("optimizer_class,kwargs,update_op", ADAM_CASES + SGD_CASES)
def test_tensor_lr_changed_by_a_scheduler_does_not_recompile(optimizer_class, kwargs, update_op):
    _check_compiled_run(optimizer_class, kwargs, update_op, torch.tensor(1e-2))


@pytest.mark.parametrize("optimizer_class,kwargs,update_op", ADAM_CASES)
def test_float_lr_compiles_once_more_then_stays_for_adam(optimizer_class, kwargs, update_op):
    _check_compiled_run(optimizer_class, kwargs, update_op, 1e-2)


@pytest.mark.parametrize("optimizer_class,kwargs,update_op", SGD_CASES)
def test_float_lr_recompiles_every_step_for_sgd_as_in_torch(optimizer_class, kwargs, update_op):
    """SGD's ``param.add_(grad, alpha=-lr)`` (torch's and ours) needs a concrete number, so
    Dynamo specializes on a float lr and recompiles when it changes: use a tensor lr."""
    with pytest.raises(torch._dynamo.exc.RecompileError, match="lr"):
        _train(optimizer_class, 1e-2, backend="aot_eager", **kwargs)


@pytest.mark.parametrize(
    "optimizer_class", [decoupled.AdamW, decoupled.Adam], ids=lambda c: c.__name__
)
def test_inductor_compiled_step_matches_torch_eager(optimizer_class):
    """Real code generation (C++ on the CPU): the compiled run equals torch.optim's eager one."""
    torch_class = torch.optim.AdamW if optimizer_class.decoupled else torch.optim.Adam
    kwargs = {"weight_decay": 0.1}
    model, _, after_warmup, graphs = _train(
        optimizer_class, torch.tensor(1e-2), backend="inductor", **kwargs
    )
    assert len(graphs) == after_warmup
    reference, _, _, _ = _train(torch_class, torch.tensor(1e-2), foreach=False, **kwargs)
    for compiled, eager in zip(model.parameters(), reference.parameters()):
        # Inductor fuses and reorders float ops: equal to rounding, not bit for bit.
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
