"""A task: a name, the batch key of its target, a head, a loss and metrics, all declared in configs/tasks/."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torchmetrics import Metric

from mtl_cli.data.checks import LabelRange
from mtl_cli.data.collate import PRESENT
from mtl_cli.errors import UserError


# Entries of a head's dict output that describe the whole batch (the detection head's anchor points), not a sample.
BATCH_ENTRIES = frozenset({"points", "strides", "image_size"})


def take(output, mask: torch.Tensor):
    """The rows of `mask` of a head's output: a tensor [B, ...], or a dict or list of them."""
    if isinstance(output, torch.Tensor):
        return output[mask]
    if isinstance(output, Mapping):
        return {key: value if key in BATCH_ENTRIES else take(value, mask) for key, value in output.items()}
    return [value for value, keep in zip(output, mask.tolist()) if keep]


class Task:
    """Everything the loop needs to know about one task.

    target:    the batch key of the target, or a mapping name -> batch key for a target made of several entries
               (detection: {boxes: boxes, labels: labels}); the loss and metrics then get a dict of them.
    head:      builds the task's head from the backbone's channels and strides (a partial from the config).
    loss:      loss(output, target) -> scalar.
    metrics:   name -> torchmetrics Metric, fed decode(output) and the target; each returns a scalar or a dict of
               scalars, and states its direction (`higher_is_better`, a bool or a dict for dict-valued metrics).
               These are templates: every evaluation scores with fresh copies of them (engine/batches.py Scores).
    decode:    turns the head's raw output into what the metrics take (e.g. sigmoid); identity if None.
    visualize: turns outputs or targets of a few images into RGB images [N,3,H,W] for TensorBoard, if given.
    num_classes, ignore_index: the class facts, against which the data's labels are checked (data/checks.py).
    unseen_labels: labels from num_classes up are classes unseen in training (the face datasets' other identities),
               which the loss and metrics skip: accepted outside the train split.
    writer:    builds the writer of `mtl predict`'s files for the task (a partial from the config, called with the
               task's name, the output folder, class names and decode: inference/writers.py), if given.
    explain:   chooses the scalar `mtl explain` attributes, from the raw output at one image (a partial from the
               config: analysis/targets.py), if given.
    """

    def __init__(self, name: str, target: str | Mapping[str, str], head: Callable[..., nn.Module], loss: nn.Module,
                 metrics: Mapping[str, Metric], decode: Callable | None = None, visualize: Callable | None = None,
                 num_classes: int | None = None, ignore_index: int | None = None, unseen_labels: bool = False,
                 writer: Callable | None = None, explain: Callable | None = None):
        self.name, self.head, self.loss = name, head, loss
        self.target = target if isinstance(target, str) else dict(target)
        self.metrics = nn.ModuleDict(dict(metrics))
        self.decode, self.visualize = decode, visualize
        self.num_classes, self.ignore_index, self.unseen_labels = num_classes, ignore_index, bool(unseen_labels)
        self.writer, self.explain = writer, explain

    @property
    def keys(self) -> list[str]:
        """The batch keys the target is read from."""
        return [self.target] if isinstance(self.target, str) else list(self.target.values())

    def has_target(self, batch: Mapping) -> bool:
        """Whether some sample of `batch` has the task's target (a batch from another dataset has none)."""
        return all(key in batch for key in self.keys)

    def present(self, batch: Mapping) -> torch.Tensor | None:
        """Which samples of `batch` have the target (bool [B]), or None when all of them have it."""
        return batch.get(PRESENT + self.keys[0])

    def select(self, output, batch: Mapping):
        """(the output of the samples that have the target, the target): a loss or metric over them equals the
        loss or metric over a batch without the others."""
        mask = self.present(batch)
        return (output if mask is None else take(output, mask)), self.target_of(batch)

    def target_of(self, batch: Mapping):
        """The task's target in `batch`: one entry, or a dict of entries for a several-part target."""
        if isinstance(self.target, str):
            return batch[self.target]
        return {name: batch[key] for name, key in self.target.items()}

    def to(self, device: torch.device) -> Task:
        self.metrics.to(device)
        return self

    def directions(self) -> dict[str, bool]:
        """Metric name -> whether higher is better."""
        directions = {}
        for name, metric in self.metrics.items():
            higher = metric.higher_is_better
            directions.update(higher if isinstance(higher, Mapping) else {name: bool(higher)})
        return directions

    def check_targets(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Fails with a clear message when the data's labels do not fit the task's class count."""
        target = batch[self.keys[-1]]  # the labels (last) of a several-part target
        if self.num_classes is None or not isinstance(target, torch.Tensor) or target.is_floating_point():
            return
        labels = LabelRange(self.name, self.num_classes, self.ignore_index, self.unseen_labels)
        problem = labels.problem(target, "train", f"the data's {self.target!r} targets")
        if problem:
            raise UserError(problem)
