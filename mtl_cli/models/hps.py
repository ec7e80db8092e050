"""Hard parameter sharing: one backbone shared by every task, one head per task.

Every architecture follows the same contract, which the weighting methods rely on (weighting/gradients.py):
`encode(image)` computes the trunk, a list of feature maps, from `shared_parameters()` alone; `decode(features,
size)` computes each task's output from those features alone (its head and any other task-specific module);
`parts()` names the modules that belong to the trunk (`shared`) and to each task, for the model summary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.models.backbones import Backbone


def make_heads(heads: Mapping[str, Callable[..., nn.Module]], channels: list[int], strides: list[int]
               ) -> nn.ModuleDict:
    """One head per task, each built for maps of `channels` at `strides`."""
    return nn.ModuleDict({task: make(in_channels=channels, strides=strides) for task, make in heads.items()})


class HardSharing(nn.Module):
    """image -> backbone (shared) -> features -> one head per task."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]]):
        super().__init__()
        self.backbone = backbone()
        self.heads = make_heads(heads, self.backbone.channels, self.backbone.strides)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Every head's output; dense heads come back at `size`, the input's height and width."""
        return {task: head(features, size) for task, head in self.heads.items()}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(image), image.shape[-2:])

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.backbone], **{task: [head] for task, head in self.heads.items()}}
