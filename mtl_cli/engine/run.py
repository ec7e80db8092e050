"""A run in progress: the training state plus what the loop needs around it (where it runs, its data, its sinks and
its stop conditions), and what ends it (a stop request, the final report)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mtl_cli.analysis.affinity import TaskAffinity
from mtl_cli.data.checks import check_batch
from mtl_cli.data.held_out import HeldOutBatches
from mtl_cli.engine.checkpoint import CheckpointSchedule
from mtl_cli.engine.distributed import Alone
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.meter import StepMeter
from mtl_cli.engine.monitor import Monitor, Objectives
from mtl_cli.engine.nonfinite import NonFinitePolicy
from mtl_cli.engine.progress import EpochProgress
from mtl_cli.engine.records import train_record, write_record
from mtl_cli.engine.report import metrics_table
from mtl_cli.engine.signals import StopRequests
from mtl_cli.engine.state import TrainState
from mtl_cli.errors import Stopped
from mtl_cli.metrics.delta_m import DeltaM

log = logging.getLogger("mtl")


@dataclass
class Run:
    state: TrainState
    device: torch.device
    logger: Logger
    run_dir: Path
    train_loader: DataLoader | None = None
    val_loader: DataLoader | None = None
    monitor: Monitor | None = None
    delta: DeltaM | None = None
    saves: CheckpointSchedule = field(default_factory=lambda: CheckpointSchedule(None, None))
    objectives: Objectives | None = None  # what train() returns to a sweeper
    stops: StopRequests = field(default_factory=StopRequests)
    progress: EpochProgress = field(default_factory=lambda: EpochProgress("none"))
    meter: StepMeter = field(default_factory=StepMeter)
    nonfinite: NonFinitePolicy = field(default_factory=NonFinitePolicy)
    checked: set = field(default_factory=set)  # the sets of tasks whose targets a batch was checked for
    ranks: Alone = field(default_factory=Alone)  # the processes of the run (engine/distributed.py)
    held_out: HeldOutBatches | None = None  # for a weighting that reads held-out batches (data/held_out.py)
    affinity: TaskAffinity | None = None  # TAG's probe, with trainer.task_affinity.every (analysis/affinity.py)

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def check_targets(self, batch: dict) -> dict:
        """The tasks' targets are in the data and fit them: checked once per set of tasks present in a batch (one
        set, or one per member of data=multi). Returns the batch."""
        present = frozenset(name for name, task in self.state.tasks.items() if task.has_target(batch))
        if present not in self.checked:
            check_batch(self.state.tasks, batch, several=self.state.cfg.data.get("members") is not None)
            self.checked.add(present)
        if self.state.input_size is None:
            self.state.input_size = list(batch["image"].shape[-2:])
        return batch

    def stop(self) -> None:
        """A scheduler asked the run to stop (SIGTERM, SIGUSR1, SIGUSR2): the step is done; write last.pt and say
        how to go on."""
        state = self.state
        state.save(self.last)
        name = signal.Signals(self.stops.received).name
        raise Stopped(f"stopped by {name} at epoch {state.epoch + 1}, batch {state.batch}, step {state.step}: saved "
                      f"{self.last}; continue with mtl train resume={self.last} (or resume=auto "
                      f"hydra.run.dir={self.run_dir})", self.stops.received, then=self.stops.handed_on())

    def report(self, seconds: float) -> None:
        """The table of the final and best validation, and metrics.json (rank 0's)."""
        if not self.ranks.main:
            return
        state, monitor = self.state, self.monitor
        final, best = state.results, state.best_results
        columns = {f"final (epoch {final['epoch']})": final} if final else {}
        if best:
            columns[f"best (epoch {best['epoch']})"] = best
        if columns:
            directions = {name: task.directions() for name, task in state.tasks.items()}
            log.info(metrics_table(columns, directions, title=f"validation metrics (best on {monitor.name}, "
                                                              f"{monitor.mode})"))
        write_record(self.run_dir / "metrics.json", train_record(state, monitor, seconds))
        log.info(f"wrote {self.run_dir / 'metrics.json'} and checkpoints in {self.run_dir / 'checkpoints'}")
