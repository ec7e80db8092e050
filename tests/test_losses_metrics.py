"""Losses and metrics against independent numpy / hand-computed references.

The split-level tests feed several batches of different sizes and compare with numpy over the concatenated
data; each also checks that the mean of per-batch values differs, so a metric that averaged batch averages
would fail.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassAccuracy, MultilabelF1Score
from torchmetrics.utilities import dim_zero_cat

from mtl_cli.errors import UserError
from mtl_cli.losses import MaskedL1Loss, NormalCosineLoss, ScalarL1Loss
from mtl_cli.metrics import DepthMetrics, NormalMetrics, SegmentationMetrics

BATCH_SIZES = (1, 3, 2)


def _t(a, dtype=torch.float32):
    return torch.tensor(a, dtype=dtype)


def _np_unit(v, axis=1):
    return v / np.maximum(np.linalg.norm(v, axis=axis, keepdims=True), 1e-12)


def _np_angles(pred, target):
    """Angles in degrees at the valid pixels of [B,3,H,W] arrays, flattened."""
    cos = np.clip((_np_unit(pred) * _np_unit(target)).sum(1), -1, 1)
    return np.degrees(np.arccos(cos))[np.any(target != 0, axis=1)]


def _normal_batches(rng):
    """Batches whose error level and invalid fraction vary, so batch means differ from the split's."""
    out = []
    for i, b in enumerate(BATCH_SIZES):
        target = rng.normal(size=(b, 3, 4, 5))
        pred = target + rng.normal(scale=0.2 + 1.5 * i, size=target.shape)
        invalid = rng.random((b, 4, 5)) < (0.1 + 0.3 * i)
        target = np.where(invalid[:, None], 0.0, target)
        out.append((pred.astype(np.float32), target.astype(np.float32)))
    return out


# ----------------------------------------------------------------------------------------------- losses


def test_masked_l1_matches_numpy_and_skips_invalid():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(3, 1, 5, 6)).astype(np.float32)
    target = rng.uniform(0.5, 5, size=pred.shape).astype(np.float32)
    target[rng.random(pred.shape) < 0.3] = 0.0
    valid = target != 0
    expected = np.abs(pred - target)[valid].mean()
    loss = MaskedL1Loss()(_t(pred), _t(target))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a different invalid value: zeros now count, -1 does not
    target2 = np.where(valid, target, -1.0).astype(np.float32)
    assert MaskedL1Loss(invalid_value=-1.0)(_t(pred), _t(target2)).item() == pytest.approx(expected, rel=1e-5)


def test_normal_cosine_matches_numpy_and_skips_zero_targets():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    target = _np_unit(rng.normal(size=pred.shape)).astype(np.float32)  # valid targets are unit vectors
    target[:, :, rng.random((4, 5)) < 0.4] = 0.0
    valid = np.any(target != 0, axis=1)
    cos = (_np_unit(pred) * target).sum(1)
    expected = (1 - cos)[valid].mean()
    assert valid.sum() < valid.size  # the zero vectors really are there
    # normalize=True normalises a raw prediction; by default the prediction is taken as already unit
    assert NormalCosineLoss(normalize=True)(_t(pred), _t(target)).item() == pytest.approx(expected, rel=1e-5)
    unit = _np_unit(pred).astype(np.float32)
    assert NormalCosineLoss()(_t(unit), _t(target)).item() == pytest.approx(expected, rel=1e-5)
    raw = ((1 - (pred * target).sum(1))[valid]).mean()
    assert NormalCosineLoss()(_t(pred), _t(target)).item() == pytest.approx(raw, rel=1e-5)


@pytest.mark.parametrize("pred_shape", [(4, 1), (4,)])
def test_scalar_l1_matches_numpy(pred_shape):
    pred = np.array([0.5, 2.0, 3.5, -1.0], dtype=np.float32).reshape(pred_shape)
    target = np.array([1, 2, 5, 0])
    expected = np.abs(pred.reshape(-1) - target).mean()  # (0.5 + 0 + 1.5 + 1) / 4
    assert expected == pytest.approx(0.75)
    loss = ScalarL1Loss()(_t(pred), torch.tensor(target))  # int64 target
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected)


def test_gradients_flow_through_losses_and_not_from_invalid_pixels():
    rng = np.random.default_rng(2)
    depth_t = _t(rng.uniform(1, 2, size=(2, 1, 3, 3)))
    depth_t[0, 0, 0, 0] = 0.0
    normal_t = _t(rng.normal(size=(2, 3, 3, 3)))
    normal_t[1, :, 2, 2] = 0.0
    cases = [
        (MaskedL1Loss(), _t(rng.normal(size=(2, 1, 3, 3))), depth_t, (0, 0, 0, 0)),
        (NormalCosineLoss(), _t(rng.normal(size=(2, 3, 3, 3))), normal_t, (1, slice(None), 2, 2)),
        (ScalarL1Loss(), _t([[0.3], [4.0]]), torch.tensor([1, 2]), None),
    ]
    for loss_fn, pred, target, invalid_at in cases:
        pred.requires_grad_(True)
        loss_fn(pred, target).backward()
        assert torch.isfinite(pred.grad).all()
        if invalid_at is None:
            assert (pred.grad.abs() > 0).all()
        else:
            assert (pred.grad[invalid_at] == 0).all()
            mask = torch.ones_like(pred.grad, dtype=torch.bool)
            mask[invalid_at] = False
            assert pred.grad[mask].abs().sum() > 0


@pytest.mark.parametrize(
    "loss_fn, shape",
    [(MaskedL1Loss(), (2, 1, 3, 3)), (NormalCosineLoss(), (2, 3, 3, 3))],
)
def test_all_invalid_gives_zero_loss_that_keeps_the_graph(loss_fn, shape):
    pred = torch.randn(shape, requires_grad=True)
    loss = loss_fn(pred, torch.zeros(shape))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(shape))


@pytest.mark.parametrize(
    "loss_fn, pred_shape, target_shape",
    [
        (MaskedL1Loss(), (2, 3, 4, 4), (2, 1, 4, 4)),  # a depth head with 3 channels
        (MaskedL1Loss(), (2, 1, 8, 8), (2, 1, 4, 4)),
        (NormalCosineLoss(), (2, 1, 4, 4), (2, 3, 4, 4)),
        (NormalCosineLoss(), (2, 4, 4, 4), (2, 4, 4, 4)),  # same shapes, but not 3 channels
        (ScalarL1Loss(), (2, 5), (2,)),  # a count head with 5 outputs
        (ScalarL1Loss(), (3, 1), (2,)),
    ],
)
def test_shape_mismatch_raises_user_error(loss_fn, pred_shape, target_shape):
    with pytest.raises(UserError, match=r"shape|channels"):
        loss_fn(torch.randn(pred_shape), torch.ones(target_shape))


def test_shape_mismatch_message_names_both_shapes():
    expected = r"depth prediction has shape \[2, 3, 4, 4\] but its target has shape \[2, 1, 4, 4\]"
    with pytest.raises(UserError, match=expected):
        MaskedL1Loss()(torch.randn(2, 3, 4, 4), torch.ones(2, 1, 4, 4))


# ------------------------------------------------------------------------------------------ segmentation


def _np_confmat(target, pred, num_classes, ignore_index):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    keep = target != ignore_index
    np.add.at(cm, (target[keep], pred[keep]), 1)
    return cm


def _np_seg_scores(cm):
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    return (tp[union > 0] / union[union > 0]).mean(), tp.sum() / cm.sum()


def test_segmentation_over_whole_split_matches_numpy_not_mean_of_batches():
    rng = np.random.default_rng(3)
    c, metric = 5, SegmentationMetrics(num_classes=5)
    targets, preds, batch_scores = [], [], []
    for i, b in enumerate(BATCH_SIZES):
        target = rng.integers(0, c, size=(b, 6, 7))
        target[rng.random(target.shape) < 0.2] = 255
        logits = rng.normal(size=(b, c, 6, 7))
        # the first batch is mostly right, later ones mostly noise
        logits += (3.0 / (1 + 3 * i)) * (np.arange(c)[None, :, None, None] == target[:, None])
        metric.update(_t(logits), torch.tensor(target))
        targets.append(target), preds.append(logits.argmax(1))
        batch_scores.append(_np_seg_scores(_np_confmat(target, logits.argmax(1), c, 255)))
    cm = _np_confmat(np.concatenate(targets), np.concatenate(preds), c, 255)
    miou, acc = _np_seg_scores(cm)
    out = metric.compute()
    assert np.array_equal(metric.confmat.numpy(), cm)
    assert out["miou"].item() == pytest.approx(miou, rel=1e-6)
    assert out["pixel_acc"].item() == pytest.approx(acc, rel=1e-6)
    mean_miou, mean_acc = np.mean(batch_scores, axis=0)
    assert abs(mean_miou - miou) > 1e-3 and abs(mean_acc - acc) > 1e-3
    assert out["miou"].item() != pytest.approx(mean_miou, rel=1e-4)
    assert out["pixel_acc"].item() != pytest.approx(mean_acc, rel=1e-4)


def test_miou_excludes_classes_absent_from_prediction_and_target():
    # Pixels (target -> pred): 0->0, 0->1, 1->1, 2->1, and an ignored pixel predicted as class 3.
    target = torch.tensor([[[0, 0, 1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1, 3]]])
    metric = SegmentationMetrics(num_classes=4)
    metric.update(pred, target)
    hand_confmat = [
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],  # class 3: only predicted on the ignored pixel, so absent
    ]
    assert metric.confmat.tolist() == hand_confmat
    # IoU: class 0 = 1/2, class 1 = 1/3, class 2 = 0/1, class 3 has no union -> excluded
    iou = metric.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 2, 1 / 3, 0.0])
    assert math.isnan(iou[3].item())
    out = metric.compute()
    assert out["miou"].item() == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)  # 5/18, not 5/24
    assert out["pixel_acc"].item() == pytest.approx(2 / 4)


def test_segmentation_accepts_logits_probabilities_and_labels():
    rng = np.random.default_rng(4)
    logits = _t(rng.normal(size=(2, 4, 5, 5)))
    target = torch.tensor(rng.integers(0, 4, size=(2, 5, 5)))
    results = []
    for preds in (logits, logits.softmax(dim=1), logits.argmax(dim=1)):
        metric = SegmentationMetrics(num_classes=4, ignore_index=None)
        metric.update(preds, target)
        results.append((metric.confmat.clone(), metric.compute()["miou"]))
    expected = _np_confmat(target.numpy(), logits.argmax(1).numpy(), 4, ignore_index=-12345)
    for confmat, miou in results:
        assert np.array_equal(confmat.numpy(), expected)
        assert miou.item() == pytest.approx(_np_seg_scores(expected)[0], rel=1e-6)


def test_segmentation_rejects_bad_shapes_and_labels():
    metric = SegmentationMetrics(num_classes=4)
    with pytest.raises(UserError, match="channels"):
        metric.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(UserError, match="shape"):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(UserError, match="outside"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


# ------------------------------------------------------------------------------------------------ depth


def test_depth_over_whole_split_matches_numpy_not_mean_of_batches():
    rng = np.random.default_rng(5)
    metric = DepthMetrics()
    preds, targets, batch_scores = [], [], []
    for i, b in enumerate(BATCH_SIZES):
        target = rng.uniform(0.5, 10, size=(b, 1, 4, 6)).astype(np.float32)
        target[rng.random(target.shape) < 0.1 + 0.3 * i] = 0.0
        pred = (target + rng.normal(scale=0.1 + 2 * i, size=target.shape)).astype(np.float32)
        metric.update(_t(pred), _t(target))
        preds.append(pred), targets.append(target)
        v = target != 0
        err = np.abs(pred - target)[v]
        batch_scores.append((err.mean(), (err / target[v]).mean()))
    pred, target = np.concatenate(preds), np.concatenate(targets)
    v = target != 0
    err = np.abs(pred.astype(np.float64) - target)[v]
    abs_err, rel_err = err.mean(), (err / target[v]).mean()
    out = metric.compute()
    assert out["abs_err"].item() == pytest.approx(abs_err, rel=1e-5)
    assert out["rel_err"].item() == pytest.approx(rel_err, rel=1e-5)
    mean_abs, mean_rel = np.mean(batch_scores, axis=0)
    assert abs(mean_abs - abs_err) > 1e-2 and abs(mean_rel - rel_err) > 1e-2
    assert out["abs_err"].item() != pytest.approx(mean_abs, rel=1e-3)
    assert out["rel_err"].item() != pytest.approx(mean_rel, rel=1e-3)


def test_depth_hand_example_with_custom_invalid_value():
    metric = DepthMetrics(invalid_value=-1.0)
    # valid pixels (pred, target): (1, 2), (3, 2), (0, 4); (5, -1) is invalid
    metric.update(_t([[[[1.0, 3.0]]]]), _t([[[[2.0, 2.0]]]]))
    metric.update(_t([[[[0.0, 5.0]]]]), _t([[[[4.0, -1.0]]]]))
    out = metric.compute()
    assert out["abs_err"].item() == pytest.approx((1 + 1 + 4) / 3)
    assert out["rel_err"].item() == pytest.approx((0.5 + 0.5 + 1.0) / 3)


# ---------------------------------------------------------------------------------------------- normals


def test_normals_over_whole_split_match_numpy_not_mean_of_batches():
    rng = np.random.default_rng(6)
    metric = NormalMetrics()
    all_angles, batch_scores = [], []
    for pred, target in _normal_batches(rng):
        metric.update(_t(pred), _t(target))
        a = _np_angles(pred.astype(np.float64), target.astype(np.float64))
        all_angles.append(a)
        batch_scores.append((a.mean(), np.median(a), 100 * (a < 22.5).mean()))
    a = np.concatenate(all_angles)
    expected = {
        "mean_angle": a.mean(),
        "median_angle": np.median(a),
        "within_11.25": 100 * (a < 11.25).mean(),
        "within_22.5": 100 * (a < 22.5).mean(),
        "within_30": 100 * (a < 30).mean(),
    }
    out = metric.compute()
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-4, abs=1e-3), name
    for (name, batch_mean) in zip(("mean_angle", "median_angle", "within_22.5"), np.mean(batch_scores, axis=0)):
        assert abs(batch_mean - expected[name]) > 0.5, name  # the two really differ here
        assert out[name].item() != pytest.approx(batch_mean, rel=1e-3), name


def _vectors_at_angles(degrees):
    """Predictions at the given angles from the target (0, 0, 1), as [1, 3, 1, N] tensors."""
    r = np.radians(degrees)
    pred = np.stack([np.sin(r), np.zeros_like(r), np.cos(r)])[None, :, None, :]
    target = np.broadcast_to(np.array([0.0, 0.0, 1.0])[None, :, None, None], pred.shape)
    return _t(pred), _t(target.copy())


def test_normal_median_is_the_true_median_with_an_even_count():
    metric = NormalMetrics()
    pred, target = _vectors_at_angles([20.0, 0.0])
    metric.update(pred, target)
    pred, target = _vectors_at_angles([90.0, 10.0, 170.0])
    target[0, :, 0, 2] = 0.0  # the 170-degree pixel is invalid
    metric.update(2.5 * pred, 0.5 * target)  # magnitudes must not matter
    out = metric.compute()
    # valid angles: 0, 10, 20, 90 -> median (10 + 20) / 2 = 15 (torch.median would say 10)
    assert out["median_angle"].item() == pytest.approx(15.0, abs=1e-3)
    assert out["mean_angle"].item() == pytest.approx(30.0, abs=1e-3)
    assert out["within_11.25"].item() == pytest.approx(50.0)
    assert out["within_22.5"].item() == pytest.approx(75.0)
    assert out["within_30"].item() == pytest.approx(75.0)
    # an odd count: add 30.5 degrees -> median 20; "within" is strict and 30.5 is not within 30
    metric.update(*_vectors_at_angles([30.5]))
    out = metric.compute()
    assert out["median_angle"].item() == pytest.approx(20.0, abs=1e-3)
    assert out["within_30"].item() == pytest.approx(60.0)


# --------------------------------------------------------------------------------------- common to all


def _metric_with_only_invalid(kind):
    if kind == "seg":
        m = SegmentationMetrics(num_classes=3)
        m.update(torch.randn(2, 3, 2, 2), torch.full((2, 2, 2), 255))
    elif kind == "depth":
        m = DepthMetrics()
        m.update(torch.rand(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    else:
        m = NormalMetrics()
        m.update(torch.randn(2, 3, 2, 2), torch.zeros(2, 3, 2, 2))
    return m


@pytest.mark.parametrize("kind", ["seg", "depth", "normal"])
def test_empty_metrics_give_nan(kind):
    m = _metric_with_only_invalid(kind)
    out = m.compute()
    assert set(out) == set(type(m).higher_is_better)
    assert all(v.dim() == 0 and torch.isnan(v) for v in out.values()), out
    # never updated at all: NaN too (torchmetrics warns that compute ran before update)
    m.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = m.compute()
    assert all(torch.isnan(v) for v in out.values()), out


def test_directions_cover_returned_keys():
    rng = np.random.default_rng(7)
    seg = SegmentationMetrics(num_classes=3)
    seg.update(torch.randn(1, 3, 2, 2), torch.tensor(rng.integers(0, 3, size=(1, 2, 2))))
    depth = DepthMetrics()
    depth.update(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2) + 0.1)
    normal = NormalMetrics()
    normal.update(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))
    for m in (seg, depth, normal):
        out = m.compute()
        assert set(out) == set(m.higher_is_better), type(m).__name__
        assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
        assert type(m).full_state_update is False
    assert SegmentationMetrics.higher_is_better == {"miou": True, "pixel_acc": True}
    assert DepthMetrics.higher_is_better == {"abs_err": False, "rel_err": False}
    assert NormalMetrics.higher_is_better == {
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }


@pytest.mark.parametrize(
    "metric, pred_shape, target_shape",
    [
        (DepthMetrics(), (1, 2, 3, 3), (1, 1, 3, 3)),
        (NormalMetrics(), (1, 3, 2, 2), (1, 3, 4, 4)),
        (NormalMetrics(), (1, 2, 2, 2), (1, 2, 2, 2)),
    ],
)
def test_metric_shape_mismatch_raises_user_error(metric, pred_shape, target_shape):
    with pytest.raises(UserError):
        metric.update(torch.randn(pred_shape), torch.ones(target_shape))


def _pretend_two_ranks(rank0, rank1):
    """Make ``rank0.compute()`` run torchmetrics' distributed sync with a fake all-gather returning [rank0, rank1].

    torchmetrics gathers one tensor per state, in ``_reductions`` order (list states are concatenated first).
    """
    states = (getattr(rank1, name) for name in rank1._reductions)
    others = iter([dim_zero_cat(s) if isinstance(s, list) else s for s in states])
    rank0.dist_sync_fn = lambda t, group=None: [t, next(others)]
    rank0.distributed_available_fn = lambda: True


@pytest.mark.parametrize("kind", ["seg", "depth", "normal"])
def test_distributed_reduction_equals_one_process_over_all_data(kind):
    rng = np.random.default_rng(9)
    if kind == "seg":
        make = lambda: SegmentationMetrics(num_classes=4)
        batches = [(_t(rng.normal(size=(b, 4, 3, 3))), torch.tensor(rng.integers(0, 4, size=(b, 3, 3))))
                   for b in (1, 3)]
    elif kind == "depth":
        make = DepthMetrics
        batches = [(_t(rng.normal(size=(b, 1, 3, 3))), _t(rng.uniform(0.5, 2, size=(b, 1, 3, 3)))) for b in (1, 3)]
    else:
        make = NormalMetrics
        batches = [(_t(p), _t(t)) for p, t in _normal_batches(rng)[:2]]
    whole, rank0, rank1 = make(), make(), make()
    for b in batches:
        whole.update(*b)
    rank0.update(*batches[0])
    rank1.update(*batches[1])
    _pretend_two_ranks(rank0, rank1)
    expected, out = whole.compute(), rank0.compute()
    assert set(out) == set(expected)
    for name in expected:
        assert out[name].shape == () and out[name].item() == pytest.approx(expected[name].item(), rel=1e-5), name


# ---------------------------------------------------------------------------- torchmetrics built-ins


def test_torchmetrics_builtins_match_numpy():
    rng = np.random.default_rng(8)
    # MulticlassAccuracy(average="micro", ignore_index=-1): correct / non-ignored samples, over two batches
    acc = MulticlassAccuracy(num_classes=10, average="micro", ignore_index=-1)
    ys, ps = [], []
    for b in (7, 5):
        logits = rng.normal(size=(b, 10)).astype(np.float32)
        y = rng.integers(0, 10, size=b)
        y[: b // 2] = logits[: b // 2].argmax(1)  # some right answers
        y[-2:] = -1
        acc.update(_t(logits), torch.tensor(y))
        ys.append(y), ps.append(logits.argmax(1))
    y, p = np.concatenate(ys), np.concatenate(ps)
    keep = y != -1
    assert acc.compute().item() == pytest.approx((p[keep] == y[keep]).mean())

    # MultilabelF1Score(average="macro") on probabilities, threshold 0.5.  Label 9 has no positive target and
    # no positive prediction: torchmetrics (checked on 1.9) scores it F1 = 0 and keeps it in the macro average
    # (for multilabel only; multiclass macro drops such classes), exactly the numpy convention below.
    probs = rng.random((12, 10)).astype(np.float32)
    labels = (rng.random((12, 10)) < 0.4).astype(np.int64)
    probs[:, 9], labels[:, 9] = 0.1, 0
    hard = probs > 0.5
    tp = (hard & (labels == 1)).sum(0)
    fp = (hard & (labels == 0)).sum(0)
    fn = (~hard & (labels == 1)).sum(0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    assert denom[9] == 0 and f1[:9].mean() != pytest.approx(f1.mean())  # dropping label 9 would differ
    f1_metric = MultilabelF1Score(num_labels=10, average="macro")
    assert f1_metric(_t(probs), torch.tensor(labels)).item() == pytest.approx(f1.mean(), rel=1e-6)

    # MeanAbsoluteError over two batches of different sizes: over all samples, not the mean of batch means
    mae = MeanAbsoluteError()
    a_p, a_t, b_p, b_t = rng.normal(size=3), rng.normal(size=3), rng.normal(size=9) * 5, rng.normal(size=9)
    mae.update(_t(a_p), _t(a_t))
    mae.update(_t(b_p), _t(b_t))
    expected = np.abs(np.concatenate([a_p - a_t, b_p - b_t])).mean()
    assert mae.compute().item() == pytest.approx(expected, rel=1e-5)


def test_mean_count_is_the_number_of_terms_each_loss_averages():
    """loss * mean_count = the sum of the loss's terms, computed here with reduction="none" or by hand, so that a
    mean over several batches or processes weighted by the counts is the mean over all their terms."""
    from torch import nn
    from torch.nn import functional as F

    from mtl_cli.losses import (ArcFaceLoss, LandmarkLoss, MaskedBCEWithLogitsLoss, MaskedL1Loss, NormalCosineLoss,
                                ScalarL1Loss, mean_count)

    g = torch.Generator().manual_seed(0)
    depth, target = torch.rand(2, 1, 4, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g) + 0.1
    target[0, 0, 0, :3] = 0
    logits, labels = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)
    labels[0, 0] = 255
    weight = torch.tensor([1.0, 2.0, 5.0])
    normals = F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    normals_target = F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    normals_target[1, :, 2] = 0
    attributes, known = torch.randn(3, 5, generator=g), torch.randint(-1, 2, (3, 5), generator=g).float()
    points, point_targets = torch.rand(3, 4, 2, generator=g), torch.rand(3, 4, 2, generator=g)
    point_targets[1, 0, 0] = float("nan")
    cosines, identities = torch.rand(4, 6, generator=g) * 2 - 1, torch.tensor([0, 5, -1, 9])
    cases = [
        (MaskedL1Loss(0.0), depth, target, 29, ((depth - target).abs() * (target != 0)).sum()),
        (nn.CrossEntropyLoss(ignore_index=255), logits, labels, 28,
         F.cross_entropy(logits, labels, ignore_index=255, reduction="sum")),
        (nn.CrossEntropyLoss(weight=weight, ignore_index=255), logits, labels, None,
         F.cross_entropy(logits, labels, weight=weight, ignore_index=255, reduction="sum")),
        (NormalCosineLoss(), normals, normals_target, 28,
         ((1 - (normals * normals_target).sum(1)) * (normals_target != 0).any(1)).sum()),
        (MaskedBCEWithLogitsLoss(-1), attributes, known, int((known != -1).sum()),
         (F.binary_cross_entropy_with_logits(attributes, known.clamp(min=0), reduction="none") * (known != -1)).sum()),
        (nn.BCEWithLogitsLoss(), attributes, known.clamp(min=0), 15,
         F.binary_cross_entropy_with_logits(attributes, known.clamp(min=0), reduction="sum")),
        (LandmarkLoss("l1"), points, point_targets, 16, (points - point_targets).abs()[[0, 2]].sum()),
        (ScalarL1Loss(), torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 3, 1]), 3, torch.tensor(4.0)),
        (ArcFaceLoss(ignore_index=-1), cosines, identities, 2, None),  # labels 0 and 5 (9 is unseen, -1 ignored)
    ]
    for loss, pred, tgt, expected, total in cases:
        count = float(mean_count(loss, pred, tgt))
        if expected is not None:
            assert count == expected, type(loss).__name__
        if total is not None:
            torch.testing.assert_close(loss(pred, tgt) * count, total.float(), msg=type(loss).__name__)
