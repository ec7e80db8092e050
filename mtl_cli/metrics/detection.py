"""Box detection metric: COCO mean average precision, computed by pycocotools (through torchmetrics).

``update(preds, target)``: ``preds`` is a list, one dict per image, {"boxes": [K, 4] XYXY pixels, "scores": [K],
"labels": [K]} (what mtl_cli.models.detection.decode_detections gives); ``target`` is the task's target,
{"boxes": list of [M_i, 4] XYXY pixels, "labels": list of [M_i]}. Every image of the split is kept and COCOeval
runs once in ``compute()``: the numbers are those of the official COCO evaluation (area "all", at most 100
detections per image, 101-point interpolated precision), classes without any ground truth left out of the mean.

``compute()`` gives {"map": AP averaged over IoU thresholds .50:.05:.95, "map_50": AP at IoU .50}, 0-dim tensors
in [0, 1]; -1 when the split holds no ground-truth box (COCOeval's convention).
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from mtl_cli.errors import UserError


class DetectionMAP(MeanAveragePrecision):
    """mAP@[.5:.95] and mAP@.5 of XYXY boxes, by the pycocotools backend of torchmetrics' MeanAveragePrecision."""

    higher_is_better = {"map": True, "map_50": True}

    def __init__(self, num_classes: int | None = None, backend: str = "pycocotools", **kwargs) -> None:
        try:
            super().__init__(box_format="xyxy", iou_type="bbox", backend=backend, **kwargs)
        except ModuleNotFoundError as e:
            raise UserError(f"the detection metric needs the {backend} package ({e}): pip install {backend}") from None
        self.num_classes = num_classes

    def update(self, preds: list[dict[str, Tensor]], target: dict) -> None:
        if not isinstance(target, dict) or set(target) != {"boxes", "labels"}:
            raise UserError("the detection metric's target must be {boxes: ..., labels: ...}, the batch entries of the "
                            "boxes and their labels (see configs/tasks/detection.yaml)")
        targets = [{"boxes": b.as_subclass(Tensor).float(), "labels": l.as_subclass(Tensor).long()}
                   for b, l in zip(target["boxes"], target["labels"])]
        if len(preds) != len(targets):
            raise UserError(f"the detection metric got {len(preds)} predictions for {len(targets)} images")
        self._check_labels(targets)
        preds = [{"boxes": p["boxes"].detach().float(), "scores": p["scores"].detach().float(),
                  "labels": p["labels"].long()} for p in preds]
        super().update(preds, targets)

    def _check_labels(self, targets: list[dict[str, Tensor]]) -> None:
        if self.num_classes is None:
            return
        for t in targets:
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise UserError(f"a box label ({int(labels.min())}..{int(labels.max())}) lies outside the "
                                f"{self.num_classes} classes of the detection task: check tasks.detection.num_classes")

    def compute(self) -> dict[str, Tensor]:
        result = super().compute()
        return {"map": result["map"].float(), "map_50": result["map_50"].float()}
