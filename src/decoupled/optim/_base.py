"""What every `decoupled` optimizer shares: the step template, skipped steps, GradScaler's
protocol (the argument checks are in ``_checks.py``).

The step template follows torch.optim (``torch/optim/adam.py``): ``step()`` gathers, per
parameter group, the parameters that have a gradient and their state, then calls one
functional core with keyword-only hyperparameters. Subclasses supply ``_init_state`` and
``_update_group``; everything else (closures, sparse-gradient checks, ``skip_nonfinite``)
lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import Any, NamedTuple

import torch
from torch import Tensor

from decoupled.optim._capturable import device_skip_flag
from decoupled.optim._checks import (  # noqa: F401  (re-exported: the optimizers import them here)
    DECOUPLED_OPTIONS,
    ImplementationConflict,
    as_float,
    check_argument,
    check_fusable,
    check_group,
    check_params_argument,
    check_weight_decay,
    decay_defaults,
    is_number,
    torch_implementation_options,
)
from decoupled.optim._compensated import check_compensate
from decoupled.optim._layout import in_layout_of
from decoupled.optim._loaded_state import check_like_param
from decoupled.optim.decay import check_cautious, decay_rate, unscale_shared_, weight_decay_at


def is_zero(value: float | Tensor) -> bool:
    """True for a Python zero only. A tensor (a tensor lr times λ) counts as nonzero without
    being read: ``tensor != 0`` in an ``if`` is a data-dependent branch that breaks a
    ``torch.compile`` graph, and applying a zero rate (``θ·(1 − 0)``) leaves θ bit-identical."""
    return not isinstance(value, Tensor) and value == 0


def step_value(step: Tensor) -> float | Tensor:
    """Adam's step count for the bias corrections, as torch's ``_get_value`` reads it: a Python
    number in eager mode (faster, and bit-identical to torch), the tensor itself while
    ``torch.compile`` traces (``.item()`` would break the graph)."""
    if torch.compiler.is_compiling():
        return step
    return step.item()


def _given_group_declines_lambda_norm(param_group: dict) -> bool:
    """Decided from a group as the user gives it: whether it sets ``weight_decay=0`` itself
    without a ``lambda_norm`` of its own, as ``param_groups``' no-decay group does: an
    optimizer-wide ``lambda_norm`` replaces the value of λ, not the choice of which tensors
    decay, so that group stays undecayed. A group that leaves ``weight_decay`` to the
    optimizer's default (0 for SGDW, as for torch's SGD) takes λ_norm."""
    weight_decay = param_group.get("weight_decay")
    return (
        "lambda_norm" not in param_group and is_number(weight_decay) and float(weight_decay) == 0.0
    )


class DecayTerms(NamedTuple):
    """What a param group's step needs to apply weight decay (``decay.py``)."""

    weight_decay: float  # λ of this step (L2 coefficient for Adam/SGD)
    rate: float | Tensor  # the decoupled rate c (AdamW/SGDW); 0.0 for L2
    references: list[Tensor | None]  # θ₀ per parameter, None: decay toward zero


class DecayOptimizer(torch.optim.Optimizer):
    """Base class: decay options shared by all four optimizers, and the step template.

    Args:
        skip_nonfinite: when True, a step in which any gradient holds NaN or Inf changes
            nothing (parameters, moments, step counts) and increments ``skipped_steps``.
            When False (default) the step behaves exactly as torch.optim's does.

    Every param group also records ``construction_lr`` (the lr when it was added: the peak
    lr of last resort for ``decay_scale="schedule"``/``"corrected"``) and ``decay_steps``
    (the steps it has taken: the argument of a ``weight_decay`` schedule). With
    ``decay_to="init"`` each parameter's value at that moment is kept in its state as
    ``init_param`` (θ₀; saved in the state dict).
    """

    #: State keys this optimizer creates lazily, in torch's names (documentation and tests).
    state_keys: tuple[str, ...] = ()
    #: Whether steps take sparse gradients (``nn.Embedding(sparse=True)``), as torch's SGD.
    sparse_grads: bool = False

    def __init__(self, params: Iterable, defaults: dict, *, skip_nonfinite: bool = False):
        # the hyperparameters first, as torch checks them before it reads ``params``
        self._check_group(self._completed(dict(defaults)))
        check_params_argument(params)
        super().__init__(params, defaults)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0

    #: The L2 and the decoupled member of this optimizer's family, for messages.
    family: tuple[str, str] = ("", "")

    def add_param_group(self, param_group: dict) -> None:
        declines = _given_group_declines_lambda_norm(param_group)
        super().add_param_group(param_group)  # merges the defaults into the group
        group = self._completed(self.param_groups[-1])
        if declines:
            group["lambda_norm"] = None
        try:
            self._check_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() > 0:  # torch reads a [1]-shaped lr as a scalar
            group["lr"] = lr.view(())  # a view: schedulers' in-place updates still reach it
        group.setdefault("construction_lr", as_float(lr))
        group.setdefault("decay_steps", 0)
        if group.get("decay_to") == "init":
            for p in group["params"]:
                self.state[p].setdefault("init_param", p.detach().clone())

    def _completed(self, group: dict) -> dict:
        """``group`` with the options that depend on others filled in (in place)."""
        if self.decoupled and group.get("decay_scale") is None:
            # the paper's λ_norm is in the "schedule" units (η_t·λ); a plain λ in torch's
            group["decay_scale"] = "schedule" if group.get("lambda_norm") is not None else "lr"
        return group

    def _check_group(self, group: dict) -> None:
        """Validate a group's hyperparameters; subclasses add their own."""
        check_group(group, self.decoupled)
        check_cautious(group, self.decoupled, self.family)
        if "compensate" in group:  # a group's own, as the constructor's
            check_compensate(group["compensate"])

    @torch.no_grad()
    def reset_decay_reference(self) -> None:
        """Take the parameters' current values as θ₀ for ``decay_to="init"`` (e.g. after
        loading pretrained weights into a model whose optimizer already exists)."""
        for group in self.param_groups:
            if group.get("decay_to") == "init":
                for p in group["params"]:
                    self.state[p]["init_param"] = p.detach().clone()

    def _decay_terms(self, group: dict, params: list[Tensor]) -> DecayTerms:
        """This step's λ, decoupled rate c and each parameter's θ₀ (for step
        ``decay_steps + 1``: the count advances only after the step succeeded)."""
        weight_decay = weight_decay_at(group, group["decay_steps"] + 1)
        rate = self.decoupled_rate(group, weight_decay) if self.decoupled else 0.0
        if group.get("decay_to") == "init":
            references = []
            for p in params:  # θ₀ is taken at construction, maybe before channels_last
                state = self.state[p]
                state["init_param"] = in_layout_of(p, state["init_param"])
                references.append(state["init_param"])
        else:
            references = [None] * len(params)
        return DecayTerms(weight_decay, rate, references)

    def decoupled_rate(self, group: dict, weight_decay: float) -> float | Tensor:
        """This step's decoupled rate c for the group's ``decay_scale`` (``decay.py``)."""
        if weight_decay == 0:  # no decay op at all, as torch's `if weight_decay != 0`
            return 0.0
        scale, peak_lr = group["decay_scale"], None
        if scale in ("schedule", "corrected") and group.get("capturable"):
            peak_lr = group[self._peak_lr_source(group)]  # maybe a device tensor: not read
        elif scale in ("schedule", "corrected"):
            peak_lr = self.peak_lr(group)
            if not torch.compiler.is_compiling():
                self._check_below_peak(group, peak_lr)
        return decay_rate(weight_decay, group["lr"], decay_scale=scale, peak_lr=peak_lr)

    def peak_lr(self, group: dict) -> float:
        """α: the group's ``max_lr`` if set (OneCycleLR sets it too), else torch schedulers'
        ``initial_lr``, else the lr at construction."""
        return as_float(group[self._peak_lr_source(group)])

    @staticmethod
    def _peak_lr_source(group: dict) -> str:
        keys = ("max_lr", "initial_lr", "construction_lr")
        return next(k for k in keys if group.get(k) is not None)

    def _check_below_peak(self, group: dict, peak_lr: float) -> None:
        """The paper's multiplier η_t = γ_t/α is at most 1, so an lr above α means α is wrong:
        e.g. CyclicLR records its *lowest* lr as ``initial_lr``. That raises instead of
        decaying up to max/min times too fast."""
        lr = as_float(group["lr"])
        if lr > peak_lr * (1 + 1e-6):
            raise ValueError(
                f"Invalid max_lr value: {group.get('max_lr')}: the lr {lr} exceeds the peak lr "
                f"α = {peak_lr} (the group's {self._peak_lr_source(group)}) that "
                f"decay_scale={group.get('decay_scale')!r} divides by; pass max_lr=<the "
                "schedule's highest lr> (CyclicLR, for one, records its lowest lr as initial_lr)"
            )

    # -- hooks for subclasses ------------------------------------------------------------
    def _check_step(self, group: dict, grads: list[Tensor], decay: DecayTerms) -> None:
        """Refuse a step that a group cannot take, before any group has changed."""

    def _update_group(
        self,
        group: dict,
        params: list[Tensor],
        grads: list[Tensor],
        decay: DecayTerms,
        *,
        first_position: int = 0,
        grad_scale: Tensor | None = None,
    ) -> None:
        """Step one group; ``grad_scale`` (GradScaler's loss scale, or None) divides the
        gradients first, in the update's own pass where the path can (``_kernels.py``);
        ``first_position`` keys the group's stochastic rounding (``_step``)."""
        raise NotImplementedError

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's protocol, as torch's fused optimizers have it: when True, GradScaler
        does not unscale the gradients itself but sets ``grad_scale`` and ``found_inf`` on the
        optimizer; ``step()`` then skips the step when ``found_inf`` is nonzero and otherwise
        divides the gradients by ``grad_scale`` inside the update (g ← g/scale, written back,
        as torch's fused kernels do). True with ``fused=True``, as torch declares it: with
        the default ``fused=None`` GradScaler unscales itself, as for torch's default path,
        so that code relying on that (``scaler.unscale_`` before clipping in Lightning, which
        refuses to clip for optimizers that unscale) keeps working."""
        return self.defaults.get("fused") is True

    # -- the step template ---------------------------------------------------------------
    def _params_with_grad(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            grad = self._grad_of(p)
            if grad is None:  # never touched, as in torch: no decay without a gradient
                continue
            params.append(p)
            grads.append(grad)
        return params, grads

    def _grad_of(self, p: Tensor) -> Tensor | None:
        """``p.grad``, refused where it is sparse and this optimizer steps dense ones only."""
        grad = p.grad
        if grad is not None and grad.is_sparse and not self.sparse_grads:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients (parameter of "
                f"shape {tuple(p.shape)}); use torch.optim.SparseAdam or a dense embedding"
            )
        return grad

    def _all_grads_finite(self) -> bool:
        flags = [
            torch.isfinite(p.grad.coalesce().values() if p.grad.is_sparse else p.grad).all()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        # A sharded (DTensor, FSDP2) gradient's flag is a pending reduction over its mesh, and
        # bool() of it would read this rank's shard only: ranks would then disagree on skipping
        # and their replicas diverge. full_tensor() reduces it, so every rank decides alike.
        flags = [f.full_tensor() if hasattr(f, "full_tensor") else f for f in flags]
        return bool(torch.stack(flags).all()) if flags else True

    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step. With ``differentiable=True`` autograd records it
        (as torch's ``_use_grad_for_differentiable``); otherwise it runs without grad.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = [(group, *self._params_with_grad(group)) for group in self.param_groups]
        # each group's first_position: the parameters of the groups before it, counted whether
        # or not they have gradients; the updates key the stochastic rounding of a group's i-th
        # stepped tensor by first_position + i, so no two groups draw the same bits at a step
        positions = accumulate((len(group["params"]) for group in self.param_groups), initial=0)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        capturable = bool(self.defaults.get("capturable"))
        if capturable:  # decided on the device (_capturable.py)
            grads = [g for _, _, group_grads in gathered for g in group_grads]
            found_inf = device_skip_flag(self, grads, found_inf, self.skip_nonfinite)
        elif found_inf is not None and bool(found_inf):
            return loss  # as torch's fused kernels: an overflow step changes nothing
        if not capturable and self.skip_nonfinite and not self._all_grads_finite():
            self.skipped_steps += 1
            return loss
        # every group's decay terms first: a bad value (a schedule's λ, an lr above the peak)
        # raises before any group has changed
        planned = [
            (g, p, gr, self._decay_terms(g, p), first)
            for (g, p, gr), first in zip(gathered, positions)
            if p
        ]
        for group, params, grads, decay, _ in planned:
            if group.get("fused"):
                check_fusable(params)
            self._check_step(group, grads, decay)
        for group, params, grads, decay, first in planned:
            skip = {"found_inf": found_inf} if capturable and found_inf is not None else {}
            self._update_group(
                group, params, grads, decay, first_position=first,
                grad_scale=unscale_shared_(grads, grad_scale, found_inf if skip else None),
                **skip,
            )  # fmt: skip
            group["decay_steps"] += 1
        return loss

    def _check_decay_kind(self, groups: list[dict]) -> None:
        """Refuse param groups saved by the other algorithm of the family (L2 vs decoupled):
        loading them would silently change what λ means."""
        for group in groups:
            if "decoupled_weight_decay" in group:  # ours, and torch's Adam/AdamW since 2.7
                saved = bool(group["decoupled_weight_decay"])
            elif "decay_scale" in group:  # an AdamW/SGDW dict of ours without the key
                saved = True
            elif "momentum" in group:  # torch.optim.SGD: L2 only
                saved = False
            else:  # a torch < 2.7 Adam or AdamW dict: it does not say; trust the caller
                continue
            if saved != self.decoupled:
                raise ValueError(
                    f"Invalid decoupled_weight_decay value: {saved} in a loaded param group: it "
                    f"was saved by {self.family[saved]}; load it into decoupled."
                    f"{self.family[saved]}"
                )

    def state_dict(self) -> dict:
        """As torch's. A ``weight_decay`` schedule (a callable) is not saved: its group holds
        the λ of the latest step instead, so that torch.optim and ``torch.load`` with
        ``weights_only=True`` read it, and ``weight_decay_schedule: True``."""
        state = super().state_dict()
        for saved, group in zip(state["param_groups"], self.param_groups):
            if callable(group["weight_decay"]):
                saved["weight_decay"] = weight_decay_at(group, max(group["decay_steps"], 1))
                saved["weight_decay_schedule"] = True
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except for what is this process's choice rather than the checkpoint's:
        each group keeps its ``fused``, ``state_dtype`` and ``compensate`` (how steps run and how
        moments and weights are stored; a torch.optim dict would otherwise turn compact state
        back into float32; a remainder is then cast, created or dropped at the next step) and
        its ``weight_decay`` schedule, if the checkpoint was saved with one. A group that
        declined the optimizer-wide ``lambda_norm`` when it was added
        (``_given_group_declines_lambda_norm``) keeps declining it, and its biases and norm
        layers stay undecayed, even where the checkpoint's group holds that ``lambda_norm``
        (a checkpoint may store it in every group, the no-decay group included). Groups saved by
        the other algorithm (Adam vs AdamW, SGD vs SGDW) are refused before anything changes.
        State tensors are copied into their parameter's memory layout where it differs (values
        unchanged; ``_lay_out_state_like``); those a subclass names in
        ``_saved_state_kept_as_is`` keep their saved dtype, which torch would cast to θ's.
        """
        self._check_decay_kind(state_dict["param_groups"])
        self._check_loaded_states(state_dict)
        saved = self._saved_state_kept_as_is(state_dict)  # read before torch casts them
        kept = [
            {key: group.get(key) for key in ("fused", "state_dtype", "weight_decay", "compensate")}
            | {key: group[key] for key in ("triton", "capturable") if key in group}
            | {"declined": self._recorded_as_declining_lambda_norm(group)}
            for group in self.param_groups
        ]
        super().load_state_dict(state_dict)
        for param, key, value in saved:
            self.state[param][key] = value.to(param.device, copy=True)
        for group in self.param_groups:
            for param in group["params"]:
                self._lay_out_state_like(param)
        for group, local in zip(self.param_groups, kept):
            group["fused"] = local["fused"]
            group.update({key: local[key] for key in ("triton", "capturable") if key in local})
            if "compensate" in self.defaults:
                group["compensate"] = local["compensate"]
            if "state_dtype" in group or local["state_dtype"] is not None:
                group["state_dtype"] = local["state_dtype"]
            if group.pop("weight_decay_schedule", False) and callable(local["weight_decay"]):
                group["weight_decay"] = local["weight_decay"]
            if local["declined"] and _given_group_declines_lambda_norm(
                {"weight_decay": group["weight_decay"]}
            ):
                group["lambda_norm"] = None

    def _saved_state_kept_as_is(self, state_dict: dict) -> list[tuple[Tensor, str, Tensor]]:
        """(θ, key, saved tensor) for each state tensor that loads in its saved dtype instead
        of torch's cast to θ's dtype (θ paired by position, as torch pairs them). None here;
        the optimizers that convert their state themselves name theirs."""
        return []

    def _check_loaded_states(self, state_dict: dict) -> None:
        """Check each saved parameter's state against the parameter it will be loaded into
        (torch pairs them by position, group by group). Group count and size mismatches are
        left to torch's own error."""
        saved_states = state_dict["state"]
        for group_index, (saved_group, group) in enumerate(
            zip(state_dict["param_groups"], self.param_groups)
        ):
            for key, param in zip(saved_group["params"], group["params"]):
                if key in saved_states:
                    where = f"parameter {key} (group {group_index})"
                    self._check_loaded_state(where, param, saved_group, saved_states[key])

    def _check_loaded_state(self, where: str, param: Tensor, group: dict, state: dict) -> None:
        """Refuse one parameter's damaged saved ``state`` (``_loaded_state.py``); ``group`` is
        the saved param group. Subclasses check their own keys and call this one."""
        if "init_param" in state:
            check_like_param(where, "init_param", state["init_param"], param)

    def _recorded_as_declining_lambda_norm(self, group: dict) -> bool:
        """Read from a group already added: whether it holds no ``lambda_norm`` while the
        optimizer has one, i.e. ``add_param_group`` cleared it
        (:func:`_given_group_declines_lambda_norm`)."""
        return self.defaults.get("lambda_norm") is not None and group.get("lambda_norm") is None

    def _lay_out_state_like(self, param: Tensor) -> None:
        """Copy once into ``param``'s memory layout the state tensors shaped like it but laid
        out otherwise, e.g. moments saved from a contiguous model and loaded into a
        channels_last one: the fast paths take only state laid out like its parameter
        (``_kernels.py``), and would refuse it at every step. Values are unchanged."""
        state = self.state.get(param, {})
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = in_layout_of(param, value)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("skipped_steps", 0)
        for group in self.param_groups:
            group.setdefault("decay_to", "zero")
            if getattr(self, "decoupled", False):
                for key, default in (
                    ("decay_scale", "lr"),
                    ("lambda_norm", None),
                    ("decay_period", None),
                    ("max_lr", None),
                    ("cautious", False),  # checkpoints from before cautious decay
                ):
                    group.setdefault(key, default)
            group.setdefault("construction_lr", as_float(group["lr"]))
            if "decay_steps" not in group:  # a torch.optim state dict: count from Adam's steps
                steps = [
                    float(self.state[p]["step"])
                    for p in group["params"]
                    if "step" in self.state.get(p, {})
                ]
                group["decay_steps"] = int(max(steps, default=0))
