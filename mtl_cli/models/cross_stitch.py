"""Cross-stitch networks (Misra, Shrivastava, Gupta and Hebert, CVPR 2016): one backbone column per task, and
after every stage but the last a cross-stitch unit that replaces each column's map with a learned linear
combination of all columns' maps: x_t <- sum_s alpha[t, s] * x_s (alpha per channel, or one per stage).

Initialised as in the paper: alpha[t, t] = self_weight (0.9) and the rest of each row shares 1 - self_weight, so
every column starts mostly itself. With self_weight=1 the columns are independent networks. The paper also
scales the units' learning rate up; here they train at the optimizer's rate. Every column and unit is trunk:
each task's loss reaches every column through the units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import MultiTaskModel, make_heads


class CrossStitchUnit(nn.Module):
    """Mixes T maps [B,C,H,W]: alpha [T,T,C] (per channel) or [T,T,1]."""

    def __init__(self, tasks: int, channels: int, self_weight: float = 0.9, per_channel: bool = True):
        super().__init__()
        other = (1.0 - self_weight) / (tasks - 1) if tasks > 1 else 0.0
        alpha = torch.full((tasks, tasks), other).fill_diagonal_(self_weight)
        self.alpha = nn.Parameter(alpha[:, :, None].repeat(1, 1, channels if per_channel else 1))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        stacked = torch.stack(maps, dim=0)  # [T,B,C,H,W]
        mixed = torch.einsum("tsc,sbchw->tbchw", self.alpha.to(stacked.dtype), stacked)
        return list(mixed.unbind(0))


class CrossStitch(MultiTaskModel):
    """image -> T backbone columns, run stage by stage with cross-stitch units between -> head t on column t."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 self_weight: float = 0.9, per_channel: bool = True):
        super().__init__()
        if not 0.0 <= float(self_weight) <= 1.0:
            raise UserError(f"architecture.self_weight={self_weight}: give a weight from 0 to 1 (the paper: 0.9)")
        self.columns = nn.ModuleDict({task: backbone() for task in heads})
        first = next(iter(self.columns.values()))
        self.last_stage = first.out_indices[-1]
        with torch.no_grad():  # the channels of every stage's output, to size the units
            x, channels = first.normalize(torch.zeros(1, 3, first.probe_size, first.probe_size)), []
            for stage in first.stages[:self.last_stage]:
                x = stage.eval()(x)
                channels.append(first.to_map(x).shape[1])
            first.train()
        self.units = nn.ModuleList(CrossStitchUnit(len(heads), c, float(self_weight), per_channel) for c in channels)
        self.heads = make_heads(heads, first.channels, first.strides)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        columns = list(self.columns.values())
        xs = [c.normalize(image) for c in columns]
        outs: list[list[torch.Tensor]] = [[] for _ in columns]
        for k in range(self.last_stage + 1):
            xs = [c.stages[k](x) for c, x in zip(columns, xs)]
            maps = [c.to_map(x) for c, x in zip(columns, xs)]
            if k < self.last_stage:
                maps = self.units[k](maps)
                xs = [c.from_map(m, x) for c, m, x in zip(columns, maps, xs)]
            if k in columns[0].out_indices:
                for out, m in zip(outs, maps):
                    out.append(m)
        return [m for out in outs for m in out]

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        count = len(features) // len(self.heads)
        return {task: head(features[i * count:(i + 1) * count], size)
                for i, (task, head) in enumerate(self.heads.items())}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.columns.parameters()
        yield from self.units.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.units], **{t: [self.columns[t], h] for t, h in self.heads.items()}}
