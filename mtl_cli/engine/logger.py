"""The run's logger: each scalar, text and image batch goes to every sink the `logger` config group selected
(logger=tensorboard, logger=[tensorboard,mlflow]; engine/sinks/). The console and the log file are Hydra's and
always on; logger=console selects no other sink."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from mtl_cli.engine.sinks.base import Sink
from mtl_cli.errors import Stopped

log = logging.getLogger("mtl")


class Logger:
    """Opens the sinks in the run directory and hands each call to all of them; close() (or leaving a `with`
    block) closes them with the run's outcome.

    sinks: name -> a sink class called with the run directory and the resolved config (a `_partial_` of the
    config). log_every: the training loop logs its scalars every this many steps. images: how many validation
    images to show per task at each validation, where a sink shows images. tensorboard: the switch of configs saved
    before the sinks (a checkpoint of an earlier run, resumed).
    """

    def __init__(self, run_dir: str | Path, sinks: Mapping[str, Callable[..., Sink]] | None = None,
                 config: Mapping | None = None, log_every: int = 20, images: int = 4, tensorboard: bool = False):
        if tensorboard and not sinks:
            from mtl_cli.engine.sinks.tensorboard import TensorBoardSink

            sinks = {"tensorboard": TensorBoardSink}
        self.log_every = max(1, int(log_every))
        self.sinks: dict[str, Sink] = {}
        try:
            for name, build in (sinks or {}).items():
                self.sinks[name] = build(run_dir=Path(run_dir), config=dict(config or {}))
        except BaseException:  # one sink cannot start (its package, its server): the others opened are closed
            self.close("failed")
            raise
        self.num_images = int(images) if any(sink.shows_images for sink in self.sinks.values()) else 0

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.each("scalars", lambda sink: sink.scalars(values, step))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.each("text", lambda sink: sink.text(tag, text, step))

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        images = images.clamp(0, 1).cpu()
        self.each("images", lambda sink: sink.images(tag, images, step) if sink.shows_images else None)

    def each(self, what: str, call: Callable[[Sink], None]) -> None:
        """`call` on every sink. A sink that fails mid-run (its server gone, its disk full) is dropped with one
        warning: the run, its checkpoints and the other sinks go on."""
        for name, sink in list(self.sinks.items()):
            try:
                call(sink)
            except Exception as e:  # noqa: BLE001 -- whatever a tracker raises, training is worth more
                log.warning(f"logger {name}: {what} failed ({type(e).__name__}: {e}); it is dropped for the rest "
                            "of the run")
                del self.sinks[name]
                self.close_quietly(sink, "failed")

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

    def close(self, status: str = "finished") -> None:
        """status: finished, failed, or killed (a stop request or Ctrl-C: the run can go on from last.pt)."""
        sinks, self.sinks = list(self.sinks.values()), {}
        errors = []
        for sink in sinks:  # each one, even after another failed to close
            try:
                sink.close(status)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        status = "finished" if kind is None else "killed" if issubclass(kind, (Stopped, KeyboardInterrupt)) \
            else "failed"
        if kind is None:
            self.close(status)
            return
        for sink in self.sinks.values():  # the run's own error (or stop) is what the command reports
            self.close_quietly(sink, status)
        self.sinks = {}

    @staticmethod
    def close_quietly(sink: Sink, status: str) -> None:
        try:
            sink.close(status)
        except Exception as e:  # noqa: BLE001
            log.warning(f"logger: closing {type(sink).__name__} failed ({type(e).__name__}: {e})")
