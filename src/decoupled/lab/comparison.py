"""A compare's summary: the store's runs grouped into arms, paired by seed, tested, tabled.

Each optimizer ("arm") ran over seeds 0..K-1 (``plan.plan_compare``). Because a seed fixes
both the initial weights and the batch order, arms are paired by seed and compared with a
paired test (``stats.paired_difference``).

The pairs reported are each L2 optimizer with its decoupled twin (the registry's ``pairs``)
plus any the user names (``--pairs``); with more than one, every p-value is Holm-adjusted
across them (``stats.holm``). Every verdict comes with the power of its test
(``power.py``); a ``--seeds auto`` compare adds its sequential verdict (``sequential.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from decoupled.lab.compare_options import Sequential, SequentialPair
from decoupled.lab.power import power_line, power_summary
from decoupled.lab.sequential import MIN_SEEDS as MIN_LOOK
from decoupled.lab.sequential import PROCEDURE, looks, stop_reason
from decoupled.lab.stats import (
    Interval,
    PairedComparison,
    divergence_p,
    holm,
    mean_ci,
    paired_difference,
    verdict,
)
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
    #: per pair (as ``paired``): the power sentence of ``power.power_line``, None if undefined
    power: list[str | None] = field(default_factory=list)
    #: per pair, for a ``--seeds auto`` compare: its confidence sequence (None: < 2 seeds)
    sequential: list[SequentialPair | None] = field(default_factory=list)
    design: Sequential | None = None

    @property
    def as_percent(self) -> bool:
        return metric_scale(self.task.metric)[1] == "%"

    @property
    def adjusted(self) -> bool:
        """Whether the p-values are Holm-adjusted (more than one pair tested)."""
        return sum(paired is not None for _, _, paired, _ in self.paired) > 1

    def should_stop(self) -> bool:
        """A ``--seeds auto`` compare is done when every pair has a reason to stop."""
        return bool(self.sequential) and all(
            pair is not None and pair.reason is not None for pair in self.sequential
        )


def summarize(
    task: Task,
    specs: Sequence[RunSpec],
    records: Iterable[RunRecord],
    key_of: Callable[[RunSpec], str],
    extra_pairs: Sequence[tuple[str, str]] = (),
    sequential: Sequential | None = None,
) -> Comparison:
    """Group the store's records into arms, pair them by seed, and test each pair: the
    registry's L2/decoupled pairs among the arms, then ``extra_pairs`` (first, second)."""
    by_key = {r.key: r for r in records}
    arms: dict[str, Arm] = {}
    for spec in specs:
        arm = arms.setdefault(spec.optimizer, Arm(spec.optimizer, replace(spec, seed=0)))
        record = by_key.get(key_of(spec))
        if record is not None and record.status in FINISHED:
            arm.records[spec.seed] = record
    chosen = [(a, b) for a, b in pairs() if a in arms and b in arms]
    if not chosen and not extra_pairs and len(arms) >= 2:  # e.g. adam vs sgdw: the first two
        chosen.append(tuple(list(arms)[:2]))
    for a, b in extra_pairs:
        if {(a, b), (b, a)}.isdisjoint(chosen) and a in arms and b in arms:
            chosen.append((a, b))
    tested = [_compare_arms(arms[a], arms[b]) for a, b in chosen]
    alpha = sequential.alpha if sequential else 0.05
    adjusted = _holm_adjusted([comparison for _, comparison in tested])
    compared = max(1, sum(comparison is not None for _, comparison in tested))  # Holm's count
    paired, power, sequences = [], [], []
    for (a, b), (prefix, comparison), final in zip(chosen, tested, adjusted, strict=True):
        first, second = arms[a], arms[b]
        line = _verdict_line(task, first, second, prefix, final)
        if sequential is not None:
            pair = _sequence(first, second, sequential, len(chosen))
            sequences.append(pair)
            line = _after(
                prefix, sequential_verdict(task, first, second, pair, sequential, len(chosen))
            )
        paired.append((first, second, final, line))
        power.append(_power(task, comparison, final, alpha, compared))
    return Comparison(
        task, list(arms.values()), paired, power=power, sequential=sequences, design=sequential
    )


def _holm_adjusted(comparisons: list[PairedComparison | None]) -> list[PairedComparison | None]:
    """Each comparison with its p-values Holm-adjusted across those tested: the p its
    verdict reads (the t-test's, or Wilcoxon's when every difference is equal) as one
    family, the Wilcoxon column as another."""
    tested = [c for c in comparisons if c is not None]
    if len(tested) < 2:
        return comparisons
    deciding = holm([c.wilcoxon_p if c.all_equal else c.p_value for c in tested])
    wilcoxon = holm([c.wilcoxon_p for c in tested])
    adjusted = iter(
        replace(
            c,
            p_value=c.p_value if c.all_equal else decided,
            wilcoxon_p=decided if c.all_equal else w,
            adjusted_over=len(tested),
        )
        for c, decided, w in zip(tested, deciding, wilcoxon, strict=True)
    )
    return [None if c is None else next(adjusted) for c in comparisons]


def _power(task, raw: PairedComparison | None, final, alpha: float, pairs: int) -> str | None:
    """The power sentence of a pair; with several pairs, at Holm's strictest level
    alpha / pairs (the level its first step tests at)."""
    if raw is None or raw.n < 2:
        return None
    summary = power_summary(raw.mean_diff, raw.sd, raw.n, alpha / max(1, pairs))
    if summary is None:
        return None
    scale, unit = metric_scale(task.metric)
    p_value = final.wilcoxon_p if final.all_equal else final.p_value
    return power_line(summary, p_value < alpha, scale, " points" if unit == "%" else "")


def _sequence(first: Arm, second: Arm, design: Sequential, pairs: int) -> SequentialPair | None:
    """The pair's confidence sequence over the seeds both finished, in seed order, at level
    alpha / pairs (Bonferroni: every pair's sequence holds at once)."""
    a, b = first.metrics_by_seed(), second.metrics_by_seed()
    seeds = sorted(s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s]))
    if len(seeds) < 2:
        return None
    all_looks = looks([b[s] - a[s] for s in seeds], design.alpha / pairs, start=2)
    last = all_looks[-1]
    # Every arm has run its seeds: a pair short of max_seeds because seeds diverged stops
    # at max_seeds all the same.
    ran = max(len(first.metrics_by_seed()), len(second.metrics_by_seed()))
    reason = stop_reason(last, design.resolution, design.max_seeds)
    if reason is None and ran >= design.max_seeds:
        reason = "max seeds"
    return SequentialPair(last, reason, sum(look.n >= MIN_LOOK for look in all_looks))


def _compare_arms(first: Arm, second: Arm) -> tuple[str, PairedComparison | None]:
    """Pair two arms over the seeds where both finished: the verdict's prefix on divergence,
    and the paired comparison (None with fewer than 2 such seeds). A difference in
    divergence is reported as one in stability before the paired comparison of the
    survivors (which alone would flatter the arm that diverged: its hard seeds are gone)."""
    a, b = first.metrics_by_seed(), second.metrics_by_seed()
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    prefix = ""
    counts = [(first.diverged(), len(a), first.name), (second.diverged(), len(b), second.name)]
    if counts[0][0] or counts[1][0]:
        # by the share of seeds lost, not the count: arms may have finished different numbers
        (k, n, most), (j, m, other) = sorted(counts, key=lambda count: -count[0] / count[1])
        prefix = f"{most} diverged on {k} of {n} seeds, {other} on {j}" + (
            "" if m == n else f" of {m}"
        )
        if k * m != j * n:
            prefix += ": " + _stability(most, k, n, j, m)
        prefix += f"; on the {len(seeds)} seed{'' if len(seeds) == 1 else 's'} both finished: "
    if len(seeds) < 2:
        return prefix, None
    return prefix, paired_difference([a[s] for s in seeds], [b[s] for s in seeds])


def _stability(most: str, k: int, n: int, j: int, m: int) -> str:
    """Whether ``most`` diverging on ``k`` of ``n`` seeds against ``j`` of ``m`` is more
    than chance (``stats.divergence_p``: 5 against 0 of 5 seeds is p = 0.008; 3 against 0,
    p = 0.17, is not evidence)."""
    p = divergence_p(k, n, j, m)
    if p < 0.05:
        return f"{most} is less stable at these settings (Fisher's exact p = {p:.2g})"
    return f"{most} diverged more often, not significantly (Fisher's exact p = {p:.2g})"


def _verdict_line(task, first: Arm, second: Arm, prefix: str, comparison) -> str:
    """The verdict of a pair, after the divergence prefix of ``_compare_arms``."""
    if comparison is None:
        both = sum(
            math.isfinite(v) and math.isfinite(second.metrics_by_seed().get(s, math.nan))
            for s, v in first.metrics_by_seed().items()
        )
        line = (
            f"Cannot compare {first.name} and {second.name}: need at least 2 seeds where "
            f"both finished (have {both})"
        )
        return _after(prefix, line)
    metric = task.metric.replace("_", " ")
    line = verdict(
        comparison,
        names=(first.name, second.name),
        metric=metric,
        lower_is_better=not task.higher_is_better,
        as_percent=metric_scale(task.metric)[1] == "%",
    )
    return _after(prefix, line)


def _after(prefix: str, sentence: str) -> str:
    """``sentence`` continuing ``prefix``: its first letter lowercased unless it is a name."""
    if not prefix or sentence.startswith(tuple(info.label for info in REGISTRY.values())):
        return prefix + sentence
    return prefix + sentence[0].lower() + sentence[1:]


def format_bound(value: float) -> str:
    """An interval's bound, signed, to 2 decimals; one that would print as ±0.00 gets two
    significant digits instead, so that an interval just excluding 0 does not read as
    touching it."""
    text = f"{value:+.2f}"
    if value != 0.0 and float(text) == 0.0:
        text = f"{value:+.2g}"
    return text


#: After the fixed-n statistics of a ``--seeds auto`` compare: a t-test read after choosing
#: when to stop is not valid (its p is too small), so the verdict reads the sequence instead.
FIXED_N_NOTE = " (fixed-n, for reference; the verdict reads the confidence sequence)"
#: The same for its power line: a fixed-n t-test's power; the sequence, valid at every look,
#: needs larger differences or more seeds (its interval is wider).
FIXED_N_POWER = " (of a fixed-n t-test, for reference; the confidence sequence needs more)"


def format_table(comparison: Comparison) -> str:
    """The plain-text table `decoupled compare` prints."""
    task, percent = comparison.task, comparison.as_percent
    scale, unit = metric_scale(task.metric)
    metric = task.metric.replace("_", " ")
    width = max([10, *(len(arm.optimizer) + 1 for arm in comparison.arms)])  # adamw-cautious
    lines = [
        f"{'optimizer':<{width}}{'decay':<11}{'lr':>9}{'weight_decay':>14}  "
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
            f"{arm.optimizer:<{width}}{REGISTRY[arm.optimizer].decay:<11}{arm.spec.lr:>9.3g}"
            f"{arm.spec.weight_decay:>14.3g}  {cell:<32}{len(arm.records):>6}"
            f"{arm.diverged():>10}"
        )
    holm = " (Holm)" if comparison.adjusted else ""
    for index, (first, second, paired, line) in enumerate(comparison.paired):
        lines.append("")
        if paired is not None:
            points = " points" if percent else ""
            t_test = (
                "paired t-test undefined (all differences equal)"
                if paired.all_equal
                else f"paired t-test p{holm} = {paired.p_value:.3g}"
            )
            lines.append(
                f"paired difference ({second.name} − {first.name}, by seed): "
                f"{paired.mean_diff * scale:+.2f}{points}, "
                f"95% CI [{format_bound(paired.low * scale)}, "
                f"{format_bound(paired.high * scale)}], {t_test}, "
                f"Wilcoxon p{holm} = {paired.wilcoxon_p:.3g}, n = {paired.n}"
                + (FIXED_N_NOTE if comparison.design is not None else "")
            )
        lines.append(f"verdict: {line}")
        power = comparison.power[index] if index < len(comparison.power) else None
        if power is not None:
            label = "power" if comparison.design is None else f"power{FIXED_N_POWER}"
            lines.append(f"{label}: {power}")
    if comparison.adjusted:
        tested = sum(paired is not None for _, _, paired, _ in comparison.paired)
        lines.append("")
        lines.append(
            f"p-values marked (Holm) and in the verdicts are Holm-adjusted across the {tested} "
            "pairs reported; the 95% CIs are not adjusted"
        )
    return "\n".join(lines)


def sequential_verdict(task: Task, first: Arm, second: Arm, pair, design, pairs: int) -> str:
    """The verdict of a ``--seeds auto`` pair, read from its confidence sequence: who is
    better (or that neither is shown to be), the interval, why the seeds stopped, the
    procedure and its number of looks."""
    metric = task.metric.replace("_", " ")
    if pair is None:
        return (
            f"Cannot compare {first.name} and {second.name}: need at least 2 seeds where "
            "both finished"
        )
    scale, unit = metric_scale(task.metric)
    points = " points" if unit == "%" else ""
    look, level = pair.look, design.alpha / pairs
    if math.isinf(look.width):
        interval = "(−∞, +∞), too few seeds to bound it"
    else:
        interval = f"[{format_bound(look.low * scale)}, {format_bound(look.high * scale)}]{points}"
    sequence = (
        f"the {(1 - level) * 100:.3g}% confidence sequence for {second.name} − {first.name} "
        f"is {interval} after {look.n} seeds"
    )
    p_value = min(1.0, look.p_value * pairs)  # Bonferroni: each sequence ran at alpha / pairs
    family = f", Bonferroni over {pairs} pairs" if pairs > 1 else ""
    procedure = (
        f"{PROCEDURE}, {pair.looks} look{'' if pair.looks == 1 else 's'}, "
        f"anytime-valid p = {p_value:.2g}{family}"
    )
    if pair.reason == "excludes 0":
        second_lower = look.mean < 0
        second_wins = second_lower == (not task.higher_is_better)
        winner, loser = (second, first) if second_wins else (first, second)
        direction = "higher" if task.higher_is_better else "lower"
        return (
            f"{winner.name} has {direction} {metric} than {loser.name}: {sequence}, which "
            f"excludes 0 ({procedure})"
        )
    resolution = f"{(design.resolution or 0.0) * scale:g}{points}"
    stopped = {
        "resolution": f"stopped as it is narrower than the resolution {resolution}",
        "max seeds": f"stopped at the maximum of {design.max_seeds} seeds",
        None: "not decided yet: run the command again to add seeds",
    }[pair.reason]
    return (
        f"No significant difference in {metric} between {first.name} and {second.name}: "
        f"{sequence}, covering 0; {stopped} ({procedure})"
    )
