"""The run records, written and read here only: metrics.json (a training run) and eval.json (mtl eval).

One schema: "kind" (train or eval), per-task "metrics" inside "final" and "best" (train) or at the top (eval),
"higher_is_better" per task and metric, "delta_m" where baselines were given, the epochs and steps, timings. They
are strict JSON: a value that is NaN or infinite is written as null and its place listed under "nonfinite" (JSON
has no NaN; Python's json would write a bare NaN that other readers refuse), and a file is replaced whole or not
at all."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mtl_cli.engine.atomic import write_atomically
from mtl_cli.errors import UserError


def write_record(path: Path, record: dict[str, Any], nonfinite: list[str] | None = None) -> None:
    """`nonfinite`: places already nulled (a record read back and extended)."""
    nonfinite = list(nonfinite or [])
    clean = finite_or_null(record, "", nonfinite)
    if nonfinite:
        clean["nonfinite"] = nonfinite
    text = json.dumps(clean, indent=2, allow_nan=False)
    write_atomically(path, lambda f: f.write(text.encode()))


def finite_or_null(value: Any, where: str, nonfinite: list[str]) -> Any:
    """`value` with every non-finite float replaced by None; their dotted places are appended to `nonfinite`."""
    if isinstance(value, float) and not math.isfinite(value):
        nonfinite.append(where)
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{where}.{k}" if where else str(k), nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{where}[{i}]", nonfinite) for i, v in enumerate(value)]
    return value


def train_record(state, monitor, seconds: float) -> dict[str, Any]:
    """metrics.json of a training run (`state`: engine.state.TrainState)."""
    return {"kind": "train", "final": state.results, "best": state.best_results,
            "monitor": {"name": monitor.name, "mode": monitor.mode, "value": state.best},
            "epochs": state.epoch, "steps": state.step, "skipped_steps": state.skipped_steps,
            "train_seconds": round(seconds, 2), "higher_is_better": directions(state.tasks)}


def add_to_record(path: Path, key: str, value: Any) -> None:
    """`path`'s record with `key` set to `value` (a section an analysis adds: metrics.json's "task_affinity")."""
    record = read_record(path)
    earlier = [place for place in record.pop("nonfinite", []) if place.split(".")[0].split("[")[0] != key]
    record[key] = value
    write_record(path, record, earlier)


def eval_record(checkpoint_path: Path, split: str, checkpoint: dict, results: dict, tasks) -> dict[str, Any]:
    """eval.json of mtl eval."""
    return {"kind": "eval", "checkpoint": str(Path(checkpoint_path).resolve()), "split": split,
            "epoch": checkpoint["epoch"], "step": checkpoint["step"], "loss": results["loss"],
            "metrics": results["metrics"], **({"delta_m": results["delta_m"]} if "delta_m" in results else {}),
            "higher_is_better": directions(tasks)}


def directions(tasks) -> dict[str, dict[str, bool]]:
    return {name: task.directions() for name, task in tasks.items()}


def read_record(path: Path) -> dict[str, Any]:
    """A metrics.json or eval.json, or a UserError naming the file."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable run record ({type(e).__name__}); give a run directory of mtl "
                        "train or mtl eval") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not a run record written by mtl")
    return record


def scored_metrics(record: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The per-task metrics a record vouches for: a training run's best epoch (its last if none was best), or an
    evaluation's."""
    if "final" in record or "best" in record:
        return (record.get("best") or record["final"])["metrics"]
    return record["metrics"]
