"""Losses that torch does not provide directly.

Conventions: dense predictions and targets are ``[B, C, H, W]``; depth uses ``0`` (``invalid_value``) for
missing pixels; surface normals use an all-zero target vector for missing pixels; landmarks mark a missing
sample with NaN coordinates; attributes mark an unknown entry with ``-1``; identities mark a missing label with
``ignore_index``.  Each loss is the mean over
the *valid* elements of the batch; a batch with no valid element gives a zero that still carries the graph
(``pred.sum() * 0``), never NaN.  Cross-entropy (with ``ignore_index``) and BCE-with-logits are used straight
from ``torch.nn``.

A prediction whose shape does not match its target raises :class:`UserError`: it almost always means a head
configured with the wrong number of output channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_cli.errors import UserError
from mtl_cli.ops import unit_vectors


def _check_same_shape(what: str, pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise UserError(
            f"{what} prediction has shape {list(pred.shape)} but its target has shape {list(target.shape)}; "
            "check the number of output channels of the task's head"
        )


def _masked_mean(values: Tensor, valid: Tensor, pred: Tensor) -> Tensor:
    """Mean of ``values[valid]``; a zero carrying ``pred``'s graph when nothing is valid.

    Written without boolean indexing or a host-side check, so it never waits for the GPU."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1)


class MaskedL1Loss(nn.Module):
    """Mean absolute error over pixels whose target differs from ``invalid_value`` (depth: 0 = missing).

    ``pred`` and ``target`` are ``[B, 1, H, W]`` (any identical shapes work).
    """

    def __init__(self, invalid_value: float = 0.0) -> None:
        super().__init__()
        self.invalid_value = invalid_value

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("depth", pred, target)
        target = target.to(pred.dtype)
        return _masked_mean((pred - target).abs(), target != self.invalid_value, pred)

    def count(self, pred: Tensor, target: Tensor) -> Tensor:
        return (target != self.invalid_value).sum()


class NormalCosineLoss(nn.Module):
    """Mean over valid pixels of ``1 - cos(pred, target)`` for surface normals ``[B, 3, H, W]``.

    A pixel is valid where its target vector is non-zero; valid targets are unit vectors (the data's contract).
    The prediction is taken as a unit vector too, as the normals head outputs it (``normalize: true`` in
    tasks/normals.yaml); with ``normalize=True`` the loss normalises the prediction itself (with ``eps``), for
    heads that do not. Normalising again what is already unit costs a third of the step's loss time on a CPU.
    """

    def __init__(self, normalize: bool = False, eps: float = 1e-8) -> None:
        super().__init__()
        self.normalize, self.eps = normalize, eps

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("surface-normal", pred, target)
        if pred.dim() < 2 or pred.shape[1] != 3:
            raise UserError(f"surface-normal prediction must have 3 channels, got shape {list(pred.shape)}")
        target = target.to(pred.dtype)
        pred = unit_vectors(pred, eps=self.eps) if self.normalize else pred
        return _masked_mean(1 - (pred * target).sum(dim=1), (target != 0).any(dim=1), pred)

    def count(self, pred: Tensor, target: Tensor) -> Tensor:
        return (target != 0).any(dim=1).sum()


class ScalarL1Loss(nn.Module):
    """Mean absolute error for a per-image scalar (e.g. an object count).

    ``pred`` is ``[B, 1]`` or ``[B]``, ``target`` is ``[B]`` (``[B, 1]`` is accepted too; integer or float, cast
    to ``pred``'s dtype).
    """

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.reshape(-1) if target.dim() == 2 and target.shape[1] == 1 else target
        ok = target.dim() == 1 and pred.shape in (target.shape, (target.shape[0], 1))
        if not ok:
            raise UserError(
                f"scalar prediction has shape {list(pred.shape)} but its target has shape {list(target.shape)}; "
                "expected a prediction of shape [B] or [B, 1] (a head with 1 output) for a target of shape [B]"
            )
        if target.numel() == 0:
            return pred.sum() * 0
        return (pred.reshape(target.shape) - target.to(pred.dtype)).abs().mean()


class LandmarkLoss(nn.Module):
    """Smooth L1 (or L1) between predicted and target points ``[B, K, 2]``, the mean over the coordinates of the
    labelled samples.

    A sample is unlabelled when any of its target coordinates is not finite (a dataset fills a missing sample's
    points with NaN; negative coordinates are valid, points may lie outside the image); it is skipped.
    ``beta`` is where smooth L1 turns from quadratic to linear, in the target's units: on normalised coordinates
    the default 0.01 is 1% of the image, so the loss is L1 for all but nearly right points.
    """

    def __init__(self, kind: str = "smooth_l1", beta: float = 0.01) -> None:
        super().__init__()
        if kind not in ("smooth_l1", "l1") or not beta > 0:
            raise UserError(f"LandmarkLoss: kind must be smooth_l1 or l1 and beta > 0, got kind={kind!r}, beta={beta}")
        self.kind, self.beta = kind, beta

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("landmark", pred, target)
        target = target.to(pred.dtype)
        labelled = target.isfinite().flatten(1).all(1)[:, None, None].expand_as(target)
        target = torch.where(labelled, target, pred.detach())  # no NaN reaches the arithmetic, even times 0
        if self.kind == "l1":
            err = (pred - target).abs()
        else:
            err = F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta)
        return _masked_mean(err, labelled, pred)

    def count(self, pred: Tensor, target: Tensor) -> Tensor:
        return target.isfinite().flatten(1).all(1).sum() * math.prod(target.shape[1:])


class MaskedBCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy with logits over the entries whose target is not ``ignore_value`` (many binary
    attributes per image: ``[B, A]`` logits, targets 0 = absent, 1 = present, -1 = unknown by default)."""

    def __init__(self, ignore_value: float = -1) -> None:
        super().__init__()
        self.ignore_value = ignore_value

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("attribute", pred, target)
        known = target != self.ignore_value
        target = torch.where(known, target, 0).to(pred.dtype)
        return _masked_mean(F.binary_cross_entropy_with_logits(pred, target, reduction="none"), known, pred)

    def count(self, pred: Tensor, target: Tensor) -> Tensor:
        return (target != self.ignore_value).sum()


class ArcFaceLoss(nn.Module):
    """Additive angular margin softmax (ArcFace, Deng et al., CVPR 2019) over the cosines of an EmbeddingHead.

    With ``theta`` the angle between an embedding and its class centre, the target class's logit becomes
    ``s * cos(theta + m)`` and every other class's stays ``s * cos(theta_j)``; then cross-entropy, the mean over
    the samples whose label is a trained class. Beyond ``theta = pi - m``, ``cos(theta + m)`` would grow
    again with ``theta``, rewarding a worse embedding; there the paper's code uses ``cos(theta) - m sin(m)``
    instead, which keeps decreasing. With ``easy_margin`` the margin applies only where ``cos(theta) > 0``.

    ``pred``: the head's dict (its ``"cosine"`` ``[B, C]`` is used) or the cosines themselves; ``target``: int
    ``[B]`` class indices. Computed in float32 whatever the autocast precision.

    Skipped: labels equal to ``ignore_index``, and labels ``>= C``: identities unseen in training (the face
    datasets give the val/test identities, disjoint from train's, the labels C, C+1, ...), which have no class
    centre to score against. Any other negative label is an error of the data.
    """

    def __init__(self, scale: float = 30.0, margin: float = 0.5, easy_margin: bool = False,
                 ignore_index: int = -1) -> None:
        super().__init__()
        if not scale > 0 or not 0 <= margin < math.pi / 2:
            raise UserError(f"ArcFaceLoss: need scale > 0 and 0 <= margin < pi/2 (radians), got scale={scale}, "
                            f"margin={margin}")
        self.scale, self.margin, self.easy_margin, self.ignore_index = scale, margin, easy_margin, ignore_index

    def forward(self, pred: Tensor | Mapping[str, Tensor], target: Tensor) -> Tensor:
        cosine = (pred["cosine"] if isinstance(pred, Mapping) else pred).float().clamp(-1, 1)
        if cosine.dim() != 2 or target.shape != cosine.shape[:1]:
            raise UserError(f"identity cosines have shape {list(cosine.shape)} and labels {list(target.shape)}; "
                            "expected [B, num_classes] and [B]")
        ignored = (target == self.ignore_index) if self.ignore_index is not None else torch.zeros_like(
            target, dtype=torch.bool)
        if (~ignored & (target < 0)).any():  # one host sync per step: a gather of a negative index would crash
            raise UserError(f"identity labels must be class indices >= 0 or the ignore value {self.ignore_index}, "
                            f"got {sorted(set(target[~ignored & (target < 0)].tolist()))[:5]}")
        labelled = ~ignored & (target < cosine.shape[1])  # labels >= C: unseen identities, no centre to score
        label = torch.where(labelled, target, 0).long()[:, None]
        cos_t = cosine.gather(1, label)
        sin_t = (1 - cos_t * cos_t).clamp_min(1e-7).sqrt()  # the clamp keeps sqrt's gradient finite at |cos| = 1
        m = self.margin
        with_margin = cos_t * math.cos(m) - sin_t * math.sin(m)  # cos(theta + m)
        if self.easy_margin:
            target_logit = torch.where(cos_t > 0, with_margin, cos_t)
        else:
            target_logit = torch.where(cos_t > math.cos(math.pi - m), with_margin, cos_t - m * math.sin(m))
        logits = cosine.scatter(1, label, target_logit) * self.scale
        return _masked_mean(F.cross_entropy(logits, label[:, 0], reduction="none"), labelled, cosine)

    def count(self, pred: Tensor | Mapping[str, Tensor], target: Tensor) -> Tensor:
        classes = (pred["cosine"] if isinstance(pred, Mapping) else pred).shape[1]
        ignored = (target == self.ignore_index) if self.ignore_index is not None else torch.zeros_like(
            target, dtype=torch.bool)
        return (~ignored & (target >= 0) & (target < classes)).sum()


def mean_count(loss: nn.Module, pred, target) -> Tensor | int:
    """How many terms `loss(pred, target)` is the mean of (valid pixels, labelled samples, entries): the weight of
    its value in a mean over several batches or processes, so that the split's or the global batch's mean is
    that of all its terms, never a mean of means. A loss of ours says it (`count`); torch's are read here; any
    other counts its samples."""
    if hasattr(loss, "count"):
        return loss.count(pred, target)
    if isinstance(loss, nn.CrossEntropyLoss) and not target.is_floating_point():
        valid = target != loss.ignore_index
        return valid.sum() if loss.weight is None else (loss.weight[torch.where(valid, target, 0)] * valid).sum()
    if isinstance(loss, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)):
        return target.numel() // (target.shape[1] if isinstance(loss, nn.CrossEntropyLoss) else 1)
    if isinstance(target, Mapping):  # a several-part target (detection: boxes and labels per image)
        target = next(iter(target.values()))
    return len(target)
