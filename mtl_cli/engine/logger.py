"""Scalars, text and images to TensorBoard (a SummaryWriter in the run directory)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


class Logger:
    """Writes TensorBoard events into the run directory when `tensorboard` is on; a no-op otherwise.

    log_every: the training loop logs its scalars every this many steps. images: how many validation images
    to show per task at each validation.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, log_every: int = 20, images: int = 4):
        self.log_every, self.num_images = max(1, int(log_every)), int(images)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

            self.writer = SummaryWriter(log_dir=str(run_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_images(tag, images.clamp(0, 1).cpu(), step)

    def validation(self, tasks, results: dict, step: int) -> None:
        """Validation scalars, and example predictions next to their targets as images."""
        from mtl_cli.engine.batches import flatten

        self.scalars(flatten(results), step)
        examples = results["examples"]
        if not examples:
            return
        self.images("images/input", examples["image"], step)
        for name, task in tasks.items():
            if task.visualize is not None and name in examples["targets"]:
                pair = [task.visualize(examples["targets"][name]), task.visualize(examples["outputs"][name])]
                self.images(f"images/{name} (target | prediction)", torch.cat(pair, dim=-1), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
