"""Task heads: each takes the shared feature maps (fine to coarse) and returns one task's raw output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtl_cli.ops import unit_vectors


class DenseHead(nn.Module):
    """A light decoder for per-pixel tasks (segmentation, depth, normals).

    Every feature map is projected to `width` channels by a 1x1 conv, upsampled to the finest map and summed;
    a 3x3 conv-BN-ReLU and a 1x1 conv give `out_channels`, upsampled to `size` (the input's). With `normalize`, the
    output is L2-normalised per pixel (surface normals).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: int, width: int = 64,
                 normalize: bool = False):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 1))
        self.normalize = normalize

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        finest = features[0].shape[-2:]
        x = self.lateral[0](features[0])
        for lateral, f in zip(self.lateral[1:], features[1:]):
            x = x + F.interpolate(lateral(f), size=finest, mode="bilinear", align_corners=False)
        x = self.fuse(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return unit_vectors(x) if self.normalize else x


class PooledHead(nn.Module):
    """A per-image head (classification, multilabel, count): global average and max pooling of the coarsest map,
    concatenated, then an MLP. (Max pooling keeps what one object shows strongly, which averaging dilutes.)"""

    coarsest_only = True  # reads features[-1] alone: architectures need not build the other stages for it

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: int, hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * in_channels[-1], hidden), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(hidden, out_channels))

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int] | None = None) -> torch.Tensor:
        x = features[-1]
        return self.mlp(torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1))


class LandmarkHead(nn.Module):
    """K points per image (landmarks), as (x, y) in the target's units: output ``[B, num_points, 2]``.

    The coarsest map is average-pooled to a ``grid`` x ``grid`` layout rather than to one vector, so that where
    things are survives the pooling (a global pool is blind to position); the flattened grid feeds an MLP.
    """

    coarsest_only = True  # reads features[-1] alone: architectures need not build the other stages for it

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_points: int, grid: int = 4,
                 hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.num_points, self.grid = num_points, grid
        self.mlp = nn.Sequential(nn.Linear(in_channels[-1] * grid * grid, hidden), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(hidden, 2 * num_points))

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int] | None = None) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(features[-1], self.grid).flatten(1)
        return self.mlp(x).unflatten(1, (self.num_points, 2))


class EmbeddingHead(nn.Module):
    """An identity embedding for a margin-based softmax (ArcFace): PooledHead's pooling and MLP give a ``dim``
    vector, L2-normalised. The head also holds one learnable centre per class, so that the optimizer, which sees
    the model's parameters, trains them.

    Returns ``{"embedding": [B, dim] unit vectors, "cosine": [B, num_classes]}``, the cosines between each
    embedding and each (normalised) class centre: the loss adds its margin to them, identification takes their
    argmax, verification compares embeddings.
    """

    coarsest_only = True  # reads features[-1] alone: architectures need not build the other stages for it

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, dim: int = 64,
                 hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.embed = PooledHead(in_channels, strides, out_channels=dim, hidden=hidden, dropout=dropout)
        self.centres = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        embedding = unit_vectors(self.embed(features))
        return {"embedding": embedding, "cosine": embedding @ unit_vectors(self.centres).T}


class ASPPHead(nn.Module):
    """DeepLabv3's head for a dense task, as LibMTL and later papers put one per task on a dilated ResNet-50:
    torchvision's ASPP over the coarsest map, a 3x3 conv-BN-ReLU and a 1x1 conv to `out_channels`, upsampled
    bilinearly to `size` (the input's); with `normalize`, L2-normalised per pixel (surface normals).

    `rates` are the atrous rates at output stride 8 (DeepLabv3's 12, 24, 36); on a map of stride s they are scaled
    by 8/s (6, 12, 18 at 16, DeepLab's own choice there), so that the head sees the same image context whatever
    the backbone's stride. `width` is the ASPP's channel count (256 in DeepLab).
    """

    coarsest_only = True  # reads features[-1] alone: architectures need not build the other stages for it

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: int, width: int = 256,
                 rates: Sequence[int] = (12, 24, 36), normalize: bool = False):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP  # here: the head was appended to this file

        scaled = [max(1, round(rate * 8 / strides[-1])) for rate in rates]
        self.aspp = ASPP(in_channels[-1], scaled, width)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 1))
        self.normalize = normalize

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = self.fuse(self.aspp(features[-1]))
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return unit_vectors(x) if self.normalize else x
