"""The landmark, identity and attribute tasks: heads, losses and metrics against numpy, scikit-learn and hand
computations from the definitions, then one tiny training run of all three through the installed `mtl`."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from test_cli import TINY, ok, run_dirs, scalar_tags

from mtl_cli.errors import UserError
from mtl_cli.losses import ArcFaceLoss, LandmarkLoss, MaskedBCEWithLogitsLoss
from mtl_cli.metrics import AttributeMetrics, IdentificationAccuracy, LandmarkNME, VerificationMetrics
from mtl_cli.metrics.faces import roc_auc_and_best_balanced_accuracy
from mtl_cli.models.heads import EmbeddingHead, LandmarkHead


def _t(a, dtype=torch.float32):
    return torch.tensor(np.asarray(a), dtype=dtype)


def _landmark_batches(rng, sizes=(3, 1, 4), k=5):
    """(pred, target) batches [b, k, 2] with some unlabelled (NaN) samples, errors growing per batch."""
    out = []
    for n, b in enumerate(sizes):
        target = rng.uniform(0, 1, size=(b, k, 2))
        pred = target + rng.normal(scale=0.02 + 0.1 * n, size=target.shape)
        target[rng.random(b) < 0.3] = np.nan
        out.append((pred.astype(np.float32), target.astype(np.float32)))
    out[0][1][0] = np.nan  # at least one missing sample
    if len(out) > 2:
        out[2][1][1, 2, 0] = np.nan  # one unknown coordinate: the whole sample is skipped
    return out


# ------------------------------------------------------------------------------------------------- landmarks


@pytest.mark.parametrize("normalizer", ["box_diagonal", [0, 1], "none"])
def test_landmark_nme_matches_numpy_and_skips_missing_samples(normalizer):
    batches = _landmark_batches(np.random.default_rng(0))
    metric = LandmarkNME(normalizer=normalizer)
    per_image = []
    for pred, target in batches:
        metric.update(_t(pred), _t(target))
        for p, t in zip(pred.astype(np.float64), target.astype(np.float64)):
            if np.isnan(t).any():
                continue
            if normalizer == "box_diagonal":
                d = math.hypot(t[:, 0].max() - t[:, 0].min(), t[:, 1].max() - t[:, 1].min())
            elif normalizer == "none":
                d = 1.0
            else:
                d = math.dist(t[0], t[1])
            per_image.append(np.mean([math.dist(a, b) for a, b in zip(p, t)]) / d)
    assert len(per_image) < sum(len(p) for p, _ in batches)  # some were skipped
    assert metric.compute()["nme"].item() == pytest.approx(np.mean(per_image), rel=1e-5)


def test_landmark_nme_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="normalizer"):
        LandmarkNME(normalizer="inter_pupil")
    with pytest.raises(UserError, match="not among"):
        LandmarkNME(normalizer=[0, 7]).update(torch.zeros(2, 5, 2), torch.zeros(2, 5, 2))
    with pytest.raises(UserError, match=r"\[B, K, 2\]"):
        LandmarkNME().update(torch.zeros(2, 5, 2), torch.zeros(2, 4, 2))


@pytest.mark.parametrize("kind", ["smooth_l1", "l1"])
def test_landmark_loss_matches_numpy_and_ignores_missing_samples(kind):
    pred, target = _landmark_batches(np.random.default_rng(1), sizes=(6,))[0]
    beta = 0.05
    labelled = ~np.isnan(target).any(axis=(1, 2))
    diff = np.abs(pred - target)[labelled]
    per_coordinate = np.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta) if kind == "smooth_l1" else diff
    p = _t(pred).requires_grad_()
    loss = LandmarkLoss(kind=kind, beta=beta)(p, _t(target))
    assert loss.item() == pytest.approx(per_coordinate.mean(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(p.grad).all() and (p.grad[~torch.from_numpy(labelled)] == 0).all()
    assert (p.grad[torch.from_numpy(labelled)] != 0).any()


def test_landmark_loss_with_no_labelled_sample_is_a_zero_that_keeps_the_graph():
    p = torch.randn(2, 4, 2, requires_grad=True)
    loss = LandmarkLoss()(p, torch.full((2, 4, 2), float("nan")))
    loss.backward()
    assert loss.item() == 0 and loss.requires_grad and (p.grad == 0).all()
    with pytest.raises(UserError):
        LandmarkLoss(kind="l2")


# -------------------------------------------------------------------------------------------------- identity


def _arcface_by_hand(cosine, labels, s, m, easy_margin=False, ignore_index=-1):
    """Cross-entropy of s * logits where the target logit is cos(theta + m), from the paper's definition."""
    losses = []
    for row, y in zip(cosine.astype(np.float64), labels):
        if y == ignore_index:
            continue
        c = row[y]
        theta = math.acos(c)
        if easy_margin:
            target = math.cos(theta + m) if c > 0 else c
        else:  # the threshold: theta + m must stay within [0, pi]; past it, the linear fallback c - m sin m
            target = math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
        logits = s * row.copy()
        logits[y] = s * target
        losses.append(np.log(np.exp(logits).sum()) - logits[y])
    return np.mean(losses)


@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface_loss_matches_the_definition_including_the_threshold_case(easy_margin):
    s, m = 8.0, 0.5
    # Rows: an easy target, a target at 100 degrees (cos < 0), one past pi - m (cos = -0.95 < cos(pi - 0.5) =
    # -0.878: the threshold case), an ignored row, a target at cos = 1 (sqrt's gradient must stay finite).
    cosine = np.array([[0.9, 0.1, -0.2], [0.3, math.cos(math.radians(100)), 0.5], [0.2, 0.4, -0.95],
                       [0.1, 0.2, 0.3], [1.0, 0.0, -0.5]], np.float32)
    labels = np.array([0, 1, 2, -1, 0])
    cos = _t(cosine).requires_grad_()
    loss = ArcFaceLoss(scale=s, margin=m, easy_margin=easy_margin)({"cosine": cos, "embedding": None},
                                                                     torch.tensor(labels))
    assert loss.item() == pytest.approx(_arcface_by_hand(cosine, labels, s, m, easy_margin), rel=1e-5)
    loss.backward()
    assert torch.isfinite(cos.grad).all() and (cos.grad[3] == 0).all()
    # The margin makes the loss larger than plain softmax cross-entropy of s * cosine.
    keep = labels != -1
    plain = torch.nn.functional.cross_entropy(s * _t(cosine[keep]), torch.tensor(labels[keep]))
    assert loss.item() > plain.item()


def test_arcface_loss_without_a_label_is_zero_and_bad_settings_are_user_errors():
    cos = torch.rand(3, 4, requires_grad=True)
    loss = ArcFaceLoss()(cos, torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0 and (cos.grad == 0).all()
    with pytest.raises(UserError):
        ArcFaceLoss(margin=2.0)
    with pytest.raises(UserError):
        ArcFaceLoss()(torch.rand(3, 4), torch.zeros(2, dtype=torch.long))


def test_identification_accuracy_is_the_argmax_of_cosines_over_labelled_samples():
    metric = IdentificationAccuracy(ignore_index=-1)
    metric.update({"cosine": _t([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7]])}, torch.tensor([0, 1]))  # right, wrong
    metric.update({"cosine": _t([[0.1, 0.8, 0.0], [0.3, 0.2, 0.1], [0.0, 0.0, 0.5]])}, torch.tensor([1, 2, -1]))
    assert metric.compute()["id_acc"].item() == pytest.approx(2 / 4)  # right, wrong, ignored
    with pytest.raises(UserError, match="-3"):
        IdentificationAccuracy().update(_t([[0.1, 0.9]]), torch.tensor([-3]))


# The face datasets label the train split's identities 0..C-1 and every other (unseen) identity C, C+1, ...
SEEN_AND_UNSEEN = np.array([0, 4, 2, -1, 3, 1, 7, 2])  # C = 3 classes: 4, 3 and 7 are unseen, -1 is ignored


def test_arcface_loss_over_seen_and_unseen_identities_is_the_loss_over_the_seen_ones():
    cosine = np.random.default_rng(8).uniform(-1, 1, size=(len(SEEN_AND_UNSEEN), 3)).astype(np.float32)
    seen = (SEEN_AND_UNSEEN >= 0) & (SEEN_AND_UNSEEN < 3)
    cos = _t(cosine).requires_grad_()
    loss = ArcFaceLoss(scale=8.0, margin=0.3)(cos, torch.tensor(SEEN_AND_UNSEEN))
    only_seen = ArcFaceLoss(scale=8.0, margin=0.3)(_t(cosine[seen]), torch.tensor(SEEN_AND_UNSEEN[seen]))
    assert loss.item() == pytest.approx(only_seen.item(), rel=1e-6)
    assert loss.item() == pytest.approx(_arcface_by_hand(cosine[seen], SEEN_AND_UNSEEN[seen], 8.0, 0.3), rel=1e-5)
    loss.backward()
    assert (cos.grad[torch.from_numpy(~seen)] == 0).all() and (cos.grad[torch.from_numpy(seen)] != 0).any()
    unseen_only = ArcFaceLoss()(torch.rand(2, 3, requires_grad=True), torch.tensor([3, 9]))
    assert unseen_only.item() == 0 and unseen_only.requires_grad
    with pytest.raises(UserError, match="-2"):
        ArcFaceLoss()(torch.rand(2, 3), torch.tensor([0, -2]))


def test_identification_accuracy_scores_the_seen_identities_only():
    cosine = _t([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.1, 0.2, 0.1],
                 [0.0, 0.1, 0.9], [0.5, 0.2, 0.1], [0.0, 0.9, 0.1]])
    metric = IdentificationAccuracy(ignore_index=-1)
    metric.update({"cosine": cosine}, torch.tensor(SEEN_AND_UNSEEN))
    # seen rows: 0 (label 0, argmax 0: right), 2 (2, 2: right), 5 (1, 2: wrong), 7 (2, 1: wrong)
    assert metric.compute()["id_acc"].item() == pytest.approx(2 / 4)
    unseen = IdentificationAccuracy()
    unseen.update({"cosine": cosine[:2]}, torch.tensor([3, 5]))
    assert unseen.compute()["id_acc"].isnan()  # a split of unseen people only: verification is the measure


def test_verification_pairs_unseen_identities_like_any_other():
    rng = np.random.default_rng(9)
    embeddings = rng.normal(size=(len(SEEN_AND_UNSEEN), 5))
    embeddings[6] = embeddings[1] + 0.1  # unseen 4 and 7: nearly the same embedding, yet different people
    metric = VerificationMetrics(ignore_index=-1)
    metric.update({"embedding": _t(embeddings)}, torch.tensor(SEEN_AND_UNSEEN))
    out = metric.compute()
    keep = SEEN_AND_UNSEEN != -1
    e = embeddings[keep] / np.linalg.norm(embeddings[keep], axis=1, keepdims=True)
    y = SEEN_AND_UNSEEN[keep]
    i, j = np.triu_indices(len(y), k=1)
    assert out["verif_auc"].item() == pytest.approx(roc_auc_score(y[i] == y[j], (e[i] * e[j]).sum(1)), abs=1e-5)


def _brute_force_best_balanced_accuracy(scores, positive):
    best = 0.5  # threshold +inf: everything negative
    for t in np.unique(scores):
        called = scores >= t
        best = max(best, (called[positive].mean() + (~called[~positive]).mean()) / 2)
    return best


def test_verification_matches_sklearn_auc_and_brute_force_accuracy_over_all_pairs():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=23)
    centres = rng.normal(size=(4, 8))
    embeddings = centres[labels] + rng.normal(scale=1.2, size=(23, 8))
    embeddings[5] = embeddings[2]  # identical embeddings: tied scores
    embeddings[9] = embeddings[2]
    labels[[4, 11]] = -1  # unlabelled: left out of every pair
    metric = VerificationMetrics(ignore_index=-1)
    for lo, hi in ((0, 7), (7, 8), (8, 23)):
        metric.update({"embedding": _t(embeddings[lo:hi])}, torch.tensor(labels[lo:hi]))
    out = metric.compute()

    keep = labels != -1
    e = embeddings[keep] / np.linalg.norm(embeddings[keep], axis=1, keepdims=True)
    y = labels[keep]
    i, j = np.triu_indices(len(y), k=1)
    scores, positive = (e[i] * e[j]).sum(1), y[i] == y[j]
    assert out["verif_auc"].item() == pytest.approx(roc_auc_score(positive, scores), abs=1e-5)
    assert out["verif_acc"].item() == pytest.approx(_brute_force_best_balanced_accuracy(scores, positive), abs=1e-5)


def test_roc_auc_and_balanced_accuracy_with_heavy_ties_match_sklearn_and_brute_force():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=200).astype(np.float64) / 4  # five distinct values: many ties
    positive = rng.random(200) < 0.2 + 0.15 * scores
    auc, acc = roc_auc_and_best_balanced_accuracy(torch.from_numpy(scores), torch.from_numpy(positive))
    assert auc.item() == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert acc.item() == pytest.approx(_brute_force_best_balanced_accuracy(scores, positive), abs=1e-12)


def test_verification_subsamples_a_fixed_set_of_pairs_when_there_are_too_many():
    rng = np.random.default_rng(5)
    embeddings, labels = _t(rng.normal(size=(40, 6))), torch.tensor(rng.integers(0, 3, size=40))
    a, b = VerificationMetrics(max_pairs=100), VerificationMetrics(max_pairs=100)
    a.update({"embedding": embeddings}, labels)
    b.update({"embedding": embeddings}, labels)
    i, j = a.pairs(40)
    assert len(i) == 100 and (i != j).all() and i.max() < 40 and j.max() < 40
    assert all(torch.equal(x, y) for x, y in zip(a.pairs(40), b.pairs(40)))
    assert all(torch.equal(x, y) for x, y in zip(a.compute().values(), b.compute().values()))
    assert len(a.pairs(10)[0]) == 45  # few enough: every pair i < j


def test_metrics_with_nothing_to_score_are_nan():
    for labels in ([1, 1, 1], [0, 1, 2]):
        metric = VerificationMetrics()
        metric.update({"embedding": torch.randn(3, 4)}, torch.tensor(labels))
        assert all(v.isnan() for v in metric.compute().values())
    with warnings.catch_warnings():  # torchmetrics warns that compute ran before update
        warnings.simplefilter("ignore")
        assert all(v.isnan() for v in VerificationMetrics().compute().values())
        assert IdentificationAccuracy().compute()["id_acc"].isnan()
        assert LandmarkNME().compute()["nme"].isnan()
        assert all(v.isnan() for v in AttributeMetrics(num_attributes=3).compute().values())


# ------------------------------------------------------------------------------------------------ attributes


def test_attribute_mean_accuracy_and_f1_match_sklearn_with_unknown_entries_skipped():
    rng = np.random.default_rng(6)
    n, a = 30, 6
    probs = rng.random((n, a)).astype(np.float32)
    target = (rng.random((n, a)) < 0.4).astype(np.float32)
    target[rng.random((n, a)) < 0.25] = -1  # unknown
    probs[:, 4], target[:, 4] = 0.2, np.where(target[:, 4] == -1, -1, 0)  # no positive anywhere: F1 = 0
    target[:, 5] = -1  # never known: left out of both means
    metric = AttributeMetrics(num_attributes=a, ignore_index=-1)
    for lo, hi in ((0, 4), (4, 5), (5, n)):
        metric.update(_t(probs[lo:hi]), _t(target[lo:hi]))
    out = metric.compute()
    accs, f1s = [], []
    for k in range(a - 1):
        known = target[:, k] != -1
        y, p = target[known, k].astype(int), (probs[known, k] > 0.5).astype(int)
        accs.append((y == p).mean())
        f1s.append(f1_score(y, p, zero_division=0))
    assert f1s[4] == 0
    assert out["mean_acc"].item() == pytest.approx(np.mean(accs), rel=1e-6)
    assert out["mean_f1"].item() == pytest.approx(np.mean(f1s), rel=1e-6)
    with pytest.raises(UserError, match="0, 1 or the ignore value"):
        metric.update(_t(probs[:2]), _t(np.full((2, a), 2.0)))


def test_masked_bce_is_bce_over_the_known_entries():
    rng = np.random.default_rng(7)
    logits = _t(rng.normal(size=(5, 4))).requires_grad_()
    target = _t(rng.integers(-1, 2, size=(5, 4)))
    known = target != -1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])
    loss = MaskedBCEWithLogitsLoss(ignore_value=-1)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~known] == 0).all()


# ------------------------------------------------------------------------------------------------------ heads


def test_heads_give_points_and_unit_embeddings_with_cosines_to_their_own_centres():
    features = [torch.randn(3, 8, 16, 16), torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4)]
    points = LandmarkHead([8, 16, 32], [4, 8, 16], num_points=5)(features, (64, 64))
    assert points.shape == (3, 5, 2)
    head = EmbeddingHead([8, 16, 32], [4, 8, 16], num_classes=7, dim=12)
    out = head(features, (64, 64))
    assert out["embedding"].shape == (3, 12) and out["cosine"].shape == (3, 7)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(3), atol=1e-5)
    centres = torch.nn.functional.normalize(head.centres, dim=1)
    assert torch.allclose(out["cosine"], out["embedding"] @ centres.T, atol=1e-6)
    assert any(p is head.centres for p in head.parameters())  # the optimizer trains the centres


# ----------------------------------------------------------------------------------------------- end to end


def test_training_the_three_tasks_with_segmentation_logs_every_metric(mtl_main, tmp_path):
    tasks = ["landmarks", "identity", "attributes", "segmentation"]
    ok(mtl_main("train", f"tasks=[{','.join(tasks)}]", *TINY))  # in tmp_path
    (run_dir,) = run_dirs(tmp_path / "outputs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = {"landmarks": {"nme"}, "identity": {"id_acc", "verif_acc", "verif_auc"},
                "attributes": {"mean_acc", "mean_f1"}, "segmentation": {"miou", "pixel_acc"}}
    final = metrics["final"]["metrics"]
    assert {task: set(values) for task, values in final.items()} == expected
    assert all(math.isfinite(v) for values in final.values() for v in values.values())
    assert metrics["higher_is_better"]["landmarks"] == {"nme": False}
    assert metrics["higher_is_better"]["identity"] == {"id_acc": True, "verif_acc": True, "verif_auc": True}
    tags = scalar_tags(run_dir)
    for task, names in expected.items():
        assert {f"val/{task}/{name}" for name in names} | {f"train/loss/{task}", f"val/loss/{task}"} <= tags


def test_verification_on_listed_pairs_scores_samples_2k_and_2k_plus_1_only():
    """Pairs (0,1) same person, (2,3) different, (4,5) one unknown (skipped); hand scores and AUC."""
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([5, 5, 5, 7, 2, -1])
    metric = VerificationMetrics(pairs="consecutive")
    metric.update({"embedding": e[:3]}, labels[:3])  # pairs may straddle batches
    metric.update({"embedding": e[3:]}, labels[3:])
    result = metric.compute()
    # scores: same pair cos 0.6, different pair cos 0.0: perfectly separated
    assert float(result["verif_auc"]) == 1.0 and float(result["verif_acc"]) == 1.0
    every = VerificationMetrics()  # all pairs of the known samples: (0,2) and (1,2) are same-person pairs too
    every.update({"embedding": e}, labels)
    assert float(every.compute()["verif_auc"]) < 1.0
    swapped = VerificationMetrics(pairs="consecutive")
    swapped.update({"embedding": e[[0, 3, 2, 1]]}, labels[[0, 1, 2, 3]])  # same pair now scores 0, different 0.6
    assert float(swapped.compute()["verif_auc"]) == 0.0
    with pytest.raises(UserError, match="pairs='some'"):
        VerificationMetrics(pairs="some")
