"""TensorBoard event files in the run directory (tensorboard --logdir outputs)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mtl_cli.engine.sinks.base import Sink


class TensorBoardSink(Sink):
    shows_images = True

    def __init__(self, run_dir: Path, config: Mapping | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        self.writer = SummaryWriter(log_dir=str(run_dir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        self.writer.add_images(tag, images, step)

    def close(self, status: str) -> None:
        self.writer.close()
