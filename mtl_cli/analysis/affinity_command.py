"""`mtl affinity <run dir> groups=K [disjoint=true] [top=5] [epoch=E]`: which tasks should share a network, from
the affinities a run measured during training (`trainer.task_affinity.every=N`; analysis/affinity.py), by TAG's
network selection (analysis/grouping.py; Fifty et al., "Efficiently Identifying Task Groupings in Multi-Task
Learning", NeurIPS 2021). Prints the measured matrix, the best grouping with the affinity onto each task, and the
runners-up. Reads the run's metrics.json (or, for a run still training, its task_affinity.json). No torch import."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mtl_cli.analysis.grouping import MAX_TASKS, Grouping, propose
from mtl_cli.engine.records import read_record
from mtl_cli.errors import UserError

SETTINGS = {"groups": "the number of networks (groups) to split the tasks into",
            "disjoint": "true: each task in one group only; false (default): groups may share tasks, as in the paper",
            "top": "how many groupings to list (default 5)",
            "epoch": "use that epoch's mean instead of the whole run's"}
HOW = "train with trainer.task_affinity.every=N (e.g. 10) to measure them"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl affinity", description=__doc__.split("\n\n")[0],
                                epilog="settings: " + "; ".join(f"{k}: {v}" for k, v in SETTINGS.items()))
    p.add_argument("run", help="a run directory of mtl train (or its metrics.json)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="groups=K (required), disjoint, top, epoch")
    return p


def affinity(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    settings = parse_settings(args.settings)
    if "groups" not in settings:
        raise UserError("give the number of groups: mtl affinity <run dir> groups=K")
    section = read_affinities(Path(args.run))
    tasks, matrix, source = pick_matrix(section, settings.get("epoch"))
    k = settings["groups"]
    if not 1 <= k <= len(tasks):
        raise UserError(f"groups={k}: the run has {len(tasks)} tasks ({', '.join(tasks)}); give 1 to {len(tasks)}")
    if len(tasks) > MAX_TASKS:
        raise UserError(f"the run has {len(tasks)} tasks; the exhaustive search covers at most {MAX_TASKS}")
    found = propose(matrix, k, bool(settings.get("disjoint", False)), int(settings.get("top", 5)))
    print(render(tasks, matrix, source, found, k, bool(settings.get("disjoint", False))))
    return 0


def parse_settings(items: list[str]) -> dict:
    settings: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            raise UserError(f"{item!r} is not a setting of mtl affinity; it takes " + ", ".join(
                f"{k}=..." for k in SETTINGS))
        if key == "disjoint":
            if value.lower() not in ("true", "false"):
                raise UserError(f"disjoint={value}: expected true or false")
            settings[key] = value.lower() == "true"
            continue
        try:
            settings[key] = int(value)
        except ValueError:
            raise UserError(f"{key}={value}: expected an integer") from None
        if settings[key] < 1:
            raise UserError(f"{key}={value}: expected an integer of at least 1")
    return settings


def read_affinities(path: Path) -> dict:
    """The run's "task_affinity" section, or a UserError naming the run and the key to set."""
    run = path.parent if path.is_file() else path
    metrics, sidecar = run / "metrics.json", run / "task_affinity.json"
    if not run.is_dir():
        raise UserError(f"{path} is not a run directory of mtl train")
    if metrics.exists():
        record = read_record(metrics)
        if "task_affinity" in record:
            return record["task_affinity"]
    if sidecar.exists():  # a run still training, or stopped: the epochs measured so far
        return read_record(sidecar)
    where = metrics if metrics.exists() else run
    raise UserError(f"{where} has no task affinities (trainer.task_affinity.every was null): {HOW}")


def pick_matrix(section: dict, epoch: int | None) -> tuple[list[str], list[list[float | None]], str]:
    tasks = section["tasks"]
    if epoch is None:
        return tasks, section["mean"], f"mean of {section['measured_steps']} measured steps, every {section['every']}"
    epochs = {e["epoch"]: e for e in section["epochs"]}
    if epoch not in epochs:
        raise UserError(f"epoch={epoch}: the run measured affinities in epochs {', '.join(map(str, epochs))}")
    return tasks, epochs[epoch]["affinity"], f"epoch {epoch}, {epochs[epoch]['measured_steps']} measured steps"


def render(tasks: list[str], matrix: list[list], source: str, found: list[Grouping], k: int, disjoint: bool) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=False, color_system=None)
    measured = Table(title=f"TAG affinity Z(i -> j) ({source}): row i stepped on, column j's loss")
    measured.add_column("i \\ j")
    for name in tasks:
        measured.add_column(name, justify="right")
    for name, row in zip(tasks, matrix):
        measured.add_row(name, *(number(v) for v in row))
    console.print(measured)
    kind = "partitions into" if disjoint else "covers by at most"
    best = found[0]
    table = Table(title=f"best grouping into {k} groups (score {best.score:+.4g}; {kind} {k} groups, exhaustive)")
    for header in ("group", "members", "serves: affinity onto each from its group", "score"):
        table.add_column(header, justify="right" if header == "score" else "left")
    for n, (group, served) in enumerate(zip(best.groups, best.serves), 1):
        table.add_row(str(n), ", ".join(tasks[i] for i in group),
                      ", ".join(f"{tasks[j]} {best.onto[j]:+.4g}" for j in served) or "-",
                      f"{best.group_score(n - 1):+.4g}")
    console.print(table)
    others = Table(title=f"the top {len(found)} groupings")
    for header in ("rank", "groups", "score"):
        others.add_column(header, justify="right" if header == "score" else "left")
    for rank, grouping in enumerate(found, 1):
        others.add_row(str(rank), " | ".join("{" + ", ".join(tasks[i] for i in g) + "}" for g in grouping.groups),
                       f"{grouping.score:+.4g}")
    console.print(others)
    notes = ["score: the sum over the tasks of the mean affinity onto each from the other members of the group that "
             "serves it best (0 alone); Fifty et al. 2021."]
    if any(v is None or not math.isfinite(v) for row in matrix for v in row):
        notes.append("n/a entries (tasks that never met in a batch) count as 0.")
    return buffer.getvalue().rstrip() + "\n" + "\n".join(notes)


def number(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.4f}"

