"""Hard parameter sharing: one backbone shared by every task, one head per task (the contract: models/base.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import MultiTaskModel, make_heads


class HardSharing(MultiTaskModel):
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

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.backbone], **{task: [head] for task, head in self.heads.items()}}
