"""Metrics of the face tasks, kept generic: landmarks, identity (identification and verification), attributes.

Like every metric here they accumulate over the whole split and compute once at the end; ``compute()`` returns
a dict ``name -> 0-dim float tensor``, and ``higher_is_better`` gives the direction of every name. With nothing
to score (no update, or nothing labelled) the values are NaN rather than an error.

Missing labels: a landmark target with any non-finite coordinate (NaN marks a missing sample); an identity
label equal to ``ignore_index``; an attribute entry equal to ``ignore_index`` (-1: unknown). Identity labels
``>= num_classes`` are people unseen in training: identification skips them, verification pairs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from mtl_cli.errors import UserError
from mtl_cli.ops import unit_vectors

_NAN = float("nan")


def _known(target: Tensor, ignore_index: int | None) -> Tensor:
    """Where the target is labelled (not ``ignore_index``)."""
    return target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)


def _part(preds: Tensor | Mapping[str, Tensor], key: str) -> Tensor:
    """One entry of an EmbeddingHead's dict output (or the tensor itself), detached, in float32."""
    return (preds[key] if isinstance(preds, Mapping) else preds).detach().float()


class LandmarkNME(Metric):
    """Normalised mean error of K landmarks: per image, the mean Euclidean distance between predicted and target
    points divided by the image's normaliser; then the mean over the labelled images of the split.

    ``update(preds, target)`` with both ``[B, K, 2]`` (x, y). ``normalizer``:

    - ``"box_diagonal"``: the diagonal of the target points' bounding box;
    - ``[i, j]``: the distance between target points i and j; inter-ocular when they are the eyes (CelebA's
      5 landmarks: ``[0, 1]``; 300W's 68: the outer eye corners ``[36, 45]``);
    - ``"none"``: 1, the mean error in the coordinates' own units.

    The result is a fraction (papers often print it in percent). A zero normaliser gives an infinite NME: the
    target points all coincide, an error of the data worth seeing.
    """

    higher_is_better = {"nme": False}
    is_differentiable = False
    full_state_update = False

    def __init__(self, normalizer: str | Sequence[int] = "box_diagonal", **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(normalizer, str):
            ok = normalizer in ("box_diagonal", "none")
        else:
            normalizer = list(normalizer)
            ok = len(normalizer) == 2 and all(isinstance(i, int) and i >= 0 for i in normalizer)
        if not ok:
            raise UserError(f"landmark NME: normalizer must be box_diagonal, none, or two point indices [i, j] "
                            f"(inter-ocular: the eyes), got {normalizer!r}")
        self.normalizer = normalizer
        self.add_state("nme_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _normalizers(self, target: Tensor) -> Tensor:
        if self.normalizer == "none":
            return torch.ones(len(target), dtype=target.dtype, device=target.device)
        if self.normalizer == "box_diagonal":
            return (target.amax(1) - target.amin(1)).norm(dim=-1)
        i, j = self.normalizer
        return (target[:, i] - target[:, j]).norm(dim=-1)

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape or preds.dim() != 3 or preds.shape[-1] != 2:
            raise UserError(f"landmark prediction has shape {list(preds.shape)} and target {list(target.shape)}; "
                            "expected both [B, K, 2]")
        k = target.shape[1]
        if not isinstance(self.normalizer, str) and max(self.normalizer) >= k:
            raise UserError(f"landmark NME: normalizer points {self.normalizer} are not among the target's {k} points")
        labelled = target.isfinite().flatten(1).all(1)
        p, t = preds.detach()[labelled].double(), target[labelled].double()
        error = (p - t).norm(dim=-1).mean(1)
        self.nme_sum += (error / self._normalizers(t)).sum()
        self.count += labelled.sum()

    def compute(self) -> dict[str, Tensor]:
        return {"nme": (self.nme_sum / self.count).float()}  # 0 / 0 gives NaN on an empty split


class IdentificationAccuracy(Metric):
    """Closed-set identification: the fraction of labelled samples whose most similar class centre (argmax of the
    head's ``"cosine"`` ``[B, C]``) is their identity.

    Only the identities among the training classes are scored: labels ``>= C`` are identities unseen in
    training (the face datasets give the val/test identities, disjoint from train's on CelebA and LFW, the
    labels C, C+1, ...) and are skipped, so on such a split the value is NaN and :class:`VerificationMetrics`
    is the measure. A negative label other than ``ignore_index`` is an error.
    """

    higher_is_better = {"id_acc": True}
    is_differentiable = False
    full_state_update = False

    def __init__(self, ignore_index: int | None = -1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor | Mapping[str, Tensor], target: Tensor) -> None:
        cosine = _part(preds, "cosine")
        if cosine.dim() != 2 or target.shape != cosine.shape[:1]:
            raise UserError(f"identity cosines have shape {list(cosine.shape)} and labels {list(target.shape)}; "
                            "expected [B, num_classes] and [B]")
        keep = _known(target, self.ignore_index)
        if (keep & (target < 0)).any():
            raise UserError(f"identification accuracy: identity labels must be class indices >= 0 or the ignore "
                            f"value {self.ignore_index}, got {sorted(set(target[keep & (target < 0)].tolist()))[:5]}")
        keep &= target < cosine.shape[1]  # labels >= C: identities unseen in training, left to verification
        labels, cosine = target[keep], cosine[keep]
        self.correct += (cosine.argmax(1) == labels).sum()
        self.count += labels.numel()

    def compute(self) -> dict[str, Tensor]:
        return {"id_acc": (self.correct.double() / self.count).float()}


class VerificationMetrics(Metric):
    """Face verification on pairs of the split's embeddings: is this the same identity?

    With ``pairs="consecutive"`` the split is a list of pairs (LFW's pairsDevTest.txt): samples 2k and 2k+1,
    in the order of the split, are pair k, and only those are scored. Otherwise (``"all"``) the pairs are
    every pair i < j of labelled samples when there are at most ``max_pairs`` of them, else
    ``max_pairs`` pairs drawn uniformly (with replacement, i != j) by a generator seeded with ``seed``: the same
    pairs for the same split. A pair's score is the cosine similarity of its two embeddings (the head's
    ``"embedding"`` ``[B, D]``); it is positive when both have the same identity.

    ``verif_auc``: the area under the ROC curve of the score (ties handled as scikit-learn's roc_auc_score does).
    ``verif_acc``: the best balanced accuracy, (true-positive rate + true-negative rate) / 2, over every
    threshold: what plain accuracy is on a set with as many positive as negative pairs, as LFW's (plain
    accuracy over all pairs would be ~90% for any model on 10 identities). The threshold is chosen on the same
    pairs, not by LFW's 10-fold protocol, so it is optimistic by a little. Both NaN without both kinds of pair.
    """

    higher_is_better = {"verif_acc": True, "verif_auc": True}
    is_differentiable = False
    full_state_update = False

    def __init__(self, ignore_index: int | None = -1, max_pairs: int = 1_000_000, seed: int = 0,
                 pairs: str = "all", **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(max_pairs, int) or max_pairs < 1:
            raise UserError(f"verification: max_pairs must be a positive integer, got {max_pairs!r}")
        if pairs not in ("all", "consecutive"):
            raise UserError(f"verification: pairs={pairs!r} is not one of all (every pair of the split), consecutive "
                            "(samples 2k and 2k+1 are pair k, as in a split made of a list of pairs: LFW's)")
        self.ignore_index, self.max_pairs, self.seed, self.mode = ignore_index, max_pairs, seed, pairs
        self.add_state("embeddings", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor | Mapping[str, Tensor], target: Tensor) -> None:
        embedding = _part(preds, "embedding")
        if embedding.dim() != 2 or target.shape != embedding.shape[:1]:
            raise UserError(f"identity embeddings have shape {list(embedding.shape)} and labels "
                            f"{list(target.shape)}; expected [B, D] and [B]")
        keep = _known(target, self.ignore_index)
        if self.mode == "consecutive":  # the order makes the pairs: drop nothing here (unknown pairs go later)
            keep = torch.ones_like(keep)
        self.embeddings.append(unit_vectors(embedding[keep]))
        self.labels.append(target[keep].long())

    def pairs(self, n: int) -> tuple[Tensor, Tensor]:
        """The indices (i, j) of the pairs scored among ``n`` samples."""
        if self.mode == "consecutive":
            i = torch.arange(0, n - 1, 2)
            return i, i + 1
        if n * (n - 1) // 2 <= self.max_pairs:
            i, j = torch.triu_indices(n, n, offset=1)
            return i, j
        generator = torch.Generator().manual_seed(self.seed)
        i = torch.randint(n, (self.max_pairs,), generator=generator)
        j = torch.randint(n - 1, (self.max_pairs,), generator=generator)
        return i, j + (j >= i)

    def compute(self) -> dict[str, Tensor]:
        nan = {name: torch.tensor(_NAN, device=self.device) for name in self.higher_is_better}
        if not len(self.embeddings):
            return nan
        embeddings, labels = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels)
        i, j = (index.to(embeddings.device) for index in self.pairs(len(labels)))
        if self.mode == "consecutive":  # a pair with an unknown identity cannot be scored
            known = _known(labels[i], self.ignore_index) & _known(labels[j], self.ignore_index)
            i, j = i[known], j[known]
        chunk = 1 << 16  # bounds the [pairs, D] gather
        scores = torch.cat([(embeddings[i[k:k + chunk]] * embeddings[j[k:k + chunk]]).sum(1)
                            for k in range(0, len(i), chunk)]) if len(i) else embeddings.new_zeros(0)
        same = labels[i] == labels[j]
        if same.all() or not same.any():
            return nan
        auc, acc = roc_auc_and_best_balanced_accuracy(scores, same)
        return {"verif_acc": acc.float(), "verif_auc": auc.float()}


def roc_auc_and_best_balanced_accuracy(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """ROC AUC of ``scores`` for the boolean labels ``positive``, and the best (TPR + TNR) / 2 over thresholds.

    A threshold t calls "positive" every score >= t; t runs over every distinct score, and +inf (all negative).
    Both come from one sort: the ROC curve's points are the true- and false-positive counts at each distinct
    score, and the AUC is the trapezoidal area under them (which counts a tie as half right). Both need at least
    one positive and one negative.
    """
    order = scores.argsort(descending=True)
    ranked, pos = scores[order], positive[order].double()
    tp, fp = pos.cumsum(0), (1 - pos).cumsum(0)
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]
    tpr = torch.cat([tp.new_zeros(1), tp[last_of_tie] / tp[-1]])
    fpr = torch.cat([fp.new_zeros(1), fp[last_of_tie] / fp[-1]])
    return torch.trapezoid(tpr, fpr), ((tpr + 1 - fpr) / 2).max()


class AttributeMetrics(Metric):
    """Many binary attributes per image: the mean over attributes of each one's accuracy and of its F1.

    ``update(preds, target)`` with both ``[B, A]``: ``preds`` are probabilities (an attribute is predicted
    present where its probability is > ``threshold``), ``target`` 0 (absent), 1 (present) or ``ignore_index``
    (unknown: skipped). Each attribute's counts accumulate over the split; its F1 is 2TP / (2TP + FP + FN),
    0 when it has no positive target and no positive prediction (scikit-learn's and torchmetrics' convention).
    An attribute without any known entry is left out of both means.
    """

    higher_is_better = {"mean_acc": True, "mean_f1": True}
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_attributes: int, ignore_index: int | None = -1, threshold: float = 0.5,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_attributes, self.ignore_index, self.threshold = num_attributes, ignore_index, threshold
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, torch.zeros(num_attributes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape or preds.dim() != 2 or preds.shape[1] != self.num_attributes:
            raise UserError(f"attribute prediction has shape {list(preds.shape)} and target {list(target.shape)}; "
                            f"expected both [B, {self.num_attributes}]")
        known = _known(target, self.ignore_index)
        if not ((target == 0) | (target == 1) | ~known).all():
            raise UserError(f"attribute targets must be 0, 1 or the ignore value {self.ignore_index}, got values "
                            f"{sorted(set(target[known].unique().tolist()) - {0, 1})[:5]}")
        present, absent, predicted = (target == 1) & known, (target == 0) & known, preds.detach() > self.threshold
        self.tp += (present & predicted).sum(0)
        self.fp += (absent & predicted).sum(0)
        self.fn += (present & ~predicted).sum(0)
        self.tn += (absent & ~predicted).sum(0)

    def compute(self) -> dict[str, Tensor]:
        tp, fp, fn, tn = (s.double() for s in (self.tp, self.fp, self.fn, self.tn))
        known = tp + fp + fn + tn > 0
        if not known.any():
            return {name: torch.tensor(_NAN, device=self.device) for name in self.higher_is_better}
        accuracy = (tp + tn) / (tp + fp + fn + tn).clamp(min=1)
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)  # 0 where the denominator is 0
        return {"mean_acc": accuracy[known].mean().float(), "mean_f1": f1[known].mean().float()}
