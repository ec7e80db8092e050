"""Task affinity during training: TAG's lookahead inter-task affinity (`trainer.task_affinity.every=N`).

Fifty, Amid, Zhao, Yu, Anil and Finn, "Efficiently Identifying Task Groupings in Multi-Task Learning", NeurIPS 2021.

The science: how much does a step on task i's loss alone help task j? On the step's batch X, the shared parameters
take one update on grad L_i (the task-specific parameters stay as they are), and the affinity of i onto j is the
relative change of task j's loss,

    Z(i -> j) = 1 - L_j(X, theta_s after the update on task i, theta_j) / L_j(X, theta_s, theta_j),

positive when task i's step lowers task j's loss. Z(i -> i) is the task's own progress. The paper averages Z over the
measured steps of training; its network selection (analysis/grouping.py) reads that mean.

Which update. The paper writes the lookahead as plain SGD at the learning rate, for notation; its released code takes
the training optimizer's update. Here `update: optimizer` (the default) is one step of the run's own optimizer from
its current state (Adam's moments, SGD's momentum, weight decay) on task i's gradient of the shared parameters, so
the probe measures the step training actually takes: with AdamW, a plain SGD step at AdamW's learning rate would be
orders of magnitude smaller than the real one, and its ranking of tasks would follow the gradients' scales, which
Adam divides out. `update: sgd` is the paper's equation (theta_s - lr grad L_i), at the optimizer's learning rate of
its first group. With torch.optim.SGD without momentum and weight decay, the two are the same.

What this code adds: the probe leaves no trace. The shared parameters, the model's buffers (batch-norm statistics,
updated by the probe's forward passes in train mode), the optimizer's state, every `.grad` and the random generators
are restored exactly, so a run trains bit-identically with and without it. Every forward of a probe starts from the
same generator state, so dropout draws the same masks before and after the lookahead (the paper does not say). The
affinities are averaged per epoch (an entry where a task had no targets, or a zero loss, is left out of its mean),
logged as `affinity/<i>-><j>`, drawn as a heat map and written to metrics.json with the whole-run mean; the cost of
a measurement (seconds, and as a fraction of a training step: data loading included) is logged and recorded. A probe
costs one forward and T backward passes through the whole model, then T forward passes. One process only; a run
resumed mid-epoch loses that epoch's measurements before the checkpoint (those of finished epochs are kept in the
run dir's task_affinity.json).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtl_cli.engine.records import add_to_record, write_record
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")

SIDECAR = "task_affinity.json"  # the epochs measured so far: a resumed run continues from them
HEATMAP = "task_affinity.png"


def lookahead_affinity(model: nn.Module, losses_of: Callable[[], dict[str, torch.Tensor]], tasks: Sequence[str],
                       lr: float, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Z [T, T] in float64, Z[i, j] = Z(tasks[i] -> tasks[j]); NaN where a task has no loss in the batch or a zero
    loss before. `losses_of()` is the loop's forward through the whole model on the step's batch; `optimizer` None
    is the plain SGD lookahead at `lr`. Everything it changes is restored before it returns."""
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    stepped = [] if optimizer is None else [p for group in optimizer.param_groups for p in group["params"]]
    grads = {id(p): (p, p.grad) for p in [*model.parameters(), *stepped]}  # the loop sets them to None later
    saved = [p.detach().clone() for p in shared]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    moments = {id(p): copy.deepcopy(optimizer.state[p]) for p in shared if p in getattr(optimizer, "state", {})}
    z = torch.full((len(tasks), len(tasks)), math.nan, dtype=torch.float64)
    devices = [p.device for p in shared[:1] if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        draws = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        try:
            before = losses_of()
            present = [t for t in tasks if t in before]
            gradients = [torch.autograd.grad(before[t], shared, retain_graph=k < len(present) - 1, allow_unused=True)
                         for k, t in enumerate(present)]  # all first: a lookahead's in-place update breaks the graph
            before = {t: float(before[t].detach()) for t in present}
            for p, _ in grads.values():
                p.grad = None
            for source, gradient in zip(present, gradients):
                with torch.no_grad():
                    step(shared, gradient, lr, optimizer)
                    same_draws(draws, devices)
                    after = losses_of()
                    restore(shared, saved, optimizer, moments)
                for target in present:
                    if target in after and before[target] != 0:
                        z[tasks.index(source), tasks.index(target)] = 1 - float(after[target]) / before[target]
        finally:
            with torch.no_grad():
                restore(shared, saved, optimizer, moments)
                for b, value in buffers:
                    b.copy_(value)
            for p, grad in grads.values():
                p.grad = grad
    return z


def step(shared: list[nn.Parameter], gradient: Sequence[torch.Tensor | None], lr: float,
         optimizer: torch.optim.Optimizer | None) -> None:
    """The shared parameters' update on one task's gradient: the optimizer's (the others have no .grad, so it
    leaves them alone), or theta - lr * g."""
    for p, g in zip(shared, gradient):
        if optimizer is None:
            if g is not None:
                p.sub_(lr * g)
        else:
            p.grad = None if g is None else g.to(p.dtype)
    if optimizer is not None:
        optimizer.step()
        for p in shared:
            p.grad = None


def restore(shared: list[nn.Parameter], saved: list[torch.Tensor], optimizer: torch.optim.Optimizer | None,
            moments: dict[int, dict]) -> None:
    for p, value in zip(shared, saved):
        p.copy_(value)
    if optimizer is None:
        return
    for p in shared:
        if id(p) not in moments:
            optimizer.state.pop(p, None)
            continue
        state = optimizer.state[p]
        for key, value in moments[id(p)].items():
            if isinstance(value, torch.Tensor) and isinstance(state.get(key), torch.Tensor):
                state[key].copy_(value)
            else:
                state[key] = copy.deepcopy(value)
        for key in [k for k in state if k not in moments[id(p)]]:
            del state[key]


def same_draws(draws: tuple, devices: list[torch.device]) -> None:
    torch.set_rng_state(draws[0])
    for device, state in zip(devices, draws[1]):
        torch.cuda.set_rng_state(state, device)


class TaskAffinity:
    """The measurements of one run: `step` at the top of every training step (it measures when due and times the
    steps), `epoch_end` logs and writes the epoch's mean, `finish` adds the record to metrics.json."""

    def __init__(self, tasks: Sequence[str], every: int, update: str = "optimizer", run_dir: Path | None = None):
        self.tasks, self.every, self.update, self.run_dir = list(tasks), int(every), update, run_dir
        self.epochs: list[dict] = []
        self.start_epoch()

    @classmethod
    def of(cls, cfg, tasks: Sequence[str], world: int, run_dir: Path, resumed_epoch: int | None) -> TaskAffinity | None:
        """The run's measurements (None when trainer.task_affinity.every is null); a resumed run keeps the epochs
        measured before its checkpoint."""
        settings = cfg.trainer.get("task_affinity") or {}
        if settings.get("every") is None:
            return None
        if world > 1:
            raise UserError(f"trainer.task_affinity.every={settings['every']} measures on one process (its lookahead "
                            "is not combined across ranks): use trainer.devices=1, or trainer.task_affinity.every=null")
        affinity = cls(tasks, int(settings["every"]), str(settings.get("update", "optimizer")), run_dir)
        sidecar = run_dir / SIDECAR
        if resumed_epoch is not None and sidecar.exists():
            affinity.epochs = [e for e in json.loads(sidecar.read_text())["epochs"] if e["epoch"] <= resumed_epoch]
        return affinity

    def start_epoch(self) -> None:
        n = len(self.tasks)
        self.sums, self.counts = np.zeros((n, n)), np.zeros((n, n))
        self.measured, self.measure_seconds, self.step_seconds, self.steps_timed = 0, 0.0, 0.0, 0
        self.last = None  # when the previous step started

    def step(self, model: nn.Module, losses_of: Callable[[], dict[str, torch.Tensor]], lr: float,
             optimizer: torch.optim.Optimizer, step: int) -> None:
        now = clock(model)
        if self.last is not None:
            self.step_seconds += now - self.last
            self.steps_timed += 1
        self.last = now
        if step % self.every:
            return
        z = lookahead_affinity(model, losses_of, self.tasks, lr, optimizer if self.update == "optimizer" else None)
        spent = clock(model) - now
        self.measure_seconds += spent
        self.last += spent  # the step's own time excludes the measurement
        measured = torch.isfinite(z).numpy()
        self.sums += np.where(measured, z.numpy(), 0.0)
        self.counts += measured
        self.measured += 1

    def epoch_end(self, epoch: int, global_step: int, logger) -> None:
        """Logs and records the epoch's mean (epoch: the finished epochs, 1 for the first)."""
        if self.measured == 0:
            self.start_epoch()
            return
        mean = np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), math.nan)
        per_measure = self.measure_seconds / self.measured
        per_step = self.step_seconds / self.steps_timed if self.steps_timed else math.nan
        self.epochs.append({"epoch": epoch, "step": global_step, "measured_steps": self.measured,
                            "affinity": mean.tolist(), "seconds_per_measurement": round(per_measure, 6),
                            "fraction_of_step": round(per_measure / per_step, 4) if per_step > 0 else None})
        scalars = {f"affinity/{a}->{b}": float(mean[i, j]) for i, a in enumerate(self.tasks)
                   for j, b in enumerate(self.tasks) if math.isfinite(mean[i, j])}
        scalars["perf/affinity_seconds"] = per_measure
        logger.scalars(scalars, global_step)
        cost = self.epochs[-1]["fraction_of_step"]
        log.info(f"task affinity, epoch {epoch}: {self.measured} measured steps, {per_measure * 1e3:.1f} ms each"
                 + (f" ({cost:.2f} x a training step)" if cost is not None else ""))
        self.start_epoch()
        if self.run_dir is None:
            return
        picture = draw_heatmap(np.array(self.section()["mean"], dtype=float), self.tasks,
                       f"TAG affinity Z(i -> j), mean of epochs 1-{epoch}", self.run_dir / HEATMAP)
        logger.images("affinity/heatmap", torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255, global_step)
        write_record(self.run_dir / SIDECAR, self.section())

    def section(self) -> dict:
        """metrics.json's "task_affinity": per epoch and the mean over the measured steps of every epoch."""
        weights = np.array([[e["measured_steps"]] for e in self.epochs], dtype=float)[:, :, None]
        matrices = np.array([[[math.nan if v is None else v for v in row] for row in e["affinity"]]
                             for e in self.epochs], dtype=float)
        known = np.isfinite(matrices)
        total = (np.where(known, matrices, 0) * weights).sum(0)
        counted = (known * weights).sum(0)
        mean = np.where(counted > 0, total / np.maximum(counted, 1e-300), math.nan)
        seconds = sum(e["seconds_per_measurement"] * e["measured_steps"] for e in self.epochs)
        steps = sum(e["measured_steps"] for e in self.epochs)
        fractions = [e["fraction_of_step"] for e in self.epochs if e["fraction_of_step"] is not None]
        return {"tasks": self.tasks, "every": self.every, "update": self.update,
                "layout": "affinity[i][j] = Z(tasks[i] -> tasks[j]): a lookahead on task i, the loss of task j",
                "mean": mean.tolist(), "measured_steps": steps,
                "seconds_per_measurement": round(seconds / steps, 6) if steps else None,
                "fraction_of_step": round(float(np.mean(fractions)), 4) if fractions else None,
                "epochs": self.epochs}

    def finish(self, metrics: Path) -> None:
        if self.epochs and metrics.exists():
            add_to_record(metrics, "task_affinity", self.section())


def clock(model: nn.Module) -> float:
    """Seconds, after the device's queued work (the GPU runs ahead of Python)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def draw_heatmap(affinity: np.ndarray, tasks: Sequence[str], title: str, path: Path) -> np.ndarray:
    """The matrix as a heat map (rows: the task stepped on, columns: the task whose loss changes), written to
    `path` as a PNG; returns its RGB pixels. The colours are centred on 0 and scaled by the off-diagonal entries
    (a task's own progress, on the diagonal, is larger and would wash them out): it is printed on grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    n = len(tasks)
    off = ~np.eye(n, dtype=bool) & np.isfinite(affinity)
    scale = float(np.abs(affinity[off]).max()) if off.any() else 1.0
    scale = scale if scale > 0 else 1.0
    shown = np.where(off, affinity, np.nan)
    figure = Figure(figsize=(1.3 * n + 2.4, 1.1 * n + 1.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_facecolor("#d9d9d9")
    image = axes.imshow(shown, cmap="RdBu", norm=TwoSlopeNorm(0.0, -scale, scale))
    for i in range(n):
        for j in range(n):
            value = affinity[i, j]
            text = "n/a" if not np.isfinite(value) else f"{value:.3g}"
            dark = off[i, j] and abs(value) > 0.6 * scale
            axes.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black",
                      style="normal" if off[i, j] else "italic")
    axes.set_xticks(range(n), tasks, rotation=30, ha="right")
    axes.set_yticks(range(n), tasks)
    axes.set_xlabel("j: the task whose loss changes")
    axes.set_ylabel("i: the task stepped on")
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="Z(i -> j)", shrink=0.8)
    figure.tight_layout()
    figure.savefig(path)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
