"""PAD-Net (Xu, Ouyang, Wang and Sebe, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network for
Simultaneous Depth Estimation and Scene Parsing", CVPR 2018): predict every dense task once from the shared
features, deep-supervised with the task's own loss, then let each task's features receive what the other tasks'
intermediate features say (multi-modal distillation, models/distillation.py), and predict again from them.

Per dense task t: F_t = two bottleneck blocks on the backbone's maps fused at the finest map's stride (each map
projected to `channels` by a 1x1 conv of t's own, upsampled and summed); an intermediate prediction from F_t
(deep supervision, weighted `aux_weight`); the distilled D_t = F_t + G_t * sum_{s != t} W_s F_s; the task's head
on D_t gives the final output at the input size.

Departures: the paper's intermediate tasks include auxiliary ones (contours, surface normals) that are not final
tasks; here, as in the reference code of Vandenhende et al. (Multi-Task-Learning-PyTorch) run on the final tasks,
they are the run's dense tasks. The paper and the reference read one map of the front end (in the reference, HRNet's
maps upsampled and concatenated); here each task reads every tapped map of the backbone through 1x1 convolutions of
its own, summed at the finest stride (a 1x1 convolution of their concatenation, computed before the upsampling), then
two bottleneck blocks as in the reference. The intermediate and final predictions use the task's own configured head
(the reference: a 1x1 conv, and two bottlenecks plus a 1x1 conv), so that each fits its task's loss. Image-level
tasks keep their usual head on the backbone's maps.

Every task's F_t reaches every dense task's output through the distillation, so those branches are declared in
`decode_shared_parameters()` and listed in the `shared` part (so that trainer.compile leaves them eager where it
leaves the trunk: a gradient method runs one backward per task through them); the trunk (`encode`) is the backbone
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from mtl_cli.errors import UserError
from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import make_heads
from mtl_cli.models.distillation import DeepSupervised, Distillation, TaskOutputs, dense_tasks, predictors


class FusedFeatures(nn.Module):
    """One task's intermediate features: the backbone's maps, each by a 1x1 conv to `channels`, summed at the
    finest map's size, batch-normalised, then two bottleneck blocks."""

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
        self.start = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(Bottleneck(channels, channels // 4), Bottleneck(channels, channels // 4))

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        finest = maps[0].shape[-2:]
        x = self.lateral[0](maps[0])
        for lateral, m in zip(self.lateral[1:], maps[1:]):
            x = x + F.interpolate(lateral(m), size=finest, mode="bilinear", align_corners=False)
        return self.blocks(self.start(x))


class PADNet(DeepSupervised):
    """image -> backbone (shared) -> per dense task: features, intermediate prediction -> distillation -> head."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 channels: int = 256, aux_weight: float = 1.0):
        super().__init__()
        if int(channels) < 4 or int(channels) % 4:
            raise UserError(f"architecture.channels={channels}: give a multiple of 4 (the bottleneck blocks are "
                            "channels/4 wide), e.g. the reference's 256")
        self.backbone = backbone()
        self.aux_weight = float(aux_weight)
        widths, strides = self.backbone.channels, self.backbone.strides
        self.heads = make_heads(heads, widths, strides)
        self.dense = dense_tasks(self.heads, widths, strides, self.backbone.probe_size, "pad_net")
        channels, finest = int(channels), strides[0]
        self.features = nn.ModuleDict({t: FusedFeatures(widths, channels) for t in self.dense})
        self.initial = predictors(heads, self.dense, channels, finest)
        self.distillation = nn.ModuleDict({t: Distillation(t, self.dense, channels) for t in self.dense})
        for task in self.dense:  # the final heads read the distilled map
            self.heads[task] = heads[task](in_channels=[channels], strides=[finest])

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(image)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> TaskOutputs:
        task_features = {t: self.features[t](features) for t in self.dense}
        outputs, intermediate = {}, {}
        for task, head in self.heads.items():
            if task in self.dense:
                outputs[task] = head([self.distillation[task](task_features)], size)
                if self.training:
                    intermediate[task] = [self.initial[task]([task_features[task]], size)]
            else:
                outputs[task] = head(features, size)
        return TaskOutputs(outputs, intermediate)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def decode_shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.features.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        own = {t: [self.initial[t], self.distillation[t]] if t in self.dense else [] for t in self.heads}
        return {"shared": [self.backbone, self.features], **{t: [*own[t], h] for t, h in self.heads.items()}}
