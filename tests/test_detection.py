"""The detection task: decoder and NMS, mAP against pycocotools' COCOeval, the FCOS loss and assignment, and
training with segmentation through the installed `mtl`."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_cli import TINY, ok, run_dirs, scalar_tags

from mtl_cli.errors import UserError
from mtl_cli.losses_detection import DetectionLoss, assign, centerness_of, pad_targets
from mtl_cli.metrics import DetectionMAP
from mtl_cli.models.detection import DetectionHead, decode_detections, grid_points


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------------------ decoder


def hand_made_output(image_size=(64, 64)):
    """Four locations, three classes; centerness logits of 20 make sigmoid(centerness) exactly 1 in float32, so
    a (location, class) pair scores sqrt(sigmoid(logit)): a logit of logit(p**2) scores p."""
    points = torch.tensor([[20.0, 20.0], [22.0, 20.0], [50.0, 50.0], [40.0, 10.0]])
    ltrb = torch.tensor([[10.0] * 4, [10.0] * 4, [20.0] * 4, [5.0] * 4])
    logits = torch.full((4, 3), -20.0)
    for location, label, score in [(0, 0, 0.9), (1, 0, 0.8), (1, 1, 0.7), (2, 2, 0.6), (3, 0, 0.03)]:
        logits[location, label] = logit(score ** 2)
    return {"logits": logits[None], "ltrb": ltrb[None], "centerness": torch.full((1, 4), 20.0),
            "points": points, "strides": torch.full((4,), 4.0), "image_size": torch.tensor(image_size)}


def test_decoder_suppresses_overlapping_boxes_of_one_class_only():
    (found,) = decode_detections(hand_made_output(), score_threshold=0.05, iou_threshold=0.6)
    # Class 0: [10,10,30,30] (0.9) and [12,10,32,30] (0.8) overlap with IoU 360/440 = 0.82 > 0.6: the second goes.
    # Class 1 keeps that same box; class 2's box [30,30,70,70] is clipped to the image; 0.03 is below threshold.
    torch.testing.assert_close(found["boxes"], torch.tensor([[10.0, 10, 30, 30], [12, 10, 32, 30], [30, 30, 64, 64]]))
    torch.testing.assert_close(found["scores"], torch.tensor([0.9, 0.7, 0.6]))
    assert found["labels"].tolist() == [0, 1, 2]


def test_decoder_thresholds_and_limits():
    (loose,) = decode_detections(hand_made_output(), iou_threshold=0.9)  # 0.82 < 0.9: both class-0 boxes stay
    assert loose["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    (two,) = decode_detections(hand_made_output(), max_detections=2)
    assert two["scores"].tolist() == pytest.approx([0.9, 0.7])
    (low,) = decode_detections(hand_made_output(), score_threshold=0.01)
    assert 0.03 == pytest.approx(low["scores"][-1].item()) and low["labels"][-1] == 0
    (none,) = decode_detections(hand_made_output(), score_threshold=0.95)
    assert none["boxes"].shape == (0, 4) and none["scores"].shape == (0,) and none["labels"].shape == (0,)


# ------------------------------------------------------------------------------------------ mAP


# (boxes XYXY, labels) per image; detections also have scores. Image 2 has no box, image 3 no detection.
TRUTH = [
    ([[10, 10, 30, 40], [40, 40, 60, 60]], [0, 1]),
    ([[5, 5, 25, 25], [30, 5, 50, 25], [2, 30, 20, 50]], [0, 2, 1]),
    ([], []),
    ([[0, 0, 15, 15]], [1]),
]
DETECTIONS = [
    ([[11, 11, 30, 39], [40, 43, 60, 63], [0, 0, 10, 10]], [0.9, 0.8, 0.85], [0, 1, 1]),
    ([[6, 4, 26, 24], [30, 5, 50, 25], [4, 33, 22, 50], [28, 8, 47, 30]], [0.6, 0.7, 0.4, 0.3], [0, 0, 1, 2]),
    ([[1, 1, 20, 20]], [0.5], [2]),
    ([], [], []),
]


def as_tensors(items, with_scores):
    out = []
    for item in items:
        boxes = torch.tensor(item[0], dtype=torch.float32).reshape(-1, 4)
        entry = {"boxes": boxes, "labels": torch.tensor(item[-1], dtype=torch.long)}
        if with_scores:
            entry["scores"] = torch.tensor(item[1], dtype=torch.float32)
        out.append(entry)
    return out


def coco_reference(truth, detections, classes=3) -> tuple[float, float]:
    """mAP@[.5:.95] and mAP@.5 straight from pycocotools, with the boxes as COCO json (XYWH) built in memory."""
    def xywh(box):
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    annotations = []
    for i, (boxes, labels) in enumerate(truth):
        for box, label in zip(boxes, labels):  # ids from 1: COCOeval takes id 0 for "unmatched"
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label, "bbox": xywh(box),
                                "area": xywh(box)[2] * xywh(box)[3], "iscrowd": 0})
    ground = COCO()
    ground.dataset = {"images": [{"id": i} for i in range(len(truth))], "annotations": annotations,
                      "categories": [{"id": c} for c in range(classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        ground.createIndex()
        found = ground.loadRes([{"image_id": i, "category_id": c, "bbox": xywh(b), "score": s}
                                for i, (boxes, scores, labels) in enumerate(detections)
                                for b, s, c in zip(boxes, scores, labels)])
        evaluation = COCOeval(ground, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def test_map_equals_cocoeval_on_the_same_detections():
    metric = DetectionMAP(num_classes=3)
    predictions, targets = as_tensors(DETECTIONS, True), as_tensors(TRUTH, False)
    for part in (slice(0, 2), slice(2, 4)):  # two batches: the metric accumulates over the split
        metric.update(predictions[part], {"boxes": [t["boxes"] for t in targets[part]],
                                          "labels": [t["labels"] for t in targets[part]]})
    values = metric.compute()
    expected_map, expected_map_50 = coco_reference(TRUTH, DETECTIONS)
    assert set(values) == set(DetectionMAP.higher_is_better) == {"map", "map_50"}
    assert 0 < expected_map < expected_map_50 < 1  # misses, false positives and loose boxes all count
    assert values["map"].item() == pytest.approx(expected_map, abs=1e-6)
    assert values["map_50"].item() == pytest.approx(expected_map_50, abs=1e-6)


def test_map_rejects_labels_outside_the_classes():
    metric = DetectionMAP(num_classes=2)
    with pytest.raises(UserError, match="num_classes"):
        metric.update(as_tensors(DETECTIONS[:1], True), {"boxes": [torch.zeros(1, 4)], "labels": [torch.tensor([2])]})


# ------------------------------------------------------------------------------------------ loss


def test_assignment_by_level_centre_and_size():
    """On a 32x32 image with levels of stride 4 and 8: farthest-side ranges [0, 16] and (16, inf) at level_range=2."""
    points = torch.cat([grid_points((8, 8), 4, "cpu"), grid_points((4, 4), 8, "cpu")])
    strides = torch.cat([torch.full((64,), 4.0), torch.full((16,), 8.0)])
    target = {"boxes": [torch.tensor([[8.0, 8, 20, 20], [0, 0, 32, 32]]), torch.zeros(0, 4)],
              "labels": [torch.tensor([3, 5]), torch.zeros(0, dtype=torch.long)]}
    assigned = assign(points, strides, *pad_targets(target, torch.device("cpu")), level_range=2.0)
    fine, coarse = assigned.foreground[0, :64], assigned.foreground[0, 64:]
    # Small box: the stride-4 points within 6 px of its centre (14, 14), x and y in {10, 14, 18}: farthest side <= 12.
    assert fine.sum() == 9 and (assigned.labels[0, :64][fine] == 3).all()
    assert {tuple(p) for p in points[:64][fine].tolist()} == {(x, y) for x in (10.0, 14, 18) for y in (10.0, 14, 18)}
    # Whole-image box: the stride-8 points within 12 px of (16, 16), x and y in {12, 20}; its farthest side > 16.
    assert coarse.sum() == 4 and (assigned.labels[0, 64:][coarse] == 5).all()
    assert not assigned.foreground[1].any()  # an image without boxes has no positive


def small_head_and_target():
    torch.manual_seed(0)
    head = DetectionHead([8, 16], [4, 8], num_classes=4, width=16)
    features = [torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 16, 4, 4, requires_grad=True)]
    target = {"boxes": [torch.tensor([[2.0, 3, 14, 20], [16, 10, 30, 30]]), torch.zeros(0, 4)],
              "labels": [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)]}
    return head, features, target


def test_loss_is_finite_with_an_image_without_boxes_and_reaches_the_features():
    head, features, target = small_head_and_target()
    output = head(features, (32, 32))
    assert output["logits"].shape == (2, 80, 4) and output["ltrb"].shape == (2, 80, 4) and (output["ltrb"] > 0).all()
    loss = DetectionLoss()(output, target)
    loss.backward()
    assert loss.shape == () and torch.isfinite(loss) and loss > 0
    assert all(f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0 for f in features)
    empty = {"boxes": [torch.zeros(0, 4)] * 2, "labels": [torch.zeros(0, dtype=torch.long)] * 2}
    assert torch.isfinite(DetectionLoss()(head(features, (32, 32)), empty))


def test_a_perfect_prediction_costs_less_than_a_wrong_one():
    head, features, target = small_head_and_target()
    with torch.no_grad():
        output = head(features, (32, 32))
    points = output["points"]
    assigned = assign(points, output["strides"], *pad_targets(target, torch.device("cpu")))
    assert assigned.foreground[0].sum() > 2 and not assigned.foreground[1].any()

    def prediction(labels, boxes, centerness):
        fg = assigned.foreground
        logits = torch.full_like(output["logits"], -12.0)
        logits[fg, labels[fg]] = 12.0
        sides = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
        return {**output, "logits": logits, "ltrb": torch.where(fg[..., None], sides, output["ltrb"]),
                "centerness": torch.where(fg, centerness, torch.zeros_like(centerness))}

    central = centerness_of(points, assigned.boxes).clamp(1e-4, 1 - 1e-4)
    perfect = prediction(assigned.labels, assigned.boxes, torch.log(central / (1 - central)))
    shifted = assigned.boxes + torch.tensor([3.0, 3.0, 3.0, 3.0])
    wrong = prediction((assigned.labels + 1) % 4, shifted, torch.zeros_like(central))
    loss = DetectionLoss()
    best, worst = loss(perfect, target), loss(wrong, target)
    # What is left of a perfect prediction is the centerness BCE's entropy floor (centerness targets below 1).
    floor = torch.nn.functional.binary_cross_entropy(central[assigned.foreground], central[assigned.foreground])
    assert best.item() == pytest.approx(floor.item(), abs=1e-3)
    assert worst > best + 1


def test_loss_rejects_labels_outside_the_classes():
    head, features, target = small_head_and_target()
    target["labels"][0] = torch.tensor([1, 4])
    with pytest.raises(UserError, match="num_classes"):
        DetectionLoss()(head(features, (32, 32)), target)


# ------------------------------------------------------------------------------------------ end to end


SMALL_HEAD = "tasks.detection.head.width=16"  # a light head keeps the runs quick


def test_mtl_trains_detection_with_segmentation_and_logs_map(mtl_main, tmp_path):
    ok(mtl_main("train", "tasks=[detection,segmentation]", SMALL_HEAD, *TINY, "trainer.max_epochs=1"))  # in tmp_path
    (run_dir,) = run_dirs(tmp_path / "outputs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    values = metrics["final"]["metrics"]["detection"]
    assert set(values) == {"map", "map_50"} and all(0 <= v <= 1 for v in values.values())
    tags = scalar_tags(run_dir)
    assert {"val/detection/map", "val/detection/map_50", "train/loss/detection", "val/loss/detection",
            "val/segmentation/miou"} <= tags


def test_a_gradient_method_trains_detection_through_the_feature_cut(mtl_main, tmp_path):
    result = ok(mtl_main("train", "tasks=[detection,segmentation]", "weighting=pcgrad", SMALL_HEAD, *TINY,
                         "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.limit_val_batches=1"))
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert "not finite" not in result.out
    assert "val/detection/map_50" in scalar_tags(run_dir)
