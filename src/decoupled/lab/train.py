"""Run one training job: a task, an optimizer spec, a budget and a seed -> a RunResult.

The same spec gives the same result: the model is built after ``torch.manual_seed(seed)``
and the data order comes from its own generator seeded by ``seed``, so two optimizers run
with the same seed see the same initial weights and the same batches. The number of torch
threads is part of the spec too: it changes how sums are split, hence the float rounding,
and a few thousand steps amplify that into a different final metric. A non-finite loss
ends the run early with status ``"diverged"`` (a result, not a crash).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import decoupled
from decoupled.diagnostics.rates import element_decay_rates, summarize_rates
from decoupled.lab.loop import (
    SCHEDULES,
    MeanLoss,
    ModelStep,
    add_point,
    build_scheduler,
    new_curves,
    run_loop,
)
from decoupled.lab.store import config_key
from decoupled.lab.tasks import Task, TaskData, get_task
from decoupled.optim import kernel_available
from decoupled.optim.registry import REGISTRY, check_optimizer

# Compact moments (decoupled.optim._compact); None keeps them in the parameters' dtype.
STATE_DTYPES = (None, "bfloat16", "int8")


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run (its store key is a hash of :meth:`config`)."""

    task: str
    optimizer: str  # a name in decoupled.optim.registry: adam | adamw | sgd | sgdw
    lr: float
    weight_decay: float
    seed: int
    steps: int
    momentum: float = 0.0  # SGD/SGDW only
    decay_scale: str = "lr"  # AdamW/SGDW only (decoupled.optim.decay)
    schedule: str = "cosine"  # cosine decay to 0 after warm-up, or constant
    warmup_steps: int = 0
    eval_every: int = 0  # 0: the task's default
    data_dir: str | None = None
    state_dtype: str | None = None  # Adam/AdamW's moments: None (θ's dtype), "bfloat16", "int8"
    threads: int = 1  # torch threads of the run (float rounding depends on it)
    batched: bool = False  # trained with other cells at once (lab/batched.py): other rounding

    def validate(self) -> None:
        check_optimizer(self.optimizer)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule value: {self.schedule!r} (choose from {SCHEDULES})")
        for name in ("steps", "seed", "warmup_steps", "eval_every", "threads"):
            value = getattr(self, name)
            positive = name in ("steps", "threads")
            if not isinstance(value, int) or value < 0 or (positive and value == 0):
                raise ValueError(f"Invalid {name} value: {value!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype value: {self.state_dtype!r} (choose from {STATE_DTYPES})"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"Invalid warmup_steps value: {self.warmup_steps} (must be below steps, "
                f"{self.steps})"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Invalid lr value: {self.lr} (must be finite and > 0)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"Invalid weight_decay value: {self.weight_decay}")

    def config(self) -> dict[str, Any]:
        """The complete configuration, including the package version (results of another
        version are kept apart). An L2 optimizer's ``decay_scale`` is recorded as "lr":
        it does not use it, so ``--decay-scale`` does not retrain identical Adam/SGD runs."""
        config = {**asdict(self), "version": decoupled.__version__}
        if self.optimizer in REGISTRY and REGISTRY[self.optimizer].decay == "L2":
            config["decay_scale"] = "lr"
        identity = _data_identity(self.task, self.data_dir)
        if identity is not None:
            config["data"] = identity
        config["step_path"] = self.step_path()
        return config

    def step_path(self) -> str:
        """The implementation that steps this run's float32 CPU parameters, from the list in
        ``decoupled.optim._kernels``: "kernel" (the C++ kernel), "torch-fused" (torch's fused
        Adam kernels, where the C++ kernel cannot be built) or "reference" (the reference loop:
        the batched executor's stacked per-cell lr, or SGD and bfloat16 state without the
        kernel). The paths round differently, so the path keys a run, as its thread count does,
        and a stored result reproduces from its key."""
        if self.batched:
            return "reference"
        if kernel_available():
            return "kernel"
        info = REGISTRY.get(self.optimizer)
        if info is not None and info.family == "adam" and self.state_dtype is None:
            return "torch-fused"
        return "reference"

    def key(self) -> str:
        """The run's store key: a hash of :meth:`config` (``store.config_key``)."""
        return config_key(self.config())


def _data_identity(task_name: str, data_dir: str | None) -> str | None:
    """The registered task's :meth:`Task.data_identity` (None for custom tasks)."""
    from decoupled.lab.tasks import get_task, task_names

    return get_task(task_name).data_identity(data_dir) if task_name in task_names() else None


@dataclass
class RunResult:
    """What one run produced. ``curves`` are lists aligned on ``curves["step"]``."""

    spec: RunSpec
    status: str  # done | diverged
    metric: float  # the task's metric at the end (NaN if it diverged)
    metric_name: str
    higher_is_better: bool = False
    curves: dict[str, list[float]] = field(default_factory=dict)
    weight_norms: dict[str, float] = field(default_factory=dict)
    decay_summary: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "weight_norms": self.weight_norms,
            "decay_summary": self.decay_summary,
            "wall_time": self.wall_time,
            "final_train_loss": (self.curves["train_loss"] or [None])[-1],
        }


def build_optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of a spec; biases and normalization layers are never decayed."""
    info = REGISTRY[spec.optimizer]
    groups = decoupled.param_groups(model, spec.weight_decay, verbose=False)
    kwargs: dict[str, Any] = {"lr": spec.lr}
    if info.momentum:
        kwargs["momentum"] = spec.momentum
    if info.takes_decay_scale:
        kwargs["decay_scale"] = spec.decay_scale
    if spec.state_dtype is not None:
        kwargs["state_dtype"] = getattr(torch, spec.state_dtype)
    return info.cls(groups, **kwargs)


def eval_interval(spec: RunSpec, task: Task) -> int:
    """Steps between evaluations: the spec's, else the task's, but at least 5 points on a
    short (e.g. --quick) run."""
    return spec.eval_every or min(task.eval_every, max(1, spec.steps // 5))


def weight_norms(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """L2 norm of every named tensor (e.g. ``model.named_parameters()``), and of all of them
    together (``"total"``)."""
    norms = {name: p.detach().norm().item() for name, p in named_tensors}
    norms["total"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def decay_summary(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """How strongly the decay acts per element at the end of training, at the peak lr.

    Decoupled decay shrinks every decayed weight by the same c per step. Adam + L2 shrinks
    element i by about γλ/(sqrt(v̂_i)+ε) (SCIENCE.md §8, prediction 1): its spread across
    elements measures how uneven L2 becomes under Adam's scaling. The rates are those of
    :func:`decoupled.diagnostics.rates.element_decay_rates`, pooled over every decayed element
    and evaluated at the peak lr α, so that a schedule that ends at lr 0 still shows the shape.
    Reported: the median rate, the 5th/95th percentiles, their ratio, and the coefficient of
    variation. Cautious decay (arXiv 2510.12402) decays only where the update direction and θ
    agree in sign: its rate is c there and 0 elsewhere, the mask taken from the last step's
    direction and the final weights.
    """
    rates = []
    for group in optimizer.param_groups:
        if not group["weight_decay"]:
            continue
        peak_lr = optimizer.peak_lr(group)
        for p in group["params"]:
            rate, _ = element_decay_rates(
                optimizer, p, group, with_grad_rms=False, lr=peak_lr, before=_masked_at(p, group)
            )
            if isinstance(rate, Tensor):
                rates.append(rate.detach().flatten().double())
            else:
                rates.append(torch.full((p.numel(),), rate, dtype=torch.float64))
    if not rates:
        return {}
    summary = summarize_rates(torch.cat(rates), None)
    p5, p95 = summary["rate_p5"], summary["rate_p95"]
    return {
        "median": summary["rate_p50"],
        "p5": p5,
        "p95": p95,
        "spread_p95_p5": p95 / p5 if p5 > 0 else math.inf,
        "cv": summary["rate_cv"] if summary["rate_mean"] > 0 else 0.0,
    }


def _masked_at(param: Tensor, group: dict) -> Tensor | None:
    """θ for the cautious mask of ``param`` (None: not cautious, or no direction to read:
    SGDW's comes from the gradient, which ``zero_grad`` may have cleared)."""
    if not group.get("cautious") or (param.grad is None and not group.get("betas")):
        return None
    return param.detach()


def run(
    spec: RunSpec,
    *,
    task: Task | None = None,
    data: TaskData | None = None,
    device: str | torch.device | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train one run. ``task``/``data`` may be passed in to reuse loaded data across runs.

    ``device`` defaults to CUDA when present, else the CPU. ``on_progress(step, steps)`` is
    called after every evaluation. Runs with ``spec.threads`` torch threads and its own
    random state (``torch.manual_seed(spec.seed)``); the caller's thread count and random
    streams are restored after.
    """
    spec.validate()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch_threads(spec.threads), torch.random.fork_rng(devices=cuda_devices):
        return _train(spec, task, data, device, on_progress)


def finished_finite(weights: Iterable[Tensor], metric: float) -> bool:
    """Whether a run that took all its steps ended with finite weights and metric (the last
    update can blow up, and no later loss would show it)."""
    return all(bool(torch.isfinite(w).all()) for w in weights) and math.isfinite(metric)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(count)``; the previous count is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(spec, task, data, device, on_progress) -> RunResult:
    task = task or get_task(spec.task)
    data = data if data is not None else task.load(spec.data_dir)
    eval_every = eval_interval(spec, task)
    started = time.perf_counter()

    torch.manual_seed(spec.seed)
    model = task.build_model().to(device)
    data = data.to(device) if device.type != "cpu" else data
    optimizer = build_optimizer(spec, model)
    scheduler = build_scheduler(spec, optimizer)
    batches = task.batches(data, torch.Generator().manual_seed(spec.seed))

    curves, train_loss = new_curves(), MeanLoss()
    model.train()
    take_step = ModelStep(task, model, optimizer, scheduler, batches, device, train_loss.add)

    def evaluate(step: int) -> None:
        add_point(curves, step, train_loss.take(), task.evaluate(model, data), take_step.lr)
        model.train()
        if on_progress:
            on_progress(step, spec.steps)

    status = "done" if run_loop(spec.steps, eval_every, take_step, evaluate) is None else "diverged"
    if status == "done" and not finished_finite(model.parameters(), curves["metric"][-1]):
        status = "diverged"
    metric = curves["metric"][-1] if status == "done" else math.nan
    return RunResult(
        spec=spec,
        status=status,
        metric=metric,
        metric_name=task.metric,
        higher_is_better=task.higher_is_better,
        curves=curves,
        weight_norms=weight_norms(model.named_parameters()),
        decay_summary=decay_summary(optimizer) if status == "done" else {},
        wall_time=time.perf_counter() - started,
    )
