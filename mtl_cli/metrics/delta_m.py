"""delta_m: the relative gain of a multi-task model over single-task baselines, in percent (positive is better).

Per metric k of task t, with l = 1 where lower is better: g_k = (-1)^l (M_k - B_k) / B_k.
- `metrics` (Maninis et al. 2019 and most papers since): delta_m = 100 * mean over every metric k of g_k.
- `tasks` (LibMTL): delta_m = 100 * mean over tasks t of (mean over the metrics of t of g_k).

Baselines come from the config (`baselines: {task: {metric: value}}`) or from the metrics.json of single-task
runs (`baselines_from: [run dir, ...]`, their best validation results).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mtl_cli.engine.records import read_record, scored_metrics
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")

AVERAGES = ("metrics", "tasks")


def delta_m(metrics: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]],
            directions: Mapping[str, Mapping[str, bool]], average: str = "metrics") -> float:
    """delta_m of `metrics` ({task: {metric: value}}) over `baselines` (the same shape); NaN if one is missing."""
    if average not in AVERAGES:
        raise UserError(f"delta_m_average={average!r} is not one of {', '.join(AVERAGES)}: metrics averages over "
                        "every metric (Maninis et al.), tasks over each task's metrics first (LibMTL)")
    gains: dict[str, list[float]] = {}
    for task, base in baselines.items():
        for metric, b in base.items():
            m = metrics.get(task, {}).get(metric, math.nan)
            sign = 1.0 if directions[task][metric] else -1.0
            gains.setdefault(task, []).append(sign * (m - b) / b)
    if average == "metrics":
        values = [g for task_gains in gains.values() for g in task_gains]
    else:
        values = [sum(task_gains) / len(task_gains) for task_gains in gains.values()]
    return 100.0 * sum(values) / len(values)


class DeltaM:
    """delta_m of a run's validation metrics against checked baselines."""

    def __init__(self, baselines: Mapping[str, Mapping[str, float]], directions: Mapping[str, Mapping[str, bool]],
                 average: str = "metrics"):
        check_shape(baselines)
        for task, base in baselines.items():
            if task not in directions:
                raise UserError(f"baselines name task {task!r}, which this run does not train (its tasks: "
                                f"{', '.join(directions)})")
            for metric, value in base.items():
                if metric not in directions[task]:
                    raise UserError(f"baselines name metric {metric!r} of task {task!r}, which it does not compute "
                                    f"(it computes: {', '.join(directions[task])})")
                if not isinstance(value, (int, float)) or value == 0 or not math.isfinite(value):
                    raise UserError(f"baselines.{task}.{metric}={value!r}: a baseline must be a finite, non-zero "
                                    "number (delta_m divides by it)")
        delta_m({}, baselines, directions, average)  # checks `average`
        self.baselines = {task: dict(base) for task, base in baselines.items() if base}
        self.directions, self.average = directions, average
        left = [task for task in directions if task not in self.baselines]
        if left:
            log.warning(f"delta_m leaves out the tasks without a baseline: {', '.join(left)}")

    def __call__(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        self.check_scales(metrics)
        return delta_m(metrics, self.baselines, self.directions, self.average)

    def check_scales(self, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Warns once about a baseline 10x off its metric: most likely a percentage given for a fraction (miou and
        pixel_acc are fractions, within_* percentages) or the other way round."""
        if getattr(self, "_checked", False):
            return
        self._checked = True
        for task, base in self.baselines.items():
            for metric, b in base.items():
                m = metrics.get(task, {}).get(metric)
                if m is not None and math.isfinite(m) and m != 0 and not 0.1 <= abs(m / b) <= 10:
                    log.warning(f"baselines.{task}.{metric}={b} is far from this run's {m:.4g}: check its unit "
                                "(miou and pixel_acc are fractions, within_* percentages)")


def check_shape(baselines) -> None:
    if not isinstance(baselines, Mapping) or not all(isinstance(b, Mapping) and b for b in baselines.values()):
        raise UserError(f"baselines={baselines!r} must map each task to its metrics' values, e.g. "
                        "{segmentation: {miou: 0.383}, depth: {abs_err: 0.675}}")


def baselines_from_runs(run_dirs: Sequence[str | Path]) -> dict[str, dict[str, float]]:
    """The best validation metrics of each run (its metrics.json), task by task; a task in two runs is an error."""
    baselines: dict[str, dict[str, float]] = {}
    source: dict[str, Path] = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        if not path.is_file():
            raise UserError(f"baselines_from: {path} does not exist; give the run directories of finished mtl "
                            "train runs (each holds a metrics.json)")
        try:
            metrics = scored_metrics(read_record(path))
        except (UserError, KeyError, TypeError, AttributeError):
            raise UserError(f"baselines_from: {path} is not a metrics.json written by mtl train") from None
        for task, values in metrics.items():
            if task in baselines:
                raise UserError(f"baselines_from: task {task!r} is in both {source[task]} and {path}; give one run "
                                "per task")
            missing = [metric for metric, value in values.items() if value is None]
            if missing:
                raise UserError(f"baselines_from: {path} has no value for {task}/{missing[0]} (it was NaN or "
                                "infinite in that run), so it cannot be a baseline; give a finished run")
            baselines[task], source[task] = {k: float(v) for k, v in values.items()}, path
    return baselines


def build_delta_m(baselines: Mapping | None, runs: Sequence | None, directions: Mapping[str, Mapping[str, bool]],
                  average: str = "metrics") -> DeltaM | None:
    """The run's delta_m, or None when no baseline is given. Baselines from the config override those of runs;
    tasks of the runs that this run does not train are left out."""
    if baselines is not None:
        check_shape(baselines)
    merged = {task: values for task, values in baselines_from_runs(runs or []).items() if task in directions}
    for task, values in (baselines or {}).items():
        merged[task] = {**merged.get(task, {}), **values}
    if not merged:
        return None
    return DeltaM(merged, directions, average)
