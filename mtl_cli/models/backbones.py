"""Backbones: a network tapped at several stages, returning a list of feature maps from fine to coarse.

torchvision models are taken with `get_model` and tapped with `create_feature_extractor`; the channels and strides
of the tapped stages are discovered by one probe forward pass, never written in configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.error import URLError

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.models.feature_extraction import create_feature_extractor

from mtl_cli.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Normalises the [0,1] image, runs the tapped network and returns its feature maps, fine to coarse.

    `channels[i]` and `strides[i]` describe the i-th returned map (stride = input size / map size).
    """

    def __init__(self, body: nn.Module, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 probe_size: int = 64):
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        was_training = body.training
        with torch.no_grad():
            body.eval()
            maps = self(torch.zeros(1, 3, probe_size, probe_size))
        body.train(was_training)
        self.channels = [m.shape[1] for m in maps]
        self.strides = [probe_size // m.shape[-1] for m in maps]

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body((image - self.mean) / self.std).values())


def torchvision_backbone(name: str, return_nodes: Sequence[str], weights: str | None = None,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Backbone:
    """A torchvision classification model by name, tapped at `return_nodes` (node names of its graph).

    `weights` is a torchvision weights name such as "DEFAULT" or "IMAGENET1K_V1", or null for random init.
    """
    if name not in list_models():
        raise UserError(f"backbone.name={name!r} is not a torchvision model; see torchvision.models.list_models()")
    model = get_model(name, weights=_weights(name, weights))
    try:
        body = create_feature_extractor(model, return_nodes={node: node for node in return_nodes})
    except ValueError as e:
        raise UserError(f"backbone.return_nodes={list(return_nodes)} do not all exist in {name}: {e}") from None
    return Backbone(body, mean, std)


def _weights(name: str, weights: str | None):
    """The torchvision weights enum for `weights`, with its state dict already fetched (or a clear error)."""
    if weights is None:
        return None
    available = get_model_weights(name)
    try:
        enum = available[weights] if weights != "DEFAULT" else available.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in available])
        raise UserError(f"backbone.weights={weights!r} is not a weights name of {name}; valid: {names}, or null") from None
    try:
        enum.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError, RuntimeError) as e:
        cache = f"{torch.hub.get_dir()}/checkpoints/{enum.url.rsplit('/', 1)[-1]}"
        raise UserError(
            f"could not download the pretrained weights {type(enum).__name__}.{enum.name} ({type(e).__name__}: {e}).\n"
            f"Without network access, download {enum.url} elsewhere and place the file at {cache}, "
            f"or train from scratch with backbone.weights=null") from None
    return enum


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


def small_cnn(widths: Sequence[int] = (16, 32, 64, 128), return_nodes: Sequence[str] | None = None) -> Backbone:
    """The SmallCNN, tapped (by default) after every stage."""
    model = SmallCNN(widths)
    nodes = return_nodes or [f"stages.{i}" for i in range(len(widths))]
    return Backbone(create_feature_extractor(model, return_nodes={node: node for node in nodes}), (0.5,) * 3, (0.25,) * 3)
