"""Single-task learning: one independent backbone and head per task, trained side by side in one run.

Nothing is shared, so with equal weighting each task trains exactly as it would alone (the baseline that
delta_m compares a multi-task model with). For the weighting methods the trunk is all the backbones together:
their task gradients are orthogonal by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import MultiTaskModel, make_heads


class SingleTask(MultiTaskModel):
    """image -> backbone t -> head t, for every task t; `encode` returns the maps of all backbones, task by task."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]]):
        super().__init__()
        self.backbones = nn.ModuleDict({task: backbone() for task in heads})
        first = next(iter(self.backbones.values()))  # every backbone is built alike
        self.heads = make_heads(heads, first.channels, first.strides)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [f for backbone in self.backbones.values() for f in backbone(image)]

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        outputs, start = {}, 0
        for task, head in self.heads.items():
            count = len(self.backbones[task].out_indices)
            outputs[task] = head(features[start:start + count], size)
            start += count
        return outputs

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbones.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [], **{task: [self.backbones[task], head] for task, head in self.heads.items()}}
