"""One scalar per image and task for attribution: what "this task's prediction" means when a saliency method asks
which pixels drive it.

Each chooser reads the task's raw output at the input (the prediction being explained) and returns a `Target`:
a function of any raw output of the same task, [B, ...] -> [B], with its choices (the class, the region, the box)
fixed at the input, so that integrated gradients follows one quantity along its path from the baseline instead of
switching class on the way. Each task's config names its chooser (`explain:` in configs/tasks/*.yaml): the task
knows what its raw output holds better than the output's shape does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Target:
    scalar: Callable[[object], Tensor]  # a raw output of the task [B, ...] -> [B]
    says: str                           # what the scalar is, for the console and explain.json


def class_logit(output: Tensor) -> Target:
    """Classification: the logit of the predicted class."""
    chosen = int(output[0].argmax())
    return Target(lambda out: out[:, chosen], f"logit of the predicted class {chosen}")


def top_label_logit(output: Tensor) -> Target:
    """Multilabel, attributes: the logit of the most probable label (sigmoid keeps the order of the logits)."""
    chosen = int(output[0].argmax())
    return Target(lambda out: out[:, chosen], f"logit of the top predicted label {chosen}")


def count_value(output: Tensor) -> Target:
    """Count: the predicted count (regression, one output), or the predicted class's logit (count_ce's classes)."""
    if output.shape[1] == 1:
        return Target(lambda out: out[:, 0], "predicted count")
    chosen = int(output[0].argmax())
    return Target(lambda out: out[:, chosen], f"logit of the predicted count {chosen}")


def identity_cosine(output: dict[str, Tensor]) -> Target:
    """Identity: the cosine to the nearest class centre, the identity that identification predicts."""
    chosen = int(output["cosine"][0].argmax())
    return Target(lambda out: out["cosine"][:, chosen], f"cosine to the nearest identity centre {chosen}")


def region_logit(output: Tensor) -> Target:
    """Segmentation: the mean logit of one predicted class over the pixels predicted as it. The class is the most
    frequent predicted class other than class 0, taken for background (digit_scenes' floor and sky); class 0 only
    when nothing else is predicted."""
    predicted = output[0].argmax(0)
    pixels = torch.bincount(predicted.flatten(), minlength=output.shape[1])
    chosen = int(pixels[1:].argmax()) + 1 if pixels[1:].sum() > 0 else 0
    region = (predicted == chosen).to(output.dtype)
    area = float(region.sum())
    return Target(lambda out: (out[:, chosen] * region).sum((1, 2)) / area,
                  f"mean logit of class {chosen} over its {int(area)} predicted pixels")


def centre_depth(output: Tensor) -> Target:
    """Depth: the mean predicted depth over the centre region, the middle half of the height and of the width."""
    height, width = output.shape[-2:]
    rows, cols = slice(height // 4, height - height // 4), slice(width // 4, width - width // 4)
    return Target(lambda out: out[:, 0, rows, cols].mean((1, 2)), "mean predicted depth over the centre region "
                  "(middle half of height and width)")


def dominant_normal(output: Tensor) -> Target:
    """Normals: the mean magnitude, over the whole image, of the component (x, y or z) largest on average at the
    input: how strongly the surfaces face that axis."""
    chosen = int(output[0].abs().mean((1, 2)).argmax())
    return Target(lambda out: out[:, chosen].abs().mean((1, 2)),
                  f"mean |normal component {'xyz'[chosen]}| over the image")


def top_box_score(output: dict[str, Tensor]) -> Target:
    """Detection: the score sqrt(sigmoid(class logit) * sigmoid(centerness)) of the top box, the best (location,
    class) pair, which non-maximum suppression always keeps (models/detection.py decode_detections)."""
    def score(out: dict[str, Tensor], where: tuple[int, int] | None = None) -> Tensor:
        pairs = out["logits"].sigmoid() * out["centerness"].sigmoid().unsqueeze(-1)
        if where is None:
            return pairs
        return pairs[:, where[0], where[1]].sqrt()
    pairs = score(output)[0]
    location, label = divmod(int(pairs.argmax()), pairs.shape[1])
    return Target(lambda out: score(out, (location, label)), f"score of the top box (class {label})")


def mean_landmark(output: Tensor) -> Target:
    """Landmarks: the mean magnitude of the predicted coordinates, over every point and both axes (with coordinates
    in 0..1, how far down and right the points sit on average)."""
    return Target(lambda out: out.abs().mean((1, 2)), "mean |predicted coordinate| over the points")
