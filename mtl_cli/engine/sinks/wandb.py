"""Weights & Biases: offline by default, which needs no network and no account: the run is written into
<run dir>/wandb/offline-run-*/ and uploaded later with `wandb sync <that folder>`. mode=online logs live after
`wandb login`. The run's config is the resolved config; its scalars carry TensorBoard's tags."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from mtl_cli.engine.sinks.base import Sink, require, run_name
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")


class WandbSink(Sink):
    """images: the validation's example predictions as images too. settings: fields of wandb.Settings."""

    def __init__(self, run_dir: Path, config: Mapping, mode: str = "offline", project: str = "mtl",
                 entity: str | None = None, images: bool = True, settings: Mapping | None = None):
        self.wandb = require("wandb", "wandb")
        self.shows_images = bool(images)
        try:
            self.run = self.wandb.init(project=project, entity=entity, name=run_name(run_dir), dir=str(run_dir),
                                       mode=mode, config=dict(config), settings=self.wandb.Settings(**(settings or {})))
        except self.wandb.errors.Error as e:
            raise UserError(f"W&B could not start the run in mode={mode} ({e}); mode=offline needs no network "
                            "nor account") from None
        where = Path(self.run.settings.sync_dir)
        log.info(f"wandb: {mode} run {self.run.id}" + (f"; upload it later with: wandb sync {where}"
                                                        if mode == "offline" else f" in {where}"))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # [N,H,W,3] for wandb.Image
        self.run.log({tag: [self.wandb.Image(image) for image in pixels]}, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
