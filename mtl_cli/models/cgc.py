"""CGC, customized gate control (Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020), over a shared backbone's maps.

MMoE's gates mix experts that every task shares; CGC gives each task experts of its own beside the shared ones,
and each task's gate mixes the shared experts and that task's own, so a task can keep what the others would
disturb. Backbone and shared experts form the trunk (`encode`); a task's own experts, like its gate and head, read
only the trunk's maps and belong to `decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from mtl_cli.models.backbones import Backbone
from mtl_cli.models.mmoe import MMoE, expert


class CGC(MMoE):
    """image -> backbone -> E shared experts per stage -> per task: its gate's mixture of the shared experts and
    its own K experts (of the backbone's maps) -> head.

    `encode` returns the E shared experts' maps stage by stage, then the backbone's maps (the task experts' and the
    gates' input)."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 experts: int = 2, task_experts: int = 1, reduction: int = 4):
        super().__init__(backbone, heads, experts, reduction)
        channels = self.backbone.channels
        self.read = {task: read_stages(head, len(channels)) for task, head in self.heads.items()}
        self.own_experts = nn.ModuleDict({  # task -> expert -> stage: only at the stages the task's head reads
            task: nn.ModuleList(nn.ModuleDict({str(j): expert(channels[j], reduction) for j in self.read[task]})
                                for _ in range(int(task_experts)))
            for task in heads})
        self.gates = nn.ModuleDict({task: nn.Linear(channels[-1], self.num_experts + int(task_experts))
                                    for task in heads})

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone(image)
        return [e[j](m) for j, m in enumerate(maps) for e in self.experts] + list(maps)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        stages = len(self.backbone.channels)
        shared, maps = features[:-stages], features[-stages:]
        pooled = maps[-1].mean((2, 3))
        outputs = {}
        for task, head in self.heads.items():
            gate = torch.softmax(self.gates[task](pooled), dim=1)[:, :, None, None, None]  # [B,E+K,1,1,1]
            mixed = [None] * stages  # a stage the head does not read stays None
            for j in self.read[task]:
                candidates = shared[j * self.num_experts:(j + 1) * self.num_experts]
                candidates = [*candidates, *(own[str(j)](maps[j]) for own in self.own_experts[task])]
                mixed[j] = (gate * torch.stack(candidates, dim=1)).sum(1)
            outputs[task] = head(mixed, size)
        return outputs

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.backbone, self.experts],
                **{t: [self.gates[t], self.own_experts[t], h] for t, h in self.heads.items()}}


def read_stages(head: nn.Module, stages: int) -> list[int]:
    """The stages a head reads: the coarsest alone for a head that says so (`coarsest_only`), else all."""
    return [stages - 1] if getattr(head, "coarsest_only", False) else list(range(stages))
