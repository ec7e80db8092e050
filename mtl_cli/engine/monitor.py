"""The quantity best.pt is chosen on (val/loss/total, val/loss/<task>, val/<task>/<metric> or val/delta_m), and
what a run returns to a sweeper: that quantity's best value, or the `objectives` at the epoch best.pt holds."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mtl_cli.engine.batches import flatten
from mtl_cli.errors import UserError
from mtl_cli.tasks import Task


def higher_is_better(tasks: Mapping[str, Task], delta_m: bool) -> dict[str, bool]:
    """Every value validation logs that a run can be judged by -> whether higher is better."""
    higher = {f"val/{task}/{metric}": up for task in tasks for metric, up in tasks[task].directions().items()}
    higher.update({f"val/loss/{task}": False for task in [*tasks, "total"]})
    if delta_m:
        higher["val/delta_m"] = True
    return higher


class Monitor:
    def __init__(self, name: str, mode: str, tasks: Mapping[str, Task], delta_m: bool = False):
        higher = higher_is_better(tasks, delta_m)
        if name not in higher:
            hint = " (val/delta_m needs baselines or baselines_from)" if name == "val/delta_m" else ""
            raise UserError(f"trainer.monitor={name!r} is not logged by this run{hint}; choose one of: "
                            + ", ".join(sorted(higher)))
        self.name = name
        self.mode = mode if mode != "auto" else ("max" if higher[name] else "min")

    def value(self, results: dict) -> float:
        """The monitored value; NaN when validation did not compute it (trainer.limit_val_batches cut it off)."""
        return flatten(results).get(self.name, math.nan)

    def improved(self, results: dict, best: float | None) -> bool:
        value = self.value(results)
        if best is None or (math.isnan(best) and not math.isnan(value)):
            return True
        return value > best if self.mode == "max" else value < best


class Objectives:
    """What a run returns to a sweeper (Optuna): trainer.monitor's best value, or, when `objectives` lists logged
    values (a multi-objective study, e.g. [val/segmentation/miou, val/depth/abs_err]), each of them at the epoch
    best.pt holds, so that every point of a Pareto front is one saved model."""

    def __init__(self, names, monitor: Monitor, tasks: Mapping[str, Task], delta_m: bool = False):
        self.names, self.monitor = list(names or []), monitor
        if len(set(self.names)) < len(self.names):
            raise UserError(f"objectives={self.names} names a value twice: give each once")
        logged = higher_is_better(tasks, delta_m)
        unknown = [name for name in self.names if name not in logged]
        if unknown:
            raise UserError(f"objectives={self.names}: {', '.join(unknown)} is not logged by this run; choose from: "
                            + ", ".join(sorted(logged)))
        modes = {name: "max" if logged[name] else "min" for name in self.names} or {monitor.name: monitor.mode}
        self.directions = {name: "maximize" if mode == "max" else "minimize" for name, mode in modes.items()}

    def values(self, best: float | None, best_results: dict | None) -> float | list[float]:
        if not self.names:
            return math.nan if best is None else float(best)
        logged = flatten(best_results) if best_results else {}  # none: no validation ran
        values = [float(logged.get(name, math.nan)) for name in self.names]
        return values[0] if len(values) == 1 else values


def objective_directions(cfg) -> dict[str, str]:
    """objective -> "maximize" or "minimize", from the config alone (for a sweeper, before any trial runs)."""
    from mtl_cli.build import build_tasks, resolve_data

    tasks, delta_m = build_tasks(resolve_data(cfg)), bool(cfg.get("baselines") or cfg.get("baselines_from"))
    monitor = Monitor(cfg.trainer.monitor, cfg.trainer.monitor_mode, tasks, delta_m)
    return Objectives(cfg.get("objectives"), monitor, tasks, delta_m).directions
