"""Swapping a network's batch norm for frozen batch norm or group norm, after any pretrained weights are in."""

from __future__ import annotations

import math

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from mtl_cli.errors import UserError

NORMS = ("batch_norm", "frozen_batch_norm", "group_norm")


def replace_norms(model: nn.Module, norm: str | None, name: str, groups: int = 32) -> None:
    """Replaces every BatchNorm2d of `model` in place.

    `frozen_batch_norm` keeps the statistics and affine parameters as constants (the usual choice for small
    batches on a pretrained backbone); `group_norm` keeps the affine parameters and normalises over groups of
    channels (32, or the largest divisor of the channel count below it), so the learned statistics are lost.
    null and `batch_norm` leave the model as it is."""
    if norm is None or norm == "batch_norm":
        if norm and not _has_batch_norm(model):
            raise UserError(f"backbone.norm=batch_norm: {name} has no batch norm (it uses layer norm); use null")
        return
    if norm not in NORMS:
        raise UserError(f"backbone.norm={norm!r}: choose one of {', '.join(NORMS)}, or null (the model's own)")
    if not _has_batch_norm(model):
        raise UserError(f"backbone.norm={norm}: {name} has no batch norm to replace (it uses layer norm); use null")
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, child_name, _replacement(child, norm, groups))


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _replacement(bn: nn.BatchNorm2d, norm: str, groups: int) -> nn.Module:
    channels = bn.num_features
    if norm == "frozen_batch_norm":
        frozen = FrozenBatchNorm2d(channels, eps=bn.eps)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        if bn.affine:
            frozen.weight.copy_(bn.weight.detach())
            frozen.bias.copy_(bn.bias.detach())
        return frozen
    group_norm = nn.GroupNorm(math.gcd(groups, channels), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        group_norm.weight.data.copy_(bn.weight.detach())
        group_norm.bias.data.copy_(bn.bias.detach())
    return group_norm
