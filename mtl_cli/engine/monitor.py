"""The quantity best.pt is chosen on: val/loss/total, val/loss/<task>, val/<task>/<metric> or val/delta_m."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mtl_cli.engine.batches import flatten
from mtl_cli.errors import UserError
from mtl_cli.tasks import Task


class Monitor:
    def __init__(self, name: str, mode: str, tasks: Mapping[str, Task], delta_m: bool = False):
        directions = {f"val/{task}/{metric}": higher for task in tasks
                      for metric, higher in tasks[task].directions().items()}
        directions.update({f"val/loss/{task}": False for task in [*tasks, "total"]})
        if delta_m:
            directions["val/delta_m"] = True
        if name not in directions:
            hint = " (val/delta_m needs baselines or baselines_from)" if name == "val/delta_m" else ""
            raise UserError(f"trainer.monitor={name!r} is not logged by this run{hint}; choose one of: "
                            + ", ".join(sorted(directions)))
        self.name = name
        self.mode = mode if mode != "auto" else ("max" if directions[name] else "min")

    def value(self, results: dict) -> float:
        """The monitored value; NaN when validation did not compute it (trainer.limit_val_batches cut it off)."""
        return flatten(results).get(self.name, math.nan)

    def improved(self, results: dict, best: float | None) -> bool:
        value = self.value(results)
        if best is None or (math.isnan(best) and not math.isnan(value)):
            return True
        return value > best if self.mode == "max" else value < best
