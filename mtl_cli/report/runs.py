"""The runs under the paths `mtl report` is given: every run directory at any depth (single runs, sweep dirs,
sweeps of sweeps), each with what it says of itself: finished (metrics.json), failed (a sweep's failed.json),
or unfinished (started, no record: still running, or killed). Nothing here imports torch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtl_cli.engine.records import read_record
from mtl_cli.errors import FAILED, UserError

RECORD = "metrics.json"
SEED_KEYS = ("seed", "data.fold")  # the repetitions of one configuration: a group's runs differ only in these


@dataclass
class Run:
    path: Path
    status: str                      # finished | failed | unfinished
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    error: str | None = None

    def value(self, key: str) -> Any:
        """A dotted key of the run's resolved config (None where it has none)."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run directory under `paths`, sorted by path; a path that does not exist is the user's to fix."""
    runs: dict[Path, Run] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise UserError(f"{root}: no such file or folder; give run directories or sweep directories of mtl train")
        root = root.parent if root.is_file() else root
        for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            inside = set(folder.relative_to(root).parts[:-1]) | {folder.name}
            if inside & {".hydra", "checkpoints", "report"}:  # Hydra's copy of the config, not a run
                continue
            if folder not in runs and is_run_dir(folder):
                runs[folder] = read_run(folder)
    if not runs:
        raise UserError(f"no run directory (with .hydra/, config.yaml or {RECORD}) under {', '.join(map(str, paths))}")
    return [runs[p] for p in sorted(runs)]


def is_run_dir(folder: Path) -> bool:
    return (folder / RECORD).is_file() or (folder / FAILED).is_file() or (folder / "config.yaml").is_file() or (
        folder / ".hydra" / "overrides.yaml").is_file()


def read_run(folder: Path) -> Run:
    overrides = read_yaml(folder / ".hydra" / "overrides.yaml") or []
    config = read_yaml(folder / "config.yaml") or read_yaml(folder / ".hydra" / "config.yaml") or {}
    if (folder / FAILED).is_file():
        failure = json.loads((folder / FAILED).read_text())
        return Run(folder, "failed", failure.get("overrides", overrides), config,
                   error=f"{failure.get('kind', 'failed')}: {failure.get('error', '')}")
    if (folder / RECORD).is_file():
        try:
            record = read_record(folder / RECORD)
        except UserError as e:
            return Run(folder, "failed", overrides, config, error=str(e))
        if record.get("kind") == "train":
            return Run(folder, "finished", overrides, config, record)
    return Run(folder, "unfinished", overrides, config)


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def group_key(run: Run, by: list[str] | None, common: frozenset[str] = frozenset()) -> str:
    """The run's group: the values of the keys `by`, or its overrides other than the seed and the fold, Hydra's
    own, and those `common` to every run, as they were typed."""
    if by:
        return " ".join(f"{key}={run.value(key)}" for key in by)
    kept = [o for o in run.overrides if o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS
            and not o.startswith(("hydra.", "hydra/")) and o not in common]
    return " ".join(sorted(kept)) or "(defaults)"


def common_overrides(runs: list[Run]) -> frozenset[str]:
    """The overrides every finished run was given (the sweep's fixed settings): they name no group."""
    sets = [set(run.overrides) for run in runs if run.overrides and run.status == "finished"]
    return frozenset(set.intersection(*sets)) if len(sets) > 1 else frozenset()


def is_single_task(run: Run) -> bool:
    """A single-task baseline: architecture=stl, or one task only."""
    return (run.config.get("architecture") or {}).get("_target_", "").endswith(".SingleTask") or len(
        run.config.get("tasks") or {}) == 1
