"""Step each parameter inside ``backward()``, as soon as its gradient is complete, and free
that gradient at once ("gradient release").

An optimizer step normally needs every gradient at the same time: θ, g and the state all live
together, and g is as large as θ. Stepping a parameter from its ``post_accumulate_grad`` hook
(torch >= 2.1) and setting its ``.grad`` to None right after leaves only the gradients that
autograd holds at that moment, a few tensors instead of all of them. FlashOptim (Gonzalez
Ortiz et al. 2026, arXiv 2602.23349) counts AdamW at 5 bytes per parameter this way, against
7 with the gradients kept; PyTorch's tutorial "How to save memory by fusing the optimizer step
into the backward pass" does it with one optimizer per parameter.

Here the optimizer stays one object: its param groups, schedulers, ``state_dict`` and
checkpoints are unchanged. Each hook runs the optimizer's own update on the one parameter,
with its group's hyperparameters as they are at that moment and the stochastic-rounding
position it has in ``optimizer.step()`` (its place among the optimizer's parameters). When
every parameter gets a gradient, the result is that of ``backward()`` then ``step()``, bit for
bit (``tests/optim/test_in_backward.py``). At the end of the backward pass (autograd's
``queue_callback``, as DistributedDataParallel uses it) each group that stepped counts the
step (``decay_steps``, the argument of a ``weight_decay`` schedule).

What cannot work this way is refused or documented:

- ``skip_nonfinite=True`` (the skip is decided from all gradients, which never coexist) and
  ``capturable``/``differentiable`` groups are refused;
- the gradients are gone after ``backward()``: no clipping by the global norm, no
  accumulation over micro-batches (each ``backward()`` steps), no GradScaler (its scaled
  gradients would be stepped unscaled; bfloat16 autocast needs no scaler);
- ``optimizer.step()`` finds no gradients and changes nothing, and its step hooks do not run;
- parameters frozen (``requires_grad=False``) when the hooks are set, or added to the
  optimizer later, get no hook: they step only through a new ``step_in_backward``.
"""

from __future__ import annotations

from itertools import accumulate

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
        self.stepped_groups: list[dict] = []  # the groups stepped in the current pass
        self._pass_open = False
        groups = optimizer.param_groups
        firsts = accumulate((len(group["params"]) for group in groups), initial=0)
        self._place: dict[Tensor, tuple[dict, int]] = {}
        self._handles = []
        for group, first in zip(groups, firsts):
            for index, param in enumerate(group["params"]):
                if param.requires_grad:  # a frozen one never gets a gradient (nor a hook)
                    self._place[param] = (group, first + index)
                    self._handles.append(param.register_post_accumulate_grad_hook(self._step_one))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _step_one(self, param: Tensor) -> None:
        grad = self.optimizer._grad_of(param)
        if grad is None:
            return
        if not self._pass_open:  # the first hook of this backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
            self._pass_open = True
        optimizer, (group, position) = self.optimizer, self._place[param]
        params, grads = [param], [grad]
        try:
            decay = optimizer._decay_terms(group, params)
            if group.get("fused"):
                check_fusable(params)
            optimizer._check_step(group, grads, decay)
            optimizer._update_group(group, params, grads, decay, first_position=position)
        except BaseException:
            self._end_pass()  # the groups already stepped count their step; backward stops
            raise
        if not any(g is group for g in self.stepped_groups):
            self.stepped_groups.append(group)
        param.grad = None

    def _end_pass(self) -> None:
        for group in self.stepped_groups:
            group["decay_steps"] += 1
        if self.stepped_groups:  # for torch's LR schedulers, which warn if step() never ran
            self.optimizer._opt_called = True
        self.stepped_groups = []
        self._pass_open = False


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
