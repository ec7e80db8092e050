"""Every sample of every split is checked as it is read: its image is finite, and each task's labels fit the task's
class count (or are its ignore value). One bad pixel of one validation image then stops the run with a message
naming the split, the sample (its file, where the dataset's `describe(index, key)` names it) and the valid range,
instead of a crash in the loss or NaN checkpoints. The checks are a min/max per image and per target (a second
pass only where the ignore value lies apart from the classes, as 255 does): cheap next to reading the files."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, get_worker_info

from mtl_cli.data.collate import PRESENT
from mtl_cli.errors import UserError


class SampleError(UserError):
    """A user error met while reading a sample. Its message survives a DataLoader worker process: torch re-raises
    a worker's exception in the main process as `type(e)("Caught ... Original Traceback ...<type>: <message>")`,
    which this constructor cuts back to <message>."""

    def __init__(self, message: str):
        marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message[message.rindex(marker) + len(marker):].rstrip("\n")
        super().__init__(message)


@dataclass(frozen=True)
class LabelRange:
    """The labels task `task` accepts: 0..num_classes-1, or ignore_index. With `unseen`, labels from num_classes
    up are classes unseen in training (the face datasets' other identities), accepted outside the train split."""

    task: str
    num_classes: int
    ignore_index: int | None = None
    unseen: bool = False

    def problem(self, labels: torch.Tensor, split: str, holder: str) -> str | None:
        """What is wrong with the integer `labels` that `holder` ("the sample") holds, or None."""
        top = None if self.unseen and split != "train" else self.num_classes
        if fits(labels, top, self.ignore_index):
            return None
        if self.ignore_index is not None:
            labels = labels[labels != self.ignore_index]
        low, high = (int(v) for v in labels.aminmax())
        ignored = f" (or {self.ignore_index}, ignored)" if self.ignore_index is not None else ""
        expected = f"predicts {self.num_classes} classes, labels 0..{self.num_classes - 1}{ignored}"
        if top is None:
            expected = f"takes labels from 0 up{ignored} (from {self.num_classes} up: classes unseen in training)"
        return (f"task {self.task!r} {expected}, but {holder} holds labels from {low} to {high}: fix the data, or "
                f"set tasks.{self.task}.num_classes to the data's class count (see data.targets)")


def fits(labels: torch.Tensor, top: int | None, ignore: int | None) -> bool:
    """Every label is 0 or more and below `top` (if given), or is `ignore`. One min/max decides, unless the ignore
    value lies apart from the range (255 beside 0..12, not -1): then a second pass without it."""
    if not labels.numel():
        return True
    low, high = (int(v) for v in labels.aminmax())
    if low >= 0 and (top is None or high < top):
        return True
    if ignore is None or (low < 0 and low != ignore) or (top is not None and high >= top and high != ignore):
        return False
    if low >= -1 and (top is None or high <= top):  # the ignore value is next to the range: nothing else is out
        return True
    return fits(torch.where(labels == ignore, torch.zeros((), dtype=labels.dtype), labels), top, None)


def label_ranges(cfg: DictConfig) -> dict[str, list[LabelRange]]:
    """Batch key -> the ranges of the tasks reading class labels from it (cfg.tasks.<name>: num_classes,
    ignore_index, unseen_labels; the labels of a several-part target are its last entry, detection's `labels`).
    A task whose facts do not resolve yet (a class count the train split decides, a target the data lacks) is left
    out: the build of the tasks says what is wrong with it."""
    def select(name: str, field: str):
        return OmegaConf.select(cfg, f"tasks.{name}.{field}", default=None, throw_on_resolution_failure=False)

    ranges: dict[str, list[LabelRange]] = {}
    for name in cfg.get("tasks") or {}:
        target, num_classes = select(name, "target"), select(name, "num_classes")
        if isinstance(target, DictConfig) and len(target):
            target = select(name, f"target.{list(target)[-1]}")
        if not isinstance(target, str) or num_classes is None:
            continue
        ignore_index, unseen = select(name, "ignore_index"), select(name, "unseen_labels")
        if unseen is None:  # a checkpoint from before the flag: an embedding head's classes are open-set
            unseen = str(select(name, "head._target_") or "").endswith("EmbeddingHead")
        ranges.setdefault(target, []).append(LabelRange(
            str(name), int(num_classes), None if ignore_index is None else int(ignore_index), bool(unseen)))
    return ranges


def sample_name(dataset: Dataset, index: int, key: str | None = None) -> str:
    """`sample <index>`, with the dataset's name of it (its file, of entry `key` if that has its own) when the
    dataset has `describe(index, key)`."""
    describe = getattr(dataset, "describe", None)
    return f"sample {index} ({describe(index, key)})" if describe is not None else f"sample {index}"


class CheckedSamples(Dataset):
    """Wraps the dataset of `split`: each sample's image must be finite, and the labels of each key in `ranges`
    must fit every range given for it. A bad sample is one SampleError (data.skip_bad does not skip it: a label
    beyond the class count is as often a wrong num_classes as a bad file)."""

    def __init__(self, dataset: Dataset, split: str, ranges: Mapping[str, list[LabelRange]]):
        self.dataset, self.split, self.ranges = dataset, split, dict(ranges)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            sample = self.dataset[index]
        except UserError as e:  # in a worker, re-raised as a SampleError so that its one line reaches the user
            if get_worker_info() is None or isinstance(e, SampleError):
                raise
            raise SampleError(str(e)) from None
        if sample is not None:  # None: a bad file skipped by data.skip_bad
            self.check(sample, index)
        return sample

    def check(self, sample: Mapping, index: int) -> None:
        image = sample.get("image")
        if isinstance(image, torch.Tensor) and image.is_floating_point() and image.numel() and not all(
                map(math.isfinite, image.aminmax())):  # NaN and inf reach the min or the max: one pass, no mask
            raise SampleError(f"{self.where(index, 'image')}: the image holds NaN or infinite values: fix or remove "
                              "the file")
        for key, ranges in self.ranges.items():
            labels = sample.get(key)
            if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
                continue
            for label_range in ranges:
                problem = label_range.problem(labels, self.split, "the sample")
                if problem:
                    raise SampleError(f"{self.where(index, key)}: {problem}")

    def where(self, index: int, key: str) -> str:
        return f"split {self.split!r}, {sample_name(self.dataset, index, key)}"

    def __getattr__(self, name: str):  # the wrapped dataset's facts (classes, batch_sampler, ...) stay visible
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def check_batch(tasks, batch: Mapping, several: bool = False) -> None:
    """Every task's target is in the batch, and its labels fit the task's class count. With several datasets
    (`several`) a batch holds the targets of one of them only, and data.tasks was checked instead."""
    for task in tasks.values():
        if not task.has_target(batch) and (several or any(PRESENT + key in batch for key in task.keys)):
            continue  # no sample of this batch has the label
        if not task.has_target(batch):
            keys = ", ".join(k for k in batch if k != "image")
            missing = [k for k in task.keys if k not in batch]
            raise UserError(f"task {task.name!r} reads the target {', '.join(missing)!r}, which the data does not "
                            f"provide (its batches hold: {keys})")
        task.check_targets(batch)
