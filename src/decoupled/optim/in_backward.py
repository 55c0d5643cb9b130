"""Step each parameter inside ``backward()``, as soon as its gradient is complete, and free
that gradient at once ("gradient release").

An optimizer step normally needs every gradient at the same time: θ, g and the state all live
together, and g is as large as θ. Stepping a parameter from its ``post_accumulate_grad`` hook
(torch >= 2.1) and setting its ``.grad`` to None right after leaves only the gradients that
autograd holds at that moment, a few tensors instead of all of them. FlashOptim (Gonzalez
Ortiz et al. 2026, arXiv 2602.23349) counts AdamW at 5 bytes per parameter this way, against
7 with the gradients kept; PyTorch's tutorial "How to save memory by fusing the optimizer step
into the backward pass" does it with one optimizer per parameter.

Here the optimizer stays one object: its param groups (read at each hook, so a loaded state dict or
a scheduler's lr takes effect), ``state_dict`` and checkpoints are unchanged. Each hook runs the
optimizer's own update on the one parameter, keyed for stochastic rounding as ``step()`` keys it
when every parameter that takes a gradient has one: the number of parameters in the earlier groups,
frozen ones included, plus its index among its group's parameters that required gradients when the
hooks were set. So the result is that of ``backward()`` then ``step()``, bit for bit
(``tests/optim/test_in_backward.py``), when every parameter that takes a gradient gets one and each
group's parameters share one dtype. Otherwise it agrees to rounding: ``step()`` moves the positions
of the parameters after one without a gradient (a head unused in this pass), which changes the
stochastic rounding's bits (bfloat16 and int8 state, compensated weights), and picks one path for a
whole group (for a group mixing float32 and bfloat16, ``step()`` runs the reference loop on all of
it; each hook runs the kernel on its own parameter).

**One step per backward pass.** A group counts a step (``decay_steps``, the argument of a
``weight_decay`` schedule) when the first of its parameters steps in a pass, and the parameters
stepped after it take the same λ. A pass is one call into autograd's engine from outside a
backward (``loss.backward()``, ``torch.autograd.backward``), found on the hook's thread as
the outermost ``torch.autograd.graph._engine_run_backward`` frame: the backward of a
reentrant checkpointed segment calls the engine again from inside that pass, and stays in
it. Hooks on a GPU's autograd thread do not see the caller's frames; there a pass is one
graph task, and a nested one (reentrant checkpointing on a GPU) continues the pass it runs
in. On any thread, a hook of a parameter that already stepped in the pass starts a new one.

What cannot work this way is refused or documented:

- ``skip_nonfinite=True`` (the skip is decided from all gradients, which never coexist) and
  ``capturable``/``differentiable`` groups are refused, at ``step_in_backward`` and at each
  pass;
- the gradients are gone after ``backward()``: no clipping by the global norm, no
  accumulation over micro-batches (each ``backward()`` steps), no GradScaler (its gradients
  would be stepped still multiplied by the loss scale; bfloat16 autocast needs no scaler), no
  DistributedDataParallel or FSDP (they reduce the gradients in hooks of their own: DDP
  after these, so each replica would step on its own gradient; not tested with FSDP);
- optimizers other than Adam, AdamW, SGD and SGDW are refused (``with_decoupled_decay``'s
  and torch's have no one-parameter update here);
- ``optimizer.step()`` finds no gradients and changes nothing, and the optimizer's step
  pre/post hooks do not run for the steps taken in backward;
- parameters frozen (``requires_grad=False``) when the hooks are set, or added to the
  optimizer later, get no hook: they keep their gradients, which ``optimizer.step()`` would
  step (counting the group's step again); ``remove()`` and a new ``step_in_backward`` take
  them in;
- a step refused inside a hook (a bad β, a sparse gradient) stops ``backward()``; that
  parameter keeps its gradient (the next ``backward()`` adds to it unless it is cleared),
  the ones stepped before it in the pass keep their step;
- a parameter is changed in place while backward still runs: a second ``backward()``
  through a graph that saved it (``retain_graph=True``) fails on its version counter, and
  a custom Function that reads a parameter it did not save sees it stepped;
- the last pass's outermost engine frame is kept until the next pass (with its locals, the
  loss tensor and its graph: with ``retain_graph=True``, the saved activations too), so
  that a new pass cannot take its address.
"""

from __future__ import annotations

import sys
import threading

import torch
from torch import Tensor

from decoupled.optim._base import DecayOptimizer
from decoupled.optim._checks import check_fusable


class BackwardSteps:
    """The hooks that step ``optimizer``'s parameters during ``backward()``; ``remove()``
    takes them off (``optimizer.step()`` then works as before)."""

    def __init__(self, optimizer: DecayOptimizer):
        _check_steppable(optimizer)
        self.optimizer = optimizer
        self._lock = threading.Lock()  # hooks of parameters on different devices: other threads
        self._pass: object = None  # this pass's key (_pass_key), kept alive while it lasts
        self._stepped: set[int] = set()  # the parameters (ids) stepped in this pass
        self._counted: list[dict] = []  # the groups that counted their step in this pass
        self._place: dict[Tensor, tuple[int, int]] = {}  # group index, index in the group
        self._handles = []
        for group_index, group in enumerate(optimizer.param_groups):
            taking = [p for p in group["params"] if p.requires_grad]  # frozen: no hook allowed
            for index, param in enumerate(taking):
                self._place[param] = (group_index, index)
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_one))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pass = None

    @torch.no_grad()
    def _step_one(self, param: Tensor) -> None:
        with self._lock:
            self._step_locked(param)

    def _step_locked(self, param: Tensor) -> None:
        optimizer = self.optimizer
        grad = optimizer._grad_of(param)
        if grad is None:
            return
        key = _pass_key()
        if id(param) in self._stepped or (key is not None and key != self._pass):
            _check_steppable(optimizer)
            self._stepped, self._counted = set(), []
            self._pass = key
        group_index, index = self._place[param]
        group = optimizer.param_groups[group_index]
        counted = any(g is group for g in self._counted)
        # the whole step sees the group's count from before this pass, as in step(): its λ,
        # and the rounding step of compensated SGD (sgd.py)
        before = group["decay_steps"] - counted
        group["decay_steps"] = before
        try:
            decay = optimizer._decay_terms(group, [param])
            if group.get("fused"):
                check_fusable([param])
            optimizer._check_step(group, [grad], decay)
            optimizer._update_group(
                group, [param], [grad], decay, first_position=self._first(group_index) + index
            )
        finally:
            group["decay_steps"] = before + counted
        if not counted:  # this pass's step, counted once the group's first update succeeded
            group["decay_steps"] += 1
            self._counted.append(group)
            optimizer._opt_called = True  # torch's LR schedulers warn if step() never ran
        self._stepped.add(id(param))
        param.grad = None

    def _first(self, group_index: int) -> int:
        """The rounding position of a group's first parameter, as ``step()`` gives it: the
        parameters of the groups before it, all of them."""
        return sum(len(group["params"]) for group in self.optimizer.param_groups[:group_index])


_ENGINE_CALL = getattr(torch.autograd.graph, "_engine_run_backward", None)
_FUNCTION_BACKWARD = torch.autograd.function.BackwardCFunction.apply


def _pass_key() -> object:
    """What identifies the running backward pass from a hook: the outermost engine call on
    this thread (a frame object: a later pass has another one, even at the same address,
    since the previous one is kept); None inside an engine call made from a Function's
    backward whose own pass runs on another thread (reentrant checkpointing on a GPU): it
    continues the pass; else the graph task's id (a GPU's autograd thread)."""
    outermost, inside_a_function, frame = None, False, sys._getframe(1)
    while frame is not None:
        if _ENGINE_CALL is not None and frame.f_code is _ENGINE_CALL.__code__:
            outermost, inside_a_function = frame, False
        elif outermost is not None and frame.f_code is _FUNCTION_BACKWARD.__code__:
            inside_a_function = True
        frame = frame.f_back
    if outermost is None:
        return torch._C._current_graph_task_id()
    return None if inside_a_function else outermost


def step_in_backward(optimizer: DecayOptimizer) -> BackwardSteps:
    """Step ``optimizer``'s parameters inside ``backward()`` and free their gradients; returns
    the hooks' handle (``remove()`` undoes it).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = decoupled.AdamW(model.parameters(), lr=1e-3)
        >>> steps = decoupled.optim.step_in_backward(optimizer)
        >>> model(torch.randn(8, 4)).square().mean().backward()  # stepped: grads are None
        >>> steps.remove()
    """
    return BackwardSteps(optimizer)


def _check_steppable(optimizer) -> None:
    if not isinstance(optimizer, DecayOptimizer):
        raise TypeError(
            f"step_in_backward takes a decoupled optimizer (Adam, AdamW, SGD, SGDW), not "
            f"{type(optimizer).__name__}: it runs that optimizer's update on one parameter"
        )
    if optimizer.skip_nonfinite:
        raise ValueError(
            "step_in_backward with skip_nonfinite=True: the skip is decided from every "
            "gradient at once, and stepped in backward they never coexist"
        )
    for index, group in enumerate(optimizer.param_groups):
        for option in ("capturable", "differentiable"):
            if group.get(option):
                raise ValueError(
                    f"step_in_backward with {option}=True (param group {index}): that step "
                    "runs as one graph over all the parameters"
                )
