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

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: int, hidden: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * in_channels[-1], hidden), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(hidden, out_channels))

    def forward(self, features: Sequence[torch.Tensor], size: Sequence[int] | None = None) -> torch.Tensor:
        x = features[-1]
        return self.mlp(torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1))
