"""A trained model ready for images without labels: the checkpoint's model, tasks and preprocessing.

Preprocessing is the checkpoint's own: its validation transforms (data.transforms.val, applied to the image alone),
then a resize to the size the model was trained on when the transforms leave another size (datasets such as the
embedded one, NYUv2 or Cityscapes make every image one size without a transform). The model normalises inside
(models/backbones.py), so images stay floats in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from mtl_cli.build import instantiate, resolve_data
from mtl_cli.data.transforms import compose, split_transforms
from mtl_cli.engine.state import HydraValues, load_run, trained_model
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.runtime import pick_device
from mtl_cli.tasks import Task


@dataclass
class Loaded:
    cfg: DictConfig
    checkpoint: dict[str, Any]
    tasks: dict[str, Task]
    model: nn.Module
    device: torch.device
    input_size: tuple[int, int]
    transforms: Any = None  # the validation transforms, one callable over a sample dict, or None

    @classmethod
    def of(cls, composed: DictConfig, hydra: HydraValues, purpose: str = "eval") -> Loaded:
        """The checkpoint composed.ckpt, with this command line's overrides on its config."""
        cfg, checkpoint = load_run(composed.ckpt, composed, purpose, hydra)
        cfg = resolve_data(cfg)
        device = pick_device(cfg.trainer.device)
        tasks, model = trained_model(cfg, checkpoint, device)
        declared = split_transforms(cfg.data.get("transforms"), "val")
        transforms = compose(instantiate(declared, "data.transforms.val")) if declared else None
        return cls(cfg, checkpoint, tasks, model, device, input_size(cfg, checkpoint), transforms)

    def entry(self, name: str, key: str):
        """Task `name`'s built `key` entry (`writer`, `explain`), or None. A checkpoint trained before its task
        configs carried the entry gets that of the packaged task config of the same name, when that trains the
        same loss (so `count` trained as count_ce's classes does not get count's value writer)."""
        built = getattr(self.tasks[name], key)
        template = None if built is not None else packaged_task(name)
        if template is None:
            return built
        loss = OmegaConf.select(self.cfg, f"tasks.{name}.loss._target_")
        if key not in template or OmegaConf.select(template, "loss._target_") != loss:
            return None
        return instantiate(template[key], f"configs/tasks/{name}.yaml {key}")

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [3, H, W] -> the float [3, h, w] the model takes (h, w = input_size)."""
        sample = {"image": tv_tensors.Image(image.float() / 255)}
        if self.transforms is not None:
            sample = self.transforms(sample)
        out = sample["image"].as_subclass(torch.Tensor)
        if tuple(out.shape[-2:]) != self.input_size:
            out = F.resize(out, list(self.input_size), antialias=True)
        return out.clamp_(0, 1)

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Preprocessed images stacked into a batch on the model's device."""
        return torch.stack([self.preprocess(image) for image in images]).to(self.device)


def input_size(cfg: DictConfig, checkpoint: dict[str, Any]) -> tuple[int, int]:
    """[H, W] the model was trained on: recorded in the checkpoint, or (checkpoints before it was) the data
    config's image_size."""
    size = checkpoint.get("input_size")
    if size is None:
        size = cfg.data.get("image_size")
    if size is None and isinstance(cfg.data.get("dataset"), DictConfig):
        size = cfg.data.dataset.get("image_size")
    if size is None:
        raise UserError("the checkpoint does not record the image size it was trained on, and its data config "
                        "has no image_size: give it, e.g. data.image_size=[224,224]")
    if isinstance(size, (int, float)):
        return int(size), int(size)
    if isinstance(size, (list, tuple, ListConfig)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise UserError(f"image size {size!r}: give one number or [height, width]")


def packaged_task(name: str) -> DictConfig | None:
    """configs/tasks/<name>.yaml with the task files it extends (`defaults: [/tasks/<base>@_here_, _self_]`, the one
    form they use), unresolved; None if there is no such file. Read by hand: Hydra's compose cannot run inside the
    command's own Hydra app."""
    folder = config_dir() / "tasks"
    if not (folder / f"{name}.yaml").is_file():
        return None
    own = OmegaConf.load(folder / f"{name}.yaml")
    bases = [str(entry).removeprefix("/tasks/").removesuffix("@_here_") for entry in own.pop("defaults", [])
             if str(entry).startswith("/tasks/")]
    return OmegaConf.merge(*(packaged_task(base) for base in bases), own)
