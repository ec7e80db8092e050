"""Dense-prediction metrics that no torchmetrics built-in covers.

Every metric accumulates over the whole split (one confusion matrix, pixel-level sums, or every pixel's
angle) and computes once at the end: it is never an average of per-batch averages.  ``compute()`` returns a
dict ``name -> 0-dim float tensor``; the class attribute ``higher_is_better`` gives the direction of every
name.  With nothing to average (no update, or no valid pixel) every value is NaN rather than an error.

Invalid pixels: segmentation targets equal to ``ignore_index``; depth targets equal to ``invalid_value``
(default 0); surface-normal targets that are the all-zero vector.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mtl_cli.errors import UserError
from mtl_cli.ops import unit_vectors

_NAN = float("nan")


def _check_same_shape(what: str, preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise UserError(
            f"{what} prediction has shape {list(preds.shape)} but its target has shape {list(target.shape)}"
        )


class SegmentationMetrics(Metric):
    """Mean IoU and pixel accuracy from one confusion matrix accumulated over the split.

    ``update(preds, target)``: ``preds`` are logits or probabilities ``[B, C, H, W]`` (argmax over dim 1) or
    integer labels ``[B, H, W]``; ``target`` is integer ``[B, H, W]``.  Pixels whose target equals
    ``ignore_index`` are skipped.  ``confmat[t, p]`` counts pixels of true class ``t`` predicted as ``p``.

    ``miou`` averages the IoU of the classes whose union (target or prediction) is non-empty; a class absent
    from both is left out, not counted as 0.  ``pixel_acc`` is correct / counted pixels.  Both in ``[0, 1]``.
    """

    higher_is_better = {"miou": True, "pixel_acc": True}
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        c = self.num_classes
        if preds.dim() == target.dim() + 1:
            if preds.shape[1] != c:
                raise UserError(
                    f"segmentation prediction has {preds.shape[1]} channels (shape {list(preds.shape)}) "
                    f"but the metric expects num_classes={c}"
                )
            preds = preds.argmax(dim=1)
        _check_same_shape("segmentation", preds, target)
        target, preds = target.long().reshape(-1), preds.long().reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target, preds = target[keep], preds[keep]
        for name, labels in (("target", target), ("prediction", preds)):
            if labels.numel() and (labels.min() < 0 or labels.max() >= c):
                raise UserError(
                    f"segmentation {name} contains labels outside [0, {c}) "
                    f"(min {int(labels.min())}, max {int(labels.max())}); check num_classes and ignore_index"
                )
        self.confmat += torch.bincount(target * c + preds, minlength=c * c).reshape(c, c)

    def per_class_iou(self) -> Tensor:
        """IoU of each class (float64, ``[num_classes]``); NaN for a class with an empty union."""
        cm = self.confmat.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, _NAN))

    def compute(self) -> dict[str, Tensor]:
        iou = self.per_class_iou()
        present = ~iou.isnan()
        miou = iou[present].mean() if present.any() else iou.new_tensor(_NAN)
        total = self.confmat.sum()
        acc = self.confmat.diag().sum().double() / total if total > 0 else iou.new_tensor(_NAN)
        return {"miou": miou.float(), "pixel_acc": acc.float()}


class DepthMetrics(Metric):
    """Absolute and relative depth error over the valid pixels of the whole split (lower is better).

    ``update(preds, target)`` with both ``[B, 1, H, W]``; a pixel is valid where ``target != invalid_value``.
    ``abs_err = sum|p - t| / n`` and ``rel_err = sum(|p - t| / t) / n`` with ``n`` the number of valid pixels
    of the split.  Sums are kept in float64 to avoid drift over a long split.
    """

    higher_is_better = {"abs_err": False, "rel_err": False}
    is_differentiable = False
    full_state_update = False

    def __init__(self, invalid_value: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.invalid_value = invalid_value
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rel_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        _check_same_shape("depth", preds, target)
        valid = target != self.invalid_value
        t = target[valid].double()
        err = (preds.detach()[valid].double() - t).abs()
        self.abs_sum += err.sum()
        self.rel_sum += (err / t).sum()
        self.count += valid.sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.double()  # 0 / 0 gives NaN on an empty split
        return {"abs_err": (self.abs_sum / n).float(), "rel_err": (self.rel_sum / n).float()}


class NormalMetrics(Metric):
    """Angular error of surface normals, in degrees, over every valid pixel of the split.

    ``update(preds, target)`` with both ``[B, 3, H, W]``; a pixel is valid where its target vector is non-zero.
    Both vectors are normalised and the cosine clamped to ``[-1, 1]`` before ``acos``.  Every valid pixel's
    angle is kept (float32, a ``"cat"`` state) so that ``median_angle`` is the true median of the split; for an
    even count it is the mean of the two middle values (the ``numpy.median`` convention, unlike
    ``torch.median`` which returns the lower one).  ``within_X`` is the percentage (0..100) of valid pixels
    with an angle strictly below ``X`` degrees.
    """

    thresholds = (11.25, 22.5, 30.0)
    higher_is_better = {
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    is_differentiable = False
    full_state_update = False

    def __init__(self, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("angles", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        _check_same_shape("surface-normal", preds, target)
        if preds.dim() < 2 or preds.shape[1] != 3:
            raise UserError(f"surface-normal prediction must have 3 channels, got shape {list(preds.shape)}")
        p = unit_vectors(preds.detach().float(), eps=self.eps)
        t = unit_vectors(target.float(), eps=self.eps)
        cos = (p * t).sum(dim=1).clamp(-1.0, 1.0)
        valid = (target != 0).any(dim=1)
        self.angles.append(torch.rad2deg(torch.acos(cos[valid])))

    def compute(self) -> dict[str, Tensor]:
        angles = dim_zero_cat(self.angles) if len(self.angles) else torch.zeros(0, device=self.device)
        n = angles.numel()
        if n == 0:
            nan = torch.tensor(_NAN, device=self.device)
            return {name: nan.clone() for name in self.higher_is_better}
        # The k-th smallest (1-based) at k = ceil(n/2) and floor(n/2)+1: the same element when n is odd.
        lo = angles.kthvalue((n + 1) // 2).values
        hi = angles.kthvalue(n // 2 + 1).values
        out = {"mean_angle": angles.double().mean().float(), "median_angle": (lo + hi) / 2}
        for th in self.thresholds:
            out[f"within_{th:g}"] = (angles < th).double().mean().mul(100).float()
        return out
