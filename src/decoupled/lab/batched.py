"""The batched executor: many sweep cells of one architecture trained at once, in one process.

Cells that differ only in lr and λ share everything else — the seed, hence the initial
weights and the batch order. Their parameters are stacked along a new first dimension
(K cells), the forward and backward passes run once for all of them through
``torch.func.vmap`` over ``grad_and_value``, and the optimizer's own functional core
(``adam_update``/``sgd_update``, with the registry's fixed hyperparameters: its
``OptimizerInfo.defaults``) updates the stacked tensors with per-cell lr and λ as broadcast
tensors. The steps and evaluations follow the lab's one loop (``loop.run_loop``) and the lr
follows the runner's schedule, replayed once (``loop.schedule_factors``). Each cell's result
equals a separate run with the same seed up to float rounding (tested). Models with dropout
are run one by one instead (their random masks could not match separate runs).
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.nn.utils.stateless import _reparametrize_module

from decoupled.lab.executor import (
    _task_and_data,
    open_store,
    pending_runs,
    progress_bar,
    run_claimed,
    run_into_store,
)
from decoupled.lab.loop import add_point, new_curves, run_loop, schedule_factors
from decoupled.lab.tasks import Task, TaskData
from decoupled.lab.train import (
    RunResult,
    RunSpec,
    eval_interval,
    finished_finite,
    torch_threads,
    weight_norms,
)
from decoupled.optim.adam import adam_update
from decoupled.optim.decay import decay_rate
from decoupled.optim.groups import decay_mask
from decoupled.optim.registry import REGISTRY
from decoupled.optim.sgd import sgd_update


def batch_key(spec: RunSpec) -> tuple:
    """Cells that can share one batched run: everything but lr and λ equal."""
    return replace(spec, lr=1.0, weight_decay=0.0)


def has_randomness(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _per_cell(values: Sequence[float], like: Tensor) -> Tensor:
    """A (K, 1, 1, ...) tensor that broadcasts one value per cell against a stacked tensor."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(
        -1, *[1] * (like.dim() - 1)
    )


def run_batched(
    specs: Sequence[RunSpec], task: Task, data: TaskData, on_evaluation=None
) -> list[RunResult]:
    """Train the cells ``specs`` (same :func:`batch_key`) together, with ``threads`` torch
    threads; one RunResult per cell. ``on_evaluation()`` is called after each evaluation
    (the executor sends its heartbeats there)."""
    with torch_threads(specs[0].threads):
        return _train_batched(specs, task, data, on_evaluation)


def _train_batched(
    specs: Sequence[RunSpec], task: Task, data: TaskData, on_evaluation=None
) -> list[RunResult]:
    base, cells = specs[0], len(specs)
    if not REGISTRY[base.optimizer].batched:
        raise ValueError(
            f"Invalid optimizer value: {base.optimizer!r} for the batched executor (use the "
            "local executor)"
        )
    if base.state_dtype is not None:
        raise ValueError(
            f"Invalid state_dtype value: {base.state_dtype!r} for the batched executor (its "
            "stacked moments are float32; use the local executor for compact state)"
        )
    started = time.perf_counter()
    torch.manual_seed(base.seed)
    model = task.build_model()
    model.train()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    stack = lambda t: t.unsqueeze(0).repeat(cells, *[1] * t.dim()).contiguous()  # noqa: E731
    weights = {n: stack(p) for n, p in params.items()}
    stats = {n: stack(b) for n, b in buffers.items()}
    decayed = decay_mask(model)
    exp_avgs = {n: torch.zeros_like(w) for n, w in weights.items()}
    exp_avg_sqs = {n: torch.zeros_like(w) for n, w in weights.items()}
    momentum_buffers: dict[str, Tensor | None] = {n: None for n in weights}
    steps_t = {n: torch.tensor(0.0) for n in weights}
    factors = schedule_factors(base)
    eval_every = eval_interval(base, task)

    def loss_of(cell_weights, cell_stats, batch):
        with _reparametrize_module(model, {**cell_weights, **cell_stats}):
            return task.loss(model, batch)

    grads_and_losses = vmap(grad_and_value(loss_of), in_dims=(0, 0, None))
    batches = task.batches(data, torch.Generator().manual_seed(base.seed))
    curves = [new_curves() for _ in specs]
    loss_sums, diverged_at = torch.zeros(cells, dtype=torch.float64), [None] * cells
    since_eval = 0

    def take_step(step: int) -> bool:
        nonlocal since_eval
        grads, losses = grads_and_losses(weights, stats, next(batches))
        for k in range(cells):
            if diverged_at[k] is None and not math.isfinite(float(losses[k])):
                diverged_at[k] = step  # as in a separate run: stop before using this loss
        _optimizer_step(
            specs,
            weights,
            grads,
            exp_avgs,
            exp_avg_sqs,
            momentum_buffers,
            steps_t,
            decayed,
            factors[step - 1],
        )
        loss_sums.add_(losses.detach().double())
        since_eval += 1
        return True  # a cell that diverges stops counting; the others go on

    def evaluate(step: int) -> None:
        nonlocal since_eval
        for k, spec in enumerate(specs):
            if diverged_at[k] is not None:
                continue
            train_loss = float(loss_sums[k]) / since_eval
            metric = _evaluate_cell(model, task, data, weights, stats, k)
            add_point(curves[k], step, train_loss, metric, spec.lr * factors[step - 1])
        if on_evaluation is not None:
            on_evaluation()
        loss_sums.zero_()
        since_eval = 0

    run_loop(base.steps, eval_every, take_step, evaluate)
    wall = (time.perf_counter() - started) / cells
    for k in range(cells):
        cell_weights = (w[k] for w in weights.values())
        if diverged_at[k] is None and not finished_finite(cell_weights, curves[k]["metric"][-1]):
            diverged_at[k] = base.steps
    return [
        RunResult(
            spec=spec,
            status="diverged" if diverged_at[k] else "done",
            metric=curves[k]["metric"][-1]
            if not diverged_at[k] and curves[k]["metric"]
            else math.nan,
            metric_name=task.metric,
            higher_is_better=task.higher_is_better,
            curves=curves[k],
            weight_norms=weight_norms((n, w[k]) for n, w in weights.items()),
            wall_time=wall,
        )
        for k, spec in enumerate(specs)
    ]


def _optimizer_step(
    specs, weights, grads, exp_avgs, exp_avg_sqs, momentum_buffers, steps_t, decayed, factor
) -> None:
    """One step of the specs' optimizer on every stacked tensor, per-cell lr and λ."""
    base = specs[0]
    info = REGISTRY[base.optimizer]
    decoupled = info.decoupled
    for name, weight in weights.items():
        lr = _per_cell([s.lr * factor for s in specs], weight)
        peak = _per_cell([s.lr for s in specs], weight)
        wd = _per_cell([s.weight_decay if decayed[name] else 0.0 for s in specs], weight)
        rate = decay_rate(wd, lr, decay_scale=base.decay_scale, peak_lr=peak) if decoupled else 0.0
        if info.family == "adam":
            adam_update(
                [weight],
                [grads[name]],
                [exp_avgs[name]],
                [exp_avg_sqs[name]],
                [],
                [steps_t[name]],
                lr=lr,
                **info.defaults,
                weight_decay=wd,
                decoupled=decoupled,
                decay_rate=rate,
            )
        else:
            buffers = [momentum_buffers[name]] if base.momentum else []
            sgd_update(
                [weight],
                [grads[name]],
                buffers,
                lr=lr,
                momentum=base.momentum,
                **info.defaults,
                weight_decay=wd,
                decoupled=decoupled,
                decay_rate=rate,
            )
            if base.momentum:
                momentum_buffers[name] = buffers[0]


@torch.no_grad()
def _evaluate_cell(model, task, data, weights, stats, k) -> float:
    cell = {n: w[k] for n, w in weights.items()} | {n: b[k] for n, b in stats.items()}
    with _reparametrize_module(model, cell):
        return task.evaluate(model, data)


def execute_batched(specs: Sequence[RunSpec], db_path, *, progress: bool = True) -> dict[str, int]:
    """Run the missing specs, grouping cells that can share a batched run."""
    db_path = str(db_path)
    store = open_store(db_path)
    pending, counts = pending_runs(specs, store)
    groups: dict[RunSpec, list[RunSpec]] = {}
    for spec in pending:
        groups.setdefault(batch_key(spec), []).append(spec)
    bar = progress_bar(len(specs), counts["cached"], "batched sweep", progress)
    try:
        for group in groups.values():
            task, data = _task_and_data(group[0])
            torch.manual_seed(group[0].seed)
            if has_randomness(task.build_model()):
                for spec in group:  # dropout: separate runs keep results reproducible
                    counts[run_into_store(spec, db_path)] += 1
                    bar.update(1)
                continue
            try:
                claimed = [s for s in group if store.claim(s.key(), s.config())]
                counts["skipped"] += len(group) - len(claimed)
                if claimed:
                    _train_claimed_group(claimed, task, data, store, counts)
            except KeyboardInterrupt:
                # the whole group, as a claim may have landed just before the Ctrl-C; this
                # changes only this process's running rows, so recorded ones are left alone
                for spec in group:
                    store.mark_interrupted(spec.key())
                raise
            bar.update(len(claimed))
    finally:
        bar.close()
    return counts


def _train_claimed_group(claimed, task, data, store, counts) -> None:
    """Train the claimed runs of one group side by side and record each outcome."""
    # a lone cell (the rest of its seed cached, failed or claimed elsewhere) trains beside
    # a throwaway twin: a group of one rounds otherwise than one of several, and its result
    # must be the one its key would give in a full group
    padded = claimed if len(claimed) > 1 else claimed * 2
    keys = [s.key() for s in claimed]
    try:
        results = run_batched(padded, task, data, lambda: [store.heartbeat(k) for k in keys])[
            : len(claimed)
        ]  # heartbeats: a process on another host sees them alive
    except Exception:
        for spec in claimed:
            store.fail(spec.key(), traceback.format_exc())
        counts["failed"] += len(claimed)
        return
    for result in results:
        if result.status == "diverged":
            # near the edge of stability the vmapped BatchNorm backward can overflow to NaN
            # where a separate run's native kernel stays finite (sgd at lr 1e3 on mnist1d):
            # the cell trains again on its own, and that outcome is stored; a run that truly
            # diverges stops at its first non-finite loss
            counts[run_claimed(result.spec, store, task, data)] += 1
            continue
        store.finish(result.spec.key(), result.status, result.metrics(), result.curves)
        counts[result.status] += 1
