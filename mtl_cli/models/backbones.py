"""Backbones: a network cut into stages that run one after the other, returning the maps of chosen stages.

torchvision models come from `get_model` and are traced with `create_feature_extractor` up to the last stage;
the traced graph is then cut at each stage's output (`stages.py`), so that soft-sharing architectures can run
the stages one at a time and exchange features between them. Channels and strides are discovered by one probe
forward pass, never written in configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.vision_transformer import interpolate_embeddings

from mtl_cli.errors import UserError, load_problem
from mtl_cli.models.norms import replace_norms
from mtl_cli.models.stages import split_stages

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("nchw", "nhwc", "tokens")


class Backbone(nn.Module):
    """Normalises the [0,1] image, runs `stages` in order and returns the maps of the stages in `out_indices`
    ([B,C,H,W], fine to coarse).

    `layout` says what the stages pass on: `nchw` maps, `nhwc` maps (Swin), or `tokens` [B,1+N,C] with a class
    token first (ViT; the N patch tokens are reshaped to a square map). `to_map` / `from_map` convert, so that an
    architecture can mix the outputs of stages. The first `frozen_stages` stages get no gradient and keep their
    normalisation statistics (eval mode) in training. `channels[i]` and `strides[i]` describe the i-th map.
    """

    def __init__(self, stages: Sequence[nn.Module], out_indices: Sequence[int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, layout: str = "nchw",
                 frozen_stages: int = 0, probe_size: int = 64):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        count = len(self.stages)
        self.out_indices = list(range(count)) if out_indices is None else [int(i) for i in out_indices]
        if not self.out_indices or any(not 0 <= i < count for i in self.out_indices) or \
                self.out_indices != sorted(set(self.out_indices)):
            raise UserError(f"backbone.out_indices={list(self.out_indices)}: give increasing stage indices from 0 to "
                            f"{count - 1} (this backbone has {count} stages)")
        if layout not in LAYOUTS:
            raise UserError(f"backbone.layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
        if not 0 <= int(frozen_stages) <= count:
            raise UserError(f"backbone.frozen_stages={frozen_stages}: give 0 (train all) to {count} (freeze all)")
        self.layout, self.frozen_stages, self.probe_size = layout, int(frozen_stages), probe_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for stage in self.stages[:self.frozen_stages]:
            stage.requires_grad_(False)
        with torch.no_grad():
            maps = self.eval()(torch.zeros(1, 3, probe_size, probe_size))
        self.train()
        self.channels = [m.shape[1] for m in maps]
        self.strides = [probe_size // m.shape[-1] for m in maps]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for stage in self.stages[:self.frozen_stages]:
            stage.eval()
        return self

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """A stage's output as a [B,C,H,W] map."""
        if self.layout == "nhwc":
            return x.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            patches = x[:, 1:]
            side = int(round(patches.shape[1] ** 0.5))
            return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return x

    def from_map(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_map` (`like`: the stage output it came from, for the class token)."""
        if self.layout == "nhwc":
            return x.permute(0, 2, 3, 1)
        if self.layout == "tokens":
            return torch.cat([like[:, :1], x.flatten(2).transpose(1, 2)], dim=1)
        return x

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        x, maps = self.normalize(image), []
        for k, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = stage(x)
            if k in self.out_indices:
                maps.append(self.to_map(x))
        return maps


def torchvision_backbone(name: str, stages: Sequence[str], out_indices: Sequence[int] | None = None,
                         weights: str | None = None, frozen_stages: int = 0, norm: str | None = None,
                         layout: str = "nchw", mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, **model_kwargs) -> Backbone:
    """A torchvision classification model by name, cut at the graph nodes `stages` (each stage's last node).

    `weights`: a torchvision weights name ("DEFAULT", "IMAGENET1K_V1", ...), a path to a state-dict file of
    the same model, or null for random init. `norm`: null keeps the model's own normalisation layers;
    `batch_norm`, `frozen_batch_norm` or `group_norm` replace batch norm (see norms.py). `model_kwargs` go to
    the model builder (e.g. `image_size` for ViT).
    """
    if name not in list_models():
        raise UserError(f"backbone.name={name!r} is not a torchvision model; see torchvision.models.list_models()")
    model = get_model(name, **model_kwargs)
    if weights is not None:
        load_weights(model, name, str(weights))
    replace_norms(model, norm, name)
    try:
        traced = create_feature_extractor(model, return_nodes={node: node for node in stages})
    except ValueError as e:
        raise UserError(f"backbone.stages={list(stages)} do not all exist in {name}: {e}") from None
    size = int(model_kwargs.get("image_size", 64))
    return Backbone(split_stages(traced, name), out_indices, mean, std, layout, frozen_stages, probe_size=size)


def load_weights(model: nn.Module, name: str, weights: str) -> None:
    """Loads a torchvision weights name or a local state-dict file into `model`, with one clear error if not."""
    if "/" in weights or weights.endswith((".pt", ".pth")):
        state = _read_state_dict(Path(weights).expanduser())
    else:
        state = _torchvision_state_dict(name, weights)
    if "encoder.pos_embedding" in state and hasattr(model, "image_size"):  # ViT at another input size
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"backbone.weights={weights!r} does not fit {name}: {len(missing)} missing keys (e.g. "
                        f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); give a state dict "
                        f"of torchvision's {name}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"backbone.weights={str(path)!r}: no such file; give a torchvision weights name "
                        "(DEFAULT, IMAGENET1K_V1, ...) or the path of a .pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "not a state dict"
        raise UserError(f"backbone.weights={str(path)!r} is not a readable PyTorch state dict ({load_problem(e)}); "
                        "give a .pth file saved with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):  # checkpoints that wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone.weights={str(path)!r} does not hold a state dict (name -> tensor)")
    return state


def _torchvision_state_dict(name: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision weights enum (from torch's hub cache, or downloaded), or a clear error."""
    available = get_model_weights(name)
    try:
        enum = available.DEFAULT if weights == "DEFAULT" else available[weights]
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in available])
        raise UserError(f"backbone.weights={weights!r} is not a weights name of {name}; valid: {names}, a path "
                        "to a .pth file, or null") from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    cached = cache.is_file()
    try:
        return enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a bad cached file, a failed download, or a bug (raised again)
        if cached:
            raise UserError(f"the cached weights file {cache} is not a readable PyTorch state dict ({load_problem(e)})"
                            "; delete it, and it is downloaded again") from None
        if not isinstance(e, (URLError, OSError, RuntimeError)):
            raise
        raise UserError(
            f"could not download the pretrained weights {type(enum).__name__}.{enum.name} ({type(e).__name__}: {e}). "
            f"Without network access, download {enum.url} elsewhere and place the file at {cache} "
            f"(or pass its path: backbone.weights=/path/to/file.pth), or train from scratch with "
            f"backbone.weights=null") from None


class SmallCNN(nn.Module):
    """A small plain CNN for fast CPU runs: stages of two 3x3 conv-BN-ReLU, each halving the resolution."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        stages, c_in = [], 3
        for width in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
            c_in = width
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def small_cnn(widths: Sequence[int] = (16, 32, 64, 128), out_indices: Sequence[int] | None = None,
              frozen_stages: int = 0, norm: str | None = None) -> Backbone:
    """The SmallCNN, one stage per width; by default every stage feeds the heads."""
    model = SmallCNN(widths)
    replace_norms(model, norm, "small_cnn")
    return Backbone(list(model.stages), out_indices, (0.5,) * 3, (0.25,) * 3, "nchw", frozen_stages)
