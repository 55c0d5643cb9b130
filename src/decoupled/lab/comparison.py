"""A compare's summary: the store's runs grouped into arms, paired by seed, tested, tabled.

Each optimizer ("arm") ran over seeds 0..K-1 (``plan.plan_compare``). Because a seed fixes
both the initial weights and the batch order, arms are paired by seed and compared with a
paired test (``stats.paired_difference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from decoupled.lab.stats import Interval, PairedComparison, mean_ci, paired_difference, verdict
from decoupled.lab.store import FINISHED, RunRecord
from decoupled.lab.tasks import Task
from decoupled.lab.train import RunSpec
from decoupled.optim.registry import REGISTRY, pairs


def metric_scale(metric: str) -> tuple[float, str]:
    """How tables show a metric: an error rate (name ending in "error") as a percentage,
    ``(100.0, "%")``; anything else as it is, ``(1.0, "")``."""
    return (100.0, "%") if metric.endswith("error") else (1.0, "")


@dataclass
class Arm:
    """One optimizer's runs in a comparison, by seed."""

    optimizer: str
    spec: RunSpec  # the seed-0 spec (its settings are the arm's)
    records: dict[int, RunRecord] = field(default_factory=dict)

    @property
    def name(self) -> str:
        info = REGISTRY.get(self.optimizer)
        return info.label if info else self.optimizer

    def metrics_by_seed(self) -> dict[int, float]:
        """Final metric per seed for runs that finished (diverged runs: NaN)."""
        values = {}
        for seed, record in sorted(self.records.items()):
            if record.status == "done":
                values[seed] = float(record.metrics["metric"])
            elif record.status == "diverged":
                values[seed] = math.nan
        return values

    def interval(self) -> Interval | None:
        finite = [v for v in self.metrics_by_seed().values() if math.isfinite(v)]
        return mean_ci(finite) if finite else None

    def diverged(self) -> int:
        """Seeds whose run diverged (or finished with a non-finite metric)."""
        return sum(not math.isfinite(v) for v in self.metrics_by_seed().values())

    def mean_decay_summary(self) -> dict[str, float]:
        summaries = [
            r.metrics.get("decay_summary") or {}
            for r in self.records.values()
            if r.status == "done"
        ]
        keys = set.intersection(*(set(s) for s in summaries)) if summaries else set()
        return {k: sum(s[k] for s in summaries) / len(summaries) for k in sorted(keys)}


@dataclass
class Comparison:
    """The outcome of a compare: arms, paired comparisons and their verdicts."""

    task: Task
    arms: list[Arm]
    paired: list[tuple[Arm, Arm, PairedComparison | None, str]]
    #: planned runs without a result, one line per kind (``workflow.missing_runs``): the
    #: store's unfinished statuses, "failed" and "running" (``store.STATUSES`` outside
    #: ``store.FINISHED``), and "missing" for runs never started
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def as_percent(self) -> bool:
        return metric_scale(self.task.metric)[1] == "%"


def summarize(
    task: Task,
    specs: Sequence[RunSpec],
    records: Iterable[RunRecord],
    key_of: Callable[[RunSpec], str],
) -> Comparison:
    """Group the store's records into arms, pair them by seed, and test each pair."""
    by_key = {r.key: r for r in records}
    arms: dict[str, Arm] = {}
    for spec in specs:
        arm = arms.setdefault(spec.optimizer, Arm(spec.optimizer, replace(spec, seed=0)))
        record = by_key.get(key_of(spec))
        if record is not None and record.status in FINISHED:
            arm.records[spec.seed] = record
    paired = []
    for first, second in pairs():
        if first in arms and second in arms:
            paired.append(_pair(task, arms[first], arms[second]))
    if not paired and len(arms) >= 2:  # e.g. adam vs sgdw: compare the first two given
        first, second = list(arms.values())[:2]
        paired.append(_pair(task, first, second))
    return Comparison(task, list(arms.values()), paired)


def _pair(task: Task, first: Arm, second: Arm):
    """Pair two arms over the seeds where both finished; the verdict says which seeds each
    arm lost to divergence, and a difference in divergence is reported as one in stability
    before the paired comparison of the survivors (which alone would flatter the arm that
    diverged: its hard seeds are gone)."""
    a, b = first.metrics_by_seed(), second.metrics_by_seed()
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    metric = task.metric.replace("_", " ")
    prefix = ""
    counts = [(first.diverged(), len(a), first.name), (second.diverged(), len(b), second.name)]
    if counts[0][0] or counts[1][0]:
        # by the share of seeds lost, not the count: arms may have finished different numbers
        (k, n, most), (j, m, other) = sorted(counts, key=lambda count: -count[0] / count[1])
        prefix = f"{most} diverged on {k} of {n} seeds, {other} on {j}" + (
            "" if m == n else f" of {m}"
        )
        if k * m != j * n:
            prefix += f": {most} is less stable at these settings"
        prefix += f"; on the {len(seeds)} seed{'' if len(seeds) == 1 else 's'} both finished: "
    if len(seeds) < 2:
        line = (
            f"Cannot compare {first.name} and {second.name}: need at least 2 seeds where "
            f"both finished (have {len(seeds)})"
        )
        return first, second, None, _after(prefix, line)
    comparison = paired_difference([a[s] for s in seeds], [b[s] for s in seeds])
    line = verdict(
        comparison,
        names=(first.name, second.name),
        metric=metric,
        lower_is_better=not task.higher_is_better,
        as_percent=metric_scale(task.metric)[1] == "%",
    )
    return first, second, comparison, _after(prefix, line)


def _after(prefix: str, sentence: str) -> str:
    """``sentence`` continuing ``prefix``: its first letter lowercased unless it is a name."""
    if not prefix or sentence.startswith(tuple(info.label for info in REGISTRY.values())):
        return prefix + sentence
    return prefix + sentence[0].lower() + sentence[1:]


def format_table(comparison: Comparison) -> str:
    """The plain-text table `decoupled compare` prints."""
    task, percent = comparison.task, comparison.as_percent
    scale, unit = metric_scale(task.metric)
    metric = task.metric.replace("_", " ")
    lines = [
        f"{'optimizer':<10}{'decay':<11}{'lr':>9}{'weight_decay':>14}  "
        f"{metric + ' (mean ± 95% CI)':<32}{'seeds':>6}{'diverged':>10}"
    ]
    for arm in comparison.arms:
        interval = arm.interval()
        if interval is None:
            cell = "—"
        elif interval.n < 2:
            cell = f"{interval.mean * scale:.2f}{unit} (one seed)"
        else:
            cell = f"{interval.mean * scale:.2f}{unit} ± {interval.half_width * scale:.2f}"
        lines.append(
            f"{arm.optimizer:<10}{REGISTRY[arm.optimizer].decay:<11}{arm.spec.lr:>9.3g}"
            f"{arm.spec.weight_decay:>14.3g}  {cell:<32}{len(arm.records):>6}"
            f"{arm.diverged():>10}"
        )
    for first, second, paired, line in comparison.paired:
        lines.append("")
        if paired is not None:
            points = " points" if percent else ""
            t_test = (
                "paired t-test undefined (all differences equal)"
                if paired.all_equal
                else f"paired t-test p = {paired.p_value:.3g}"
            )
            lines.append(
                f"paired difference ({second.name} − {first.name}, by seed): "
                f"{paired.mean_diff * scale:+.2f}{points}, 95% CI [{paired.low * scale:+.2f}, "
                f"{paired.high * scale:+.2f}], {t_test}, "
                f"Wilcoxon p = {paired.wilcoxon_p:.3g}, n = {paired.n}"
            )
        lines.append(f"verdict: {line}")
    return "\n".join(lines)
