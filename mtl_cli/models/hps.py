"""Hard parameter sharing: one backbone shared by every task, one head per task."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.models.backbones import Backbone


class HardSharing(nn.Module):
    """image -> backbone (shared) -> features -> one head per task.

    `encode` gives the shared representation and `decode` the per-task outputs, so that weighting methods can
    take gradients with respect to either the shared parameters or the shared features.
    """

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]]):
        super().__init__()
        self.backbone = backbone()
        self.heads = nn.ModuleDict({task: make(in_channels=self.backbone.channels, strides=self.backbone.strides)
                                    for task, make in heads.items()})

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Every head's output; dense heads come back at `size`, the input's height and width."""
        return {task: head(features, size) for task, head in self.heads.items()}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(image), image.shape[-2:])

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()
