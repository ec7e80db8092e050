"""The per-task metrics table printed at the end of training and by mtl eval."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table


def metrics_table(columns: dict[str, dict], directions: dict[str, dict[str, bool]], title: str = "metrics") -> str:
    """columns: header -> results ({"loss": ..., "metrics": {task: {metric: value}}}); returns the table as text."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    for header in columns:
        table.add_column(header, justify="right")
    for task, metrics in directions.items():
        for metric, higher in metrics.items():
            arrow = "↑" if higher else "↓"
            values = [columns[h]["metrics"].get(task, {}).get(metric) for h in columns]
            table.add_row(task, f"{metric} {arrow}", *("-" if v is None else f"{v:.4f}" for v in values))
    for task in directions:
        values = [columns[h]["loss"].get(task) for h in columns]
        table.add_row(task, "loss ↓", *("-" if v is None else f"{v:.4f}" for v in values))
    if any("delta_m" in column for column in columns.values()):
        values = [columns[h].get("delta_m") for h in columns]
        table.add_row("all", "delta_m % ↑", *("-" if v is None else f"{v:+.2f}" for v in values))
    buffer = io.StringIO()
    Console(file=buffer, width=120, force_terminal=False, color_system=None).print(table)
    return "\n" + buffer.getvalue().rstrip()
