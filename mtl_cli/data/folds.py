"""k-fold cross-validation (`data.folds=k data.fold=i`): the train split is cut into k folds; fold i is the
validation split ("val") and the other k-1 folds train. The test split is left as it is.

The partition is a permutation of the train split's indices drawn from `data.fold_seed`, not from the run's `seed`:
the runs of one study (`data.fold='range(5)' seed=0,1,2`) then share one partition, so that the held-out folds are
disjoint and cover the train split whatever the seed, and the seed varies the training alone. Another fold_seed is
another partition (repeated k-fold). The folds' sizes differ by one at most.

The held-out fold is read from the train split with the validation transforms (no augmentation). Facts the train
split decides (a folder dataset's class maps, see build.adopt_facts) come from the whole train split, so that they
are the same for every fold: a class met in one fold only is still in every fold's class map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from mtl_cli.errors import UserError


@dataclass(frozen=True)
class Folds:
    """Which of `k` folds, drawn with `seed`, is held out (schema.py checks the values)."""

    k: int
    fold: int
    seed: int

    @classmethod
    def of(cls, data: DictConfig) -> Folds | None:
        """The folding `data` asks for, or None (`data.folds: null`, or a config from before the keys)."""
        k = data.get("folds")
        return None if k is None else cls(int(k), int(data.get("fold") or 0), int(data.get("fold_seed") or 0))

    @staticmethod
    def source(split: str) -> str:
        """The split read from the files: the held-out fold (val) is part of train."""
        return "train" if split == "val" else split

    def select(self, dataset: Dataset, split: str, where: str = "the train split") -> Dataset:
        """`dataset` (the train split) cut to the part that `split` sees: val the held-out fold, train the others;
        any other split (test) is returned as it is."""
        if split not in ("train", "val"):
            return dataset
        parts = partition(len(dataset), self.k, self.seed, where)
        if split == "val":
            return Fold(dataset, parts[self.fold].tolist())
        return Fold(dataset, torch.cat(parts[:self.fold] + parts[self.fold + 1:]).sort().values.tolist())


def partition(size: int, k: int, seed: int, where: str = "the train split") -> list[torch.Tensor]:
    """The k folds of `size` samples: disjoint, covering 0..size-1, each sorted, their sizes within one."""
    if k > size:
        advice = f"use data.folds={size} or fewer" if size >= 2 else "too few to fold"
        raise UserError(f"data.folds={k} leaves a fold empty: {where} has {size} sample(s), one per fold at least is "
                        f"needed ({advice})")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in order.tensor_split(k)]


class Fold(Dataset):
    """The samples `indices` of the train split `dataset`, in that order."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def describe(self, index: int, key: str | None = None) -> str:
        """The sample's place in the train split, with the dataset's own name of it (its file), for messages."""
        describe = getattr(self.dataset, "describe", None)
        own = self.indices[index]
        return f"sample {own} of the train split" + (f", {describe(own, key)}" if describe is not None else "")

    def __getattr__(self, name: str):  # the train split's facts (class maps, ...) stay visible
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
