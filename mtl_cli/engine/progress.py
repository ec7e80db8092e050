"""Training progress on the console: a rich bar on a terminal, plain periodic lines elsewhere (CI, nohup, files)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("mtl")


class EpochProgress:
    """mode: "bar", "plain", "none" or "auto" (a bar when stdout is a terminal, plain lines otherwise)."""

    def __init__(self, mode: str = "auto"):
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "plain"
        if mode not in ("bar", "plain", "none"):
            from mtl_cli.errors import UserError

            raise UserError(f"trainer.progress={mode!r} is not one of auto, bar, plain, none")
        self.mode = mode
        self.bar: Progress | None = None

    def start(self, epoch: int, max_epochs: int, batches: int, done: int = 0) -> None:
        """Epoch `epoch` of `max_epochs`, `batches` long, `done` of them already (a resume inside the epoch)."""
        self.epoch, self.max_epochs = epoch, max_epochs
        if self.mode == "bar":
            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task("train", total=batches, completed=done, epoch=f"{epoch + 1}/{max_epochs}",
                                          info="")

    def advance(self, step: int, info: Mapping[str, float] | None = None) -> None:
        """One training step done; `info` (losses and the like) is given on logging steps only."""
        text = "  ".join(f"{k} {v:.4g}" for k, v in info.items()) if info else None
        if self.bar is not None:
            self.bar.update(self.task, advance=1, **({"info": text} if text else {}))
        elif self.mode == "plain" and text:
            log.info(f"epoch {self.epoch + 1}/{self.max_epochs} step {step}  {text}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
