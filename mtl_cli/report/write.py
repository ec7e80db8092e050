"""What `mtl report` writes: the table (terminal and report.md), the tidy report.csv (one row per run x metric)
and the plots (matplotlib, PNG)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mtl_cli.report import curves
from mtl_cli.report.runs import SEED_KEYS, Run
from mtl_cli.report.stats import CONVENTIONS, SIGNIFICANCE, Group, welch

CSV_FIELDS = ["run", "group", "status", "seed", "anchor", "task", "metric", "value", "higher_is_better"]


def rows(groups: list[Group], ways: dict, ref: Group | None) -> list[tuple[str, list[str]]]:
    """(label, a cell per group) for delta_m and every task metric: mean ± std, * where Welch's test against the
    reference group says p < SIGNIFICANCE."""
    keys = [("all", f"delta_m/{c}") for c in CONVENTIONS if any(("all", f"delta_m/{c}") in g.values for g in groups)]
    keys += sorted({k for g in groups for k in g.values if k[0] != "all"})
    table = []
    for task, metric in keys:
        higher = True if task == "all" else ways.get(task, {}).get(metric, True)
        label = CONVENTIONS[metric.split("/")[1]] if task == "all" else f"{task} {metric}"
        cells = []
        for g in groups:
            mean, std = g.mean((task, metric)), g.std((task, metric))
            if math.isnan(mean):
                cells.append("-")
                continue
            p = math.nan if ref is None or g is ref else welch(g.values[(task, metric)],
                                                               ref.values.get((task, metric), []))
            mark = "*" if p < SIGNIFICANCE else ""
            cells.append(f"{mean:.4g} ± {std:.2g}{mark}" if not math.isnan(std) else f"{mean:.4g}{mark}")
        table.append((f"{label} {'↑' if higher else '↓'}", cells))
    return table


def headers(groups: list[Group]) -> list[str]:
    return [f"#{i} {g.name} (n={len(g.runs)})" for i, g in enumerate(groups, 1)]


def terminal_table(groups: list[Group], ways: dict, ref: Group | None, title: str) -> str:
    table = Table(title=title)
    table.add_column("metric")
    for header in headers(groups):
        table.add_column(header, justify="right")
    for label, cells in rows(groups, ways, ref):
        table.add_row(label, *cells)
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=False, color_system=None).print(table)
    return buffer.getvalue().rstrip()


def markdown(groups: list[Group], ways: dict, ref: Group | None, title: str, notes: list[str]) -> str:
    lines = [f"# {title}", "", "| metric | " + " | ".join(headers(groups)) + " |",
             "|---|" + "---|" * len(groups)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows(groups, ways, ref)]
    return "\n".join(lines + [""] + notes) + "\n"


def write_csv(path: Path, runs: list[Run], group_of: dict[Path, str], anchor: str, ways: dict,
              extra: dict[Path, dict[str, float]]) -> None:
    """One row per run x metric (delta_m as task "all"); failed and unfinished runs get one row without a value."""
    from mtl_cli.report.stats import metrics_of

    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, CSV_FIELDS)
        out.writeheader()
        for run in runs:
            base = {"run": str(run.path), "group": group_of.get(run.path, ""), "status": run.status,
                    "seed": next((run.value(k) for k in SEED_KEYS if run.value(k) is not None), ""), "anchor": anchor}
            if run.status != "finished":
                out.writerow({**base, "task": "", "metric": "", "value": "", "higher_is_better": ""})
                continue
            for task, metrics in metrics_of(run, anchor).items():
                for metric, value in metrics.items():
                    out.writerow({**base, "task": task, "metric": metric, "value": value,
                                  "higher_is_better": ways.get(task, {}).get(metric, "")})
            for metric, value in extra.get(run.path, {}).items():
                out.writerow({**base, "task": "all", "metric": metric, "value": value, "higher_is_better": True})


def plots(folder: Path, groups: list[Group], ways: dict) -> list[Path]:
    """delta_m per group with error bars (when there are baselines), and each metric per group: the mean as a bar,
    ± one standard deviation, every run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    names = [g.name for g in groups]
    key = ("all", "delta_m/metrics")
    scored = [g for g in groups if key in g.values]  # not the single-task baselines' own group
    if scored:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(scored) + 2), 3.6))
        bars(ax, scored, key)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("delta_m (%) over single-task")
        ax.set_title("delta_m per group (mean ± std over seeds; dots: runs)")
        written.append(save(fig, folder / "delta_m.png", [g.name for g in scored], ax))
    metrics = sorted({k for g in groups for k in g.values if k[0] != "all"})
    if metrics:
        cols = min(3, len(metrics))
        rows_ = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), squeeze=False)
        for ax, (task, metric) in zip(axes.flat, metrics):
            points(ax, groups, (task, metric))
            arrow = "↑" if ways.get(task, {}).get(metric, True) else "↓"
            ax.set_title(f"{task} {metric} {arrow}", fontsize=10)
            ax.set_xticks(range(len(groups)), names, rotation=30, ha="right", fontsize=8)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=120)
        plt.close(fig)
        written.append(folder / "metrics.png")
    logged = curves.curves(groups)
    made = [curves.plot_curves(folder, logged, "val/loss/", "validation loss per group (line: mean; band: lowest "
                               "to highest run)", "val_curves.png"),
            curves.plot_curves(folder, logged, "train/weight/", "task weights over training (line: mean; band: lowest to highest run)",
                               "weights.png"),
            curves.plot_conflicts(folder, logged)]
    return written + [m for m in made if m is not None]


def html(groups: list[Group], ways: dict, ref: Group | None, title: str, notes: list[str],
         pictures: list[Path]) -> str:
    """One static page: the table, the notes, every plot (beside it in the same folder)."""
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in ["metric", *headers(groups)])
    body = "".join("<tr><td>" + escape(label) + "</td>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"
                   for label, cells in rows(groups, ways, ref))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} td:first-child{text-align:left} "
             "img{max-width:100%;margin:1em 0;display:block}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{style}</style>"
            f"</head><body><h1>{escape(title)}</h1><table><tr>{head}</tr>{body}</table>"
            + "".join(f"<p>{escape(n)}</p>" for n in notes)
            + "".join(f"<img src='{escape(p.name)}' alt='{escape(p.stem)}'>" for p in pictures) + "</body></html>\n")


def bars(ax, groups: list[Group], key: tuple[str, str]) -> None:
    means = [g.mean(key) for g in groups]
    stds = [0.0 if math.isnan(g.std(key)) else g.std(key) for g in groups]
    ax.bar(range(len(groups)), means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
    for i, g in enumerate(groups):
        found = g.values.get(key, [])
        ax.scatter([i] * len(found), found, color="#08306b", s=12, zorder=3)


def points(ax, groups: list[Group], key: tuple[str, str]) -> None:
    """Each group's mean ± one standard deviation, and its runs as light dots beside it (close values stay
    visible: no bar from zero)."""
    for i, g in enumerate(groups):
        found = g.values.get(key, [])
        ax.scatter([i + 0.15] * len(found), found, color="#9ecae1", s=14, zorder=2)
        std = 0.0 if math.isnan(g.std(key)) else g.std(key)
        ax.errorbar([i], [g.mean(key)], yerr=[std], fmt="o", color="#08306b", capsize=4, zorder=3)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.grid(axis="y", alpha=0.3)


def save(fig, path: Path, names: list[str], ax) -> Path:
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
