"""What the runs logged over time, read back from their TensorBoard events (tensorboard's own reader, no torch):
validation losses per group (mean and the band of its runs), the task weights over training, and the mean
gradient-conflict matrix (grad/cos) per group."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtl_cli.report.stats import Group


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's events: (step, value) in step order; {} without events."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def curves(groups: list[Group]) -> dict[str, list[dict[str, list[tuple[int, float]]]]]:
    """group name -> the scalars of each of its runs that logged any."""
    found = {}
    for g in groups:
        logged = [s for s in (scalars(run.path) for run in g.runs) if s]
        if logged:
            found[g.name] = logged
    return found


def band(series: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, low, high) over the runs, at the steps every run logged."""
    common = sorted(set.intersection(*[{s for s, _ in one} for one in series]))
    values = np.array([[dict(one)[s] for s in common] for one in series])
    return np.array(common), values.mean(0), values.min(0), values.max(0)


def plot_curves(folder: Path, logged: dict, prefix: str, title: str, name: str) -> Path | None:
    """One panel per tag under `prefix` (e.g. val/loss/), a line per group: the mean over its runs and the band
    from their lowest to highest value."""
    from matplotlib import pyplot as plt

    tags = sorted({t for runs in logged.values() for run in runs for t in run if t.startswith(prefix)})
    if not tags:
        return None
    cols = min(3, len(tags))
    fig, axes = plt.subplots(math.ceil(len(tags) / cols), cols, figsize=(4.4 * cols, 3.0 * math.ceil(len(tags) / cols)),
                             squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for group, runs in logged.items():
            series = [run[tag] for run in runs if tag in run]
            if not series:
                continue
            steps, mean, low, high = band(series)
            line, = ax.plot(steps, mean, label=group, linewidth=1.5)
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(tag.removeprefix(prefix), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=120)
    plt.close(fig)
    return folder / name


def plot_conflicts(folder: Path, logged: dict) -> Path | None:
    """Per group, the mean over its runs and over training of each pair's gradient cosine (grad/cos/<a>-<b>)."""
    from matplotlib import pyplot as plt

    matrices = {}
    for group, runs in logged.items():
        pairs = {}
        for run in runs:
            for tag, series in run.items():
                if tag.startswith("grad/cos/"):
                    pairs.setdefault(tuple(tag.removeprefix("grad/cos/").split("-", 1)), []).extend(v for _, v in series)
        if pairs:
            tasks = sorted({t for pair in pairs for t in pair})
            matrix = np.eye(len(tasks))
            for (a, b), values in pairs.items():
                matrix[tasks.index(a), tasks.index(b)] = matrix[tasks.index(b), tasks.index(a)] = np.mean(values)
            matrices[group] = (tasks, matrix)
    if not matrices:
        return None
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for ax, (group, (tasks, matrix)) in zip(axes.flat, matrices.items()):
        shown = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(matrix[i, j]) > 0.6 else "black")
        ax.set_title(group, fontsize=9)
    fig.colorbar(shown, ax=list(axes.flat), shrink=0.8, label="mean cosine of task gradients")
    fig.savefig(folder / "conflicts.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return folder / "conflicts.png"
