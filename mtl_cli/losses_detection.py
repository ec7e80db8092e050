"""The loss of the dense detector (mtl_cli.models.detection): FCOS target assignment, then focal, GIoU and
centerness losses.

The target is {"boxes": list of [M_i, 4] XYXY pixel boxes, "labels": list of [M_i] int64 classes}, one entry per
image; an image may have no box. The whole batch is computed densely (boxes padded to the batch's largest count,
masks instead of boolean indexing), so the loss never waits for the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from mtl_cli.errors import UserError
from mtl_cli.models.detection import boxes_from


class Assignment:
    """Which box each location learns. `foreground` [B, N] bool; `boxes` [B, N, 4] and `labels` [B, N] hold the
    assigned box of every foreground location (meaningless elsewhere)."""

    def __init__(self, foreground: Tensor, boxes: Tensor, labels: Tensor):
        self.foreground, self.boxes, self.labels = foreground, boxes, labels


def pad_targets(target: dict, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The per-image lists as [B, M, 4] boxes, [B, M] labels and [B, M] validity, M the largest count (at least 1)."""
    boxes, labels = target["boxes"], target["labels"]
    size = max([len(b) for b in boxes] + [1])
    padded = torch.zeros(len(boxes), size, 4, device=device)
    padded_labels = torch.zeros(len(boxes), size, dtype=torch.long, device=device)
    valid = torch.zeros(len(boxes), size, dtype=torch.bool, device=device)
    for i, (b, l) in enumerate(zip(boxes, labels)):
        padded[i, :len(b)] = b.as_subclass(Tensor).to(device, torch.float32)
        padded_labels[i, :len(l)] = l.as_subclass(Tensor).to(device)
        valid[i, :len(b)] = True
    return padded, padded_labels, valid


def assign(points: Tensor, strides: Tensor, boxes: Tensor, labels: Tensor, valid: Tensor, level_range: float = 2.0,
           center_radius: float = 1.5) -> Assignment:
    """FCOS assignment. A location (point p of stride s) is a candidate for a box when p lies inside the box, within
    `center_radius * s` of the box's centre (in both axes), and its farthest side from p lies in
    (level_range * s, 2 * level_range * s] (no lower bound on the finest level, no upper bound on the coarsest), so
    that each level learns boxes of its scale; a box that no level claims that way (an odd shape between levels)
    is a candidate at every location inside it and near its centre. Among several candidate boxes a location
    takes the smallest."""
    x, y = points[:, 0, None], points[:, 1, None]                                   # [N, 1]
    x0, y0, x1, y1 = boxes[:, None].unbind(-1)                                      # [B, 1, M]
    sides = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=-1)                   # [B, N, M, 4]
    stride = strides[:, None]
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    central = ((x - centre_x).abs() < center_radius * stride) & ((y - centre_y).abs() < center_radius * stride)
    farthest = sides.amax(-1)
    lower = torch.where(stride == strides.min(), 0.0, level_range * stride)
    upper = torch.where(stride == strides.max(), float("inf"), 2 * level_range * stride)
    near_centre = (sides.amin(-1) > 0) & central & valid[:, None]
    candidate = near_centre & (farthest > lower) & (farthest <= upper)
    candidate |= near_centre & ~candidate.any(1, keepdim=True)  # a box no level claims by size goes to all levels
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[:, None]   # [B, 1, M]
    smallest, index = torch.where(candidate, area, float("inf")).min(-1)            # [B, N]
    matched = boxes.gather(1, index[..., None].expand(-1, -1, 4))
    return Assignment(smallest.isfinite(), matched, labels.gather(1, index))


def centerness_of(points: Tensor, boxes: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of points [..., 2] in boxes [..., 4]; 0 outside."""
    left, top = (points - boxes[..., :2]).clamp(min=0).unbind(-1)
    right, bottom = (boxes[..., 2:] - points).clamp(min=0).unbind(-1)
    ratio = (torch.minimum(left, right) / torch.maximum(left, right).clamp(min=1e-6)
             * torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp(min=1e-6))
    return ratio.sqrt()


class DetectionLoss(nn.Module):
    """focal(class logits, one-hot of the assigned class on foreground locations, zeros elsewhere)
    + box_weight * GIoU loss of the foreground locations' boxes + centerness_weight * BCE of their centerness,
    each summed and divided by the batch's number of foreground locations (at least 1)."""

    def __init__(self, level_range: float = 2.0, center_radius: float = 1.5, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, box_weight: float = 1.0, centerness_weight: float = 1.0):
        super().__init__()
        self.level_range, self.center_radius = level_range, center_radius
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_weight, self.centerness_weight = box_weight, centerness_weight
        self.labels_checked = False

    def forward(self, output: dict[str, Tensor], target: dict) -> Tensor:
        logits, ltrb, centerness = output["logits"].float(), output["ltrb"].float(), output["centerness"].float()
        points, strides = output["points"].float(), output["strides"].float()
        boxes, labels, valid = pad_targets(target, logits.device)
        if not self.labels_checked:  # once, as the trainer checks the first batch: a check waits for the GPU
            check_labels(labels[valid], logits.shape[-1])
            self.labels_checked = True
        assigned = assign(points, strides, boxes, labels, valid, self.level_range, self.center_radius)
        foreground = assigned.foreground.float()
        count = foreground.sum().clamp(min=1)

        classes = F.one_hot(assigned.labels, logits.shape[-1]).float() * foreground[..., None]
        focal = sigmoid_focal_loss(logits, classes, self.focal_alpha, self.focal_gamma, reduction="sum")

        predicted = boxes_from(points, ltrb)
        # Background locations are compared with their own prediction: a zero loss with finite gradients.
        wanted = torch.where(assigned.foreground[..., None], assigned.boxes, predicted.detach())
        giou = (generalized_box_iou_loss(predicted, wanted, reduction="none") * foreground).sum()

        central = centerness_of(points, assigned.boxes) * foreground
        bce = (F.binary_cross_entropy_with_logits(centerness, central, reduction="none") * foreground).sum()
        return (focal + self.box_weight * giou + self.centerness_weight * bce) / count


def check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"the detection head predicts {num_classes} classes (0..{num_classes - 1}), but the data's box labels "
            f"run from {int(labels.min())} to {int(labels.max())}: set tasks.detection.num_classes to the data's "
            "class count (see data.targets.detection), or fix the data")
