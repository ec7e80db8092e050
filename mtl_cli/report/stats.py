"""Groups of runs as numbers: every per-task metric's mean and spread over a group's runs (its seeds or folds),
delta_m over the single-task baselines found among the runs in both conventions, Welch's t-test of each group
against a reference group, and a ranking."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from mtl_cli.metrics.delta_m import delta_m
from mtl_cli.report.runs import Run, common_overrides, group_key, is_single_task

ANCHORS = ("best", "final")  # the best validation epoch (on trainer.monitor) or the last one
CONVENTIONS = {"metrics": "delta_m % (per metric)", "tasks": "delta_m % (per task)"}  # Maninis et al.; LibMTL
SIGNIFICANCE = 0.05


@dataclass
class Group:
    name: str
    runs: list[Run]
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (task, metric) -> one per run

    def mean(self, key: tuple[str, str]) -> float:
        found = self.values.get(key, [])
        return statistics.fmean(found) if found else math.nan

    def std(self, key: tuple[str, str]) -> float:
        found = self.values.get(key, [])
        return statistics.stdev(found) if len(found) > 1 else math.nan


def metrics_of(run: Run, anchor: str) -> dict[str, dict[str, float]]:
    entry = run.record.get(anchor) or run.record.get("final") or {}
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in (entry.get("metrics") or {}).items()}


def directions(runs: list[Run]) -> dict[str, dict[str, bool]]:
    merged: dict[str, dict[str, bool]] = {}
    for run in runs:
        for task, metrics in ((run.record or {}).get("higher_is_better") or {}).items():
            merged.setdefault(task, {}).update(metrics)
    return merged


def baselines(runs: list[Run], anchor: str) -> dict[str, dict[str, float]]:
    """Each task metric's mean over the single-task runs (architecture=stl, or one task) that scored it."""
    found: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run.status == "finished" and is_single_task(run):
            for task, metrics in metrics_of(run, anchor).items():
                for metric, value in metrics.items():
                    found.setdefault(task, {}).setdefault(metric, []).append(value)
    return {task: {m: statistics.fmean(v) for m, v in metrics.items() if statistics.fmean(v) != 0}
            for task, metrics in found.items()}


def summarize(runs: list[Run], by: list[str] | None, anchor: str, base: dict) -> list[Group]:
    """The finished runs in groups, with their metrics and, given baselines, delta_m in both conventions (as the
    tasks ("all", "delta_m/metrics") and ("all", "delta_m/tasks"))."""
    ways, common = directions(runs), common_overrides(runs)
    groups: dict[str, Group] = {}
    for run in runs:
        if run.status != "finished":
            continue
        name = group_key(run, by, common)
        group = groups.setdefault(name, Group(name, []))
        group.runs.append(run)
        metrics = metrics_of(run, anchor)
        for task, values in metrics.items():
            for metric, value in values.items():
                group.values.setdefault((task, metric), []).append(float(value))
        covered = {t: {m: b for m, b in ms.items() if m in metrics.get(t, {})} for t, ms in base.items()
                   if t in metrics}
        covered = {t: ms for t, ms in covered.items() if ms}
        if covered and not is_single_task(run):
            for average in CONVENTIONS:
                group.values.setdefault(("all", f"delta_m/{average}"), []).append(
                    delta_m(metrics, covered, ways, average))
    return list(groups.values())


def welch(a: list[float], b: list[float]) -> float:
    """The two-sided p-value of Welch's t-test (unequal variances) that two groups' means differ; NaN with fewer
    than two runs on a side or no spread at all."""
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return math.nan
    import warnings

    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # "precision loss ... nearly identical": the p-value is then near 1 or NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False).pvalue)


def rank(groups: list[Group], ways: dict[str, dict[str, bool]]) -> list[Group]:
    """Best first: by mean delta_m (per metric) where the groups have one, else by the mean rank of the group over
    every metric (each in its own direction)."""
    key = ("all", "delta_m/metrics")
    if any(key in g.values for g in groups):  # the baselines' own group (no delta_m) comes last
        return sorted(groups, key=lambda g: -g.mean(key) if key in g.values else math.inf)
    metrics = sorted({k for g in groups for k in g.values if k[0] in ways})
    ranks = {g.name: [] for g in groups}
    for task, metric in metrics:
        higher = ways[task][metric]
        ordered = sorted((g for g in groups if (task, metric) in g.values),
                         key=lambda g: -g.mean((task, metric)) if higher else g.mean((task, metric)))
        for place, g in enumerate(ordered, 1):
            ranks[g.name].append(place)
    return sorted(groups, key=lambda g: statistics.fmean(ranks[g.name]) if ranks[g.name] else math.inf)
