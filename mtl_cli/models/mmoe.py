"""MMoE, the multi-gate mixture of experts (Ma et al., KDD 2018), over a shared backbone's feature maps.

E experts transform every tapped map (each expert a 1x1-3x3-1x1 conv bottleneck per stage); each task has a gate,
a softmax over the experts computed from the pooled coarsest map, and its heads read the gate's mixture of the
experts' maps. Backbone and experts form the trunk (`encode`); the gates read only the trunk's maps, so they
belong to `decode` with the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import MultiTaskModel, conv_bn, make_heads


def expert(channels: int, reduction: int) -> nn.Sequential:
    hidden = max(channels // reduction, 16)
    return nn.Sequential(conv_bn(channels, hidden, 1, nn.ReLU(inplace=True)),
                         conv_bn(hidden, hidden, 3, nn.ReLU(inplace=True)),
                         conv_bn(hidden, channels, 1, nn.ReLU(inplace=True)))


class MMoE(MultiTaskModel):
    """image -> backbone -> E experts per stage (shared) -> per task: gate-weighted sum of the experts -> head.

    `encode` returns, stage by stage, the E experts' maps, then the backbone's coarsest map (the gates' input)."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 experts: int = 4, reduction: int = 4):
        super().__init__()
        self.backbone = backbone()
        self.num_experts = int(experts)
        channels = self.backbone.channels
        self.experts = nn.ModuleList(nn.ModuleList(expert(c, reduction) for c in channels)
                                     for _ in range(self.num_experts))
        self.gates = nn.ModuleDict({task: nn.Linear(channels[-1], self.num_experts) for task in heads})
        self.heads = make_heads(heads, channels, self.backbone.strides)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone(image)
        return [e[j](m) for j, m in enumerate(maps) for e in self.experts] + [maps[-1]]

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        *expert_maps, coarsest = features
        pooled = coarsest.mean((2, 3))
        stages = len(expert_maps) // self.num_experts
        stacked = [torch.stack(expert_maps[j * self.num_experts:(j + 1) * self.num_experts], dim=1)
                   for j in range(stages)]  # [B,E,C,H,W] per stage
        outputs = {}
        for task, head in self.heads.items():
            gate = torch.softmax(self.gates[task](pooled), dim=1)[:, :, None, None, None]  # [B,E,1,1,1]
            outputs[task] = head([(gate * s).sum(1) for s in stacked], size)
        return outputs

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()
        yield from self.experts.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.backbone, self.experts],
                **{t: [self.gates[t], h] for t, h in self.heads.items()}}
