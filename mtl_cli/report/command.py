"""`mtl report PATH... [--by KEY ...] [--ref GROUP] [--anchor best|final] [--out DIR]`: which configuration is
best for these tasks, and by how much. Reads run directories (single runs, sweeps, any nesting), groups them by
their overrides other than the seed and the fold, and reports each group's mean and spread, delta_m over the
single-task runs among them, and which differences to the reference group are significant. No torch import."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mtl_cli.errors import UserError
from mtl_cli.report import stats, write
from mtl_cli.report.runs import common_overrides, find_runs, group_key

log = logging.getLogger("mtl")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl report", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run directories or sweep directories of mtl train")
    p.add_argument("--by", nargs="+", metavar="KEY", help="group by these config keys (e.g. weighting._target_) "
                   "instead of the overrides other than seed and data.fold")
    p.add_argument("--ref", help="the reference group the others are tested against (its name or part of it; "
                   "default: the group that trains with ew)")
    p.add_argument("--anchor", choices=stats.ANCHORS, default="best",
                   help="each run's best validation epoch (on trainer.monitor) or its final one (default: best)")
    p.add_argument("--baseline", nargs="+", default=[], metavar="PATH",
                   help="more run directories of single-task runs for delta_m (those among PATHS count too)")
    p.add_argument("--out", help="where report.md, report.csv and the plots go (default: PATH/report)")
    return p


def report(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    runs = find_runs(args.paths)
    baseline_runs = find_runs(args.baseline) if args.baseline else []
    base = stats.baselines(runs + baseline_runs, args.anchor)
    groups = stats.summarize(runs, args.by, args.anchor, base)
    if not groups:
        raise UserError(f"none of the {len(runs)} runs under {', '.join(args.paths)} has finished (no metrics.json "
                        "with a training record)")
    ways = stats.directions(runs)
    groups = stats.rank(groups, ways)
    ref = reference(groups, args.ref)
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{len(groups)} groups of {sum(len(g.runs) for g in groups)} runs, {args.anchor} epoch of each"
    notes = notes_for(runs, ref, base)
    print(write.terminal_table(groups, ways, ref, title))
    print("\n".join(notes))
    (out / "report.md").write_text(write.markdown(groups, ways, ref, title, notes))
    common = common_overrides(runs)
    group_of = {run.path: group_key(run, args.by, common) for run in runs}
    deltas: dict = {}  # run -> its delta_m in each convention, where its group has one for every run
    for g in groups:
        for convention in stats.CONVENTIONS:
            values = g.values.get(("all", f"delta_m/{convention}"), [])
            for run, value in zip(g.runs, values) if len(values) == len(g.runs) else ():
                deltas.setdefault(run.path, {})[f"delta_m/{convention}"] = value
    write.write_csv(out / "report.csv", runs, group_of, args.anchor, ways, deltas)
    pictures = write.plots(out, groups, ways)
    (out / "report.html").write_text(write.html(groups, ways, ref, title, notes, pictures))
    print(f"wrote {out / 'report.html'}, {out / 'report.md'}, {out / 'report.csv'}"
          + "".join(f", {p}" for p in pictures))
    return 0


def reference(groups: list[stats.Group], wanted: str | None) -> stats.Group | None:
    if wanted is not None:
        found = [g for g in groups if wanted == g.name] or [g for g in groups if wanted in g.name]
        if len(found) != 1:
            raise UserError(f"--ref {wanted!r} matches {len(found)} groups; the groups are: "
                            + "; ".join(g.name for g in groups))
        return found[0]
    return next((g for g in groups if all(str(r.value("weighting._target_")).endswith(".EqualWeighting")
                                          for r in g.runs) and "architecture=stl" not in g.name), None)


def notes_for(runs, ref, base) -> list[str]:
    notes = [f"* differs from the reference group ({ref.name if ref else 'none'}) with p < {stats.SIGNIFICANCE} "
             "(Welch's two-sided t-test over the groups' runs; needs 2+ runs on each side). Groups are ranked by "
             "mean delta_m, or by their mean rank over the metrics without baselines."]
    if base:
        notes.append("delta_m over single-task runs (architecture=stl or one task) found among the runs: "
                     + ", ".join(f"{t}: {', '.join(ms)}" for t, ms in base.items())
                     + "; per metric = Maninis et al. 2019, per task = LibMTL.")
    for run in runs:
        if run.status != "finished":
            notes.append(f"{run.status}: {run.path}" + (f" ({run.error})" if run.error else ""))
    return notes
