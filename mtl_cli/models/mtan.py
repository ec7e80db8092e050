"""MTAN, the Multi-Task Attention Network (Liu, Johns and Davison, CVPR 2019): one shared backbone, and for each
task a chain of soft attention modules, one per tapped stage, that select from the shared features.

For task t at stage j with shared map p_j: a_t^j = g_j([p_j ; f_j(a_t^{j-1})]) * p_j, where g_j is two 1x1
conv-BN layers ending in a sigmoid (an element-wise mask) and f_j a 3x3 conv-BN-ReLU that brings the previous
attended map to p_j's channels, then pools it to p_j's size (the paper's shared "f" and max pooling). The first
stage's mask reads p_1 alone. The paper computes the mask from a block's first layer and applies it to the
block's output; here both are the stage's output, since a backbone is tapped at stage ends only. The attention
modules read only the shared maps, so they belong to `decode` and the weighting methods see the backbone as the
trunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import MultiTaskModel, conv_bn, make_heads


class TaskAttention(nn.Module):
    """One task's attention chain over the shared maps (channels `channels`, fine to coarse)."""

    def __init__(self, channels: Sequence[int], reduction: int = 4):
        super().__init__()
        hidden = [max(c // reduction, 16) for c in channels]
        self.masks = nn.ModuleList(
            nn.Sequential(conv_bn(c * (1 if j == 0 else 2), h, 1, nn.ReLU(inplace=True)), conv_bn(h, c, 1, nn.Sigmoid()))
            for j, (c, h) in enumerate(zip(channels, hidden)))
        self.carry = nn.ModuleList(conv_bn(c_prev, c, 3, nn.ReLU(inplace=True))
                                   for c_prev, c in zip(channels[:-1], channels[1:]))

    def forward(self, shared: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        attended: list[torch.Tensor] = []
        for j, (p, mask) in enumerate(zip(shared, self.masks)):
            if j == 0:
                x = p
            else:
                carried = F.adaptive_max_pool2d(self.carry[j - 1](attended[-1]), p.shape[-2:])
                x = torch.cat([p, carried], dim=1)
            attended.append(mask(x) * p)
        return attended


class MTAN(MultiTaskModel):
    """image -> backbone (shared) -> per task: attention over every tapped stage -> head."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 reduction: int = 4):
        super().__init__()
        self.backbone = backbone()
        self.attention = nn.ModuleDict({task: TaskAttention(self.backbone.channels, reduction) for task in heads})
        self.heads = make_heads(heads, self.backbone.channels, self.backbone.strides)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {task: head(self.attention[task](features), size) for task, head in self.heads.items()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.backbone], **{t: [self.attention[t], h] for t, h in self.heads.items()}}
