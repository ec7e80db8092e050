"""MTI-Net (Vandenhende, Georgoulis and Van Gool, "MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task
Learning", ECCV 2020): PAD-Net's prediction-and-distillation at every scale of the backbone, since tasks that agree
at one scale may not at another, with what the coarser scale learnt propagated to the finer one.

At each tapped map x_s, coarse to fine, per dense task t: F_t^s = two residual blocks on x_s concatenated with t's
propagated features of scale s+1 (upsampled; x_s alone at the coarsest); an intermediate prediction from F_t^s,
deep-supervised at every scale with t's loss, weighted `aux_weight` (1 in the reference code); the feature
propagation module (FPM) of scale s, from every task's F^s: a per-task softmax mask over the concatenated task
features, a residual block down to one map, and per task a squeeze-and-excitation of it added to F_t^s, which
scale s-1 reads; the multi-modal distillation of scale s (models/distillation.py) gives D_t^s. The task's head
aggregates D_t^0..D_t^{S-1} into the final output at the input size.

Width: the paper's task features have the backbone's width at each scale (HRNet-18: 18 to 144 channels); here that
width is capped at `channels`, so that wide backbones (ResNet-50's 2048) stay affordable. Departures: the
intermediate predictions and the aggregation use the task's own configured head (the reference: a 1x1 conv, and
HRNet's head: the upsampled scales concatenated, then 1x1 convolutions); the FPM's softmax runs over the tasks
for each channel, as the paper describes (the reference code reshapes the task-major concatenation so that its
softmax groups other channels); the intermediate tasks are the run's dense tasks; image-level tasks keep their
usual head on the backbone's maps.

The task features, the propagation and so every F_t^s reach every dense task's output: they are declared in
`decode_shared_parameters()` and listed in the `shared` part (so that trainer.compile leaves them eager where it
leaves the trunk: a gradient method runs one backward per task through them); the trunk (`encode`) is the backbone
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import SqueezeExcitation

from mtl_cli.errors import UserError
from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import make_heads
from mtl_cli.models.distillation import DeepSupervised, Distillation, TaskOutputs, dense_tasks, predictors


def residual(c_in: int, c_out: int) -> BasicBlock:
    """ResNet's basic block from `c_in` to `c_out` channels (a 1x1 conv-BN shortcut where they differ)."""
    shortcut = None if c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
    return BasicBlock(c_in, c_out, downsample=shortcut)


class FeaturePropagation(nn.Module):
    """The FPM of one scale: what every task's features share, selected per task, added to each task's."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.tasks, wide = list(tasks), len(tasks) * channels
        self.mask = nn.Sequential(residual(wide, wide // 4), residual(wide // 4, wide // 4),
                                  nn.Conv2d(wide // 4, wide, 1))
        self.reduce = residual(wide, channels)
        self.excite = nn.ModuleDict({t: SqueezeExcitation(channels, max(channels // 16, 1)) for t in self.tasks})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stacked = torch.stack([features[t] for t in self.tasks], dim=1)  # [B, T, C, H, W]
        mask = self.mask(stacked.flatten(1, 2)).unflatten(1, stacked.shape[1:3]).softmax(dim=1)
        shared = self.reduce((mask * stacked).flatten(1, 2))
        return {t: features[t] + self.excite[t](shared) for t in self.tasks}


class MTINet(DeepSupervised):
    """image -> backbone (shared) -> per scale, coarse to fine: per dense task features (with the coarser scale's
    propagated), intermediate prediction, FPM, distillation -> per task: head over the distilled scales."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 channels: int | None = 256, aux_weight: float = 1.0):
        super().__init__()
        if channels is not None and int(channels) < 1:
            raise UserError(f"architecture.channels={channels}: give the largest width of the task features (the "
                            "backbone's width at each scale, capped there), e.g. 256, or null for no cap")
        self.backbone = backbone()
        self.aux_weight = float(aux_weight)
        maps, strides = self.backbone.channels, self.backbone.strides
        self.heads = make_heads(heads, maps, strides)
        self.dense = dense_tasks(self.heads, maps, strides, self.backbone.probe_size, "mti_net")
        widths = [c if channels is None else min(c, int(channels)) for c in maps]
        coarser = [*widths[1:], 0]  # the propagated features each scale also reads
        self.features = nn.ModuleList(
            nn.ModuleDict({t: nn.Sequential(residual(c + extra, w), residual(w, w)) for t in self.dense})
            for c, w, extra in zip(maps, widths, coarser))
        self.propagation = nn.ModuleList(FeaturePropagation(self.dense, w) for w in widths[1:])  # scales 1..S-1
        self.initial = nn.ModuleList(predictors(heads, self.dense, w, s) for w, s in zip(widths, strides))
        reads = {t: [len(maps) - 1] if getattr(self.heads[t], "coarsest_only", False) else range(len(maps))
                 for t in self.dense}  # the scales each final head reads: distilled there alone
        self.distillation = nn.ModuleList(nn.ModuleDict({t: Distillation(t, self.dense, w) for t in self.dense
                                                         if s in reads[t]}) for s, w in enumerate(widths))
        for task in self.dense:  # the final heads aggregate the distilled scales
            self.heads[task] = heads[task](in_channels=widths, strides=strides)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> TaskOutputs:
        distilled = {t: [None] * len(features) for t in self.dense}
        intermediate = {t: [] for t in self.dense} if self.training else {}
        propagated = None
        for s in reversed(range(len(features))):
            x = features[s]
            if propagated is None:
                inputs = {t: x for t in self.dense}
            else:
                inputs = {t: torch.cat([x, F.interpolate(propagated[t], size=x.shape[-2:], mode="bilinear",
                                                         align_corners=False)], dim=1) for t in self.dense}
            task_features = {t: self.features[s][t](inputs[t]) for t in self.dense}
            for t in intermediate:
                intermediate[t].append(self.initial[s][t]([task_features[t]], size))
            if s > 0:
                propagated = self.propagation[s - 1](task_features)
            for t, distil in self.distillation[s].items():
                distilled[t][s] = distil(task_features)
        outputs = {task: head(distilled[task] if task in self.dense else features, size)
                   for task, head in self.heads.items()}
        return TaskOutputs(outputs, intermediate)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def decode_shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.features.parameters()
        yield from self.propagation.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        own = {t: [m[t] for m in (*self.initial, *self.distillation) if t in m] for t in self.heads}
        return {"shared": [self.backbone, self.features, self.propagation],
                **{t: [*own[t], h] for t, h in self.heads.items()}}
