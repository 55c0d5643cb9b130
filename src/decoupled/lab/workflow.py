"""What `decoupled compare` and `decoupled report` do, as functions (the CLI is a thin shell).

Everything lands in one output folder: ``results.db`` (runs and experiments), ``report.md``,
``report.html`` and ``plots/``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch

from decoupled.lab.compare_options import Sequential, compare_kind, compare_options, is_compare
from decoupled.lab.comparison import Comparison, summarize
from decoupled.lab.executor import execute, open_store
from decoupled.lab.experiments import Experiment, load_experiments, save_experiment
from decoupled.lab.plan import plan_compare, plan_sweep
from decoupled.lab.render import Block, write_report
from decoupled.lab.report import compare_blocks, sweep_blocks
from decoupled.lab.sweep import Landscape, landscapes
from decoupled.lab.tasks import Task, get_task
from decoupled.lab.train import RunSpec

DB_NAME = "results.db"


def prepare_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and check it is writable; OSError naming it otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the output folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"the output folder {path} is not writable")
    return path


def plan_name(prefix: str, specs) -> str:
    """``compare-mnist1d-1a2b3c4d``: the same plan (e.g. a resumed one) keeps its name and
    its place in the report; another plan into the same folder is added beside it."""
    digest = sha256(" ".join(sorted(spec.key() for spec in specs)).encode()).hexdigest()
    return f"{prefix}-{digest[:8]}"


def threads_per_run(workers: int | None) -> int:
    """Torch threads of each run when ``workers`` (default: one per core) run at once. It
    depends on the requested workers only, never on how many runs are left: a resumed
    sweep's runs get the same count, hence the same rounding, as the first invocation's."""
    cores = os.cpu_count() or 1
    return max(1, cores // (workers or cores))


def compare_task(
    task: Task,
    *,
    optimizers: list[str],
    seeds: int,
    steps: int,
    out: Path,
    overrides: dict[str, dict[str, float]] | None = None,
    workers: int | None = None,
    progress: bool = True,
    name: str | None = None,  # the experiment's name before its plan digest
    before_reports: Callable[[Comparison], None] | None = None,  # e.g. print the table
    extra_pairs: list[tuple[str, str]] | None = None,  # (first, second) beyond the twins
    sequential: Sequential | None = None,  # a --seeds auto design; seeds = this round's
    **common: Any,
) -> Comparison:
    """Plan, run (skipping runs already stored), summarize and report one comparison; a
    sequential one keeps one name over its rounds (its plan at ``max_seeds`` names it)."""
    common.setdefault("threads", threads_per_run(workers))  # a caller's own count wins
    specs = plan_compare(task, optimizers, seeds, steps, overrides, **common)
    db_path = out / DB_NAME
    store = open_store(db_path)
    named = specs
    if sequential is not None:
        named = plan_compare(task, optimizers, sequential.max_seeds, steps, overrides, **common)
    experiment = plan_name(name or f"compare-{task.name}", named)
    kind = compare_kind(extra_pairs or (), sequential)
    save_experiment(store, experiment, kind, specs)
    execute(
        specs,
        db_path,
        workers=workers,
        progress=progress,
        description=f"{task.name}: {' vs '.join(optimizers)}",
    )
    store.checkpoint()  # the command's runs are in results.db itself, not only in its WAL
    return _summarize_then_report(out, task, experiment, before_reports)


class StoredTask(Task):
    """A task known only through its stored runs (e.g. a custom task from another session):
    enough to report it, not to train it."""

    def __init__(self, name: str, metric: str, higher_is_better: bool) -> None:
        self.name, self.metric, self.higher_is_better = name, metric, higher_is_better
        self.description = f"Task {name!r} (rebuilt from stored runs)"


def _task_for(name: str, records) -> Task:
    try:
        return get_task(name)
    except ValueError:
        metrics = next(
            (r.metrics for r in records if r.config.get("task") == name and r.metrics), {}
        )
        return StoredTask(
            name, metrics.get("metric_name", "metric"), bool(metrics.get("higher_is_better", False))
        )


def sweep_task(
    task: Task,
    *,
    optimizers: list[str],
    lrs: dict[str, list[float]],
    wds: dict[str, list[float]],
    seeds: int,
    steps: int,
    out: Path,
    executor: str = "local",
    workers: int | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    ray_max_retries: int | None = None,
    before_reports: Callable[[tuple[list[Landscape], dict[str, str]]], None] | None = None,
    **common: Any,
) -> tuple[list[Landscape], dict[str, str]]:
    """Plan, run (only missing cells), and report an lr × λ sweep; returns the landscapes and
    :func:`missing_runs` (``before_reports`` sees them before the reports are written)."""
    if executor == "batched":  # one process, all its threads (unless given), cells together
        common = {"threads": torch.get_num_threads(), **common, "batched": True}
    elif executor == "local":
        common.setdefault("threads", threads_per_run(workers))
    specs = plan_sweep(task, optimizers, lrs, wds, seeds, steps, **common)
    db_path = out / DB_NAME
    store = open_store(db_path)
    experiment = plan_name(f"sweep-{task.name}", specs)
    save_experiment(store, experiment, "sweep", specs)
    description = f"{task.name} sweep"
    if executor == "ray":
        from decoupled.lab.ray_executor import execute_on_ray

        retries = {} if ray_max_retries is None else {"max_retries": ray_max_retries}
        execute_on_ray(specs, db_path, address=ray_address, progress=progress, **retries)
    elif executor == "batched":
        from decoupled.lab.batched import execute_batched

        if not torch.cuda.is_available():
            print(
                "decoupled sweep: note: the batched executor is meant for GPUs; on a CPU it is "
                "usually slower than one-after-another runs (README, Executors)",
                file=sys.stderr,
            )
        execute_batched(specs, db_path, progress=progress)
    else:
        execute(specs, db_path, workers=workers, progress=progress, description=description)
    store.checkpoint()  # the command's runs are in results.db itself, not only in its WAL
    return _summarize_then_report(out, task, experiment, before_reports)


def unfinished(specs, records) -> dict[str, list]:
    """The planned runs that have no result among the store's ``records``: ``failed`` (their
    records, with the error), ``running`` (records owned by another process, at work or gone)
    and ``missing`` (specs never started, e.g. by a command interrupted before them)."""
    wanted = {spec.key(): spec for spec in specs}
    outcome: dict[str, list] = {"failed": [], "running": []}
    for record in records:
        if record.key in wanted and record.status in outcome:
            outcome[record.status].append(record)
    stored = {record.key for record in records}
    outcome["missing"] = [spec for key, spec in wanted.items() if key not in stored]
    return outcome


def _by_optimizer(specs, keys) -> str:
    """``"adam 2, adamw 1"``: how many of the runs with these keys each optimizer has."""
    counts: dict[str, int] = {}
    for spec in specs:
        if spec.key() in keys:
            counts[spec.optimizer] = counts.get(spec.optimizer, 0) + 1
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def missing_runs(specs, records, db_path: Path) -> dict[str, str]:
    """What a person must know about planned runs missing from the report: one line per kind
    (``"failed"``, ``"running"``, ``"missing"``), none when every planned run has its result."""
    outcome, lines = unfinished(specs, records), {}
    if outcome["failed"]:
        last_line = (outcome["failed"][0].error or "").strip().splitlines()[-1:] or ["?"]
        which = _by_optimizer(specs, {r.key for r in outcome["failed"]})
        lines["failed"] = (
            f"{len(outcome['failed'])} of {len(specs)} runs failed ({which}) and are left out "
            f"of the report (first error: {last_line[0]}); their tracebacks are in the error "
            f"column of {db_path}, and the next invocation retries them"
        )
    if outcome["running"]:
        owners = sorted({r.owner or "?" for r in outcome["running"]})
        lines["running"] = (
            f"{len(outcome['running'])} of {len(specs)} runs are claimed by another process "
            f"({', '.join(owners)}) and are left out of the report; run the command again "
            "when it has finished (a run of a dead process is redone)"
        )
    if outcome["missing"]:
        which = _by_optimizer(outcome["missing"], {s.key() for s in outcome["missing"]})
        lines["missing"] = (
            f"{len(outcome['missing'])} of {len(specs)} runs have not been run ({which}) and "
            "are left out of the report; run the command again to run them"
        )
    return lines


@dataclass
class StoredSummary:
    """What one experiment of the store says: a compare's :class:`Comparison`, or a sweep's
    landscapes with its :func:`missing_runs`."""

    experiment: Experiment
    task: Task
    summary: Any


def summarize_stored(out: Path, tasks: dict[str, Task] | None = None) -> dict[str, StoredSummary]:
    """Every experiment in ``out``'s store, summarized from the stored runs (no training)."""
    db_path = out / DB_NAME
    if not db_path.exists():
        raise FileNotFoundError(f"no results store in {out} (expected {db_path})")
    store = open_store(db_path)
    records = store.records()
    tasks = dict(tasks or {})
    summaries = {}
    for experiment in load_experiments(store):
        task_name = experiment.specs[0].task
        if task_name not in tasks:
            tasks[task_name] = _task_for(task_name, records)
        task = tasks[task_name]
        missing = missing_runs(experiment.specs, records, db_path)
        if is_compare(experiment.kind):
            options = compare_options(experiment.kind)
            summary: Any = summarize(task, experiment.specs, records, RunSpec.key, **options)
            summary.missing = missing
        else:
            summary = (landscapes(task, experiment.specs, records, RunSpec.key), missing)
        summaries[experiment.name] = StoredSummary(experiment, task, summary)
    return summaries


def write_reports(out: Path, summaries: dict[str, StoredSummary]) -> list[Path]:
    """report.md, report.html and plots/ from the experiments' summaries."""
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    blocks = [Block("h1", "decoupled: Adam (L2) vs AdamW (decoupled weight decay)")]
    for name, stored in summaries.items():
        if is_compare(stored.experiment.kind):
            blocks.extend(compare_blocks(name, stored.summary, plot_dir, "plots"))
        else:
            grid, missing = stored.summary
            first = stored.experiment.specs[0]
            blocks.extend(sweep_blocks(name, stored.task, grid, plot_dir, "plots", first, missing))
    return write_report(out, blocks)


def rebuild_reports(out: Path, tasks: dict[str, Task] | None = None) -> list[Path]:
    """Rebuild report.md/report.html from the store alone (no training)."""
    return write_reports(out, summarize_stored(out, tasks))


def _summarize_then_report(out: Path, task: Task, experiment: str, before_reports) -> Any:
    """One summary of the store serves the caller and the report. ``before_reports`` sees
    this experiment's summary before any report file is written, so a disk that fills up at
    the plots loses nothing the caller wanted to show."""
    summaries = summarize_stored(out, tasks={task.name: task})
    summary = summaries[experiment].summary
    if before_reports is not None:
        before_reports(summary)
    write_reports(out, summaries)
    return summary
