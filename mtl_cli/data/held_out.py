"""A held-out part of the train split (`data.held_out`, a fraction), for the weightings that learn on data the model
does not train on (Auto-Lambda's task weights: `Weighting.held_out_batches`).

Only a run whose weighting asks for held-out batches holds the part out: its train split is the rest, and the
`held_out` split is the part, read with the train split's transforms. Every other run trains on the whole train
split. `data.held_out: null` holds nothing out: the held-out batches are then batches of the whole train split,
drawn in their own order (what Auto-Lambda's official code does). The part is drawn from `data.fold_seed` (as the folds are, data/folds.py), so every seed of a study holds out
the same samples; with k-fold cross-validation it is drawn from the training folds.

Held-out batches are drawn per step from (seed, step) alone, with replacement across steps, so a resumed run draws
the batches the uninterrupted one drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch.utils.data import Dataset

from mtl_cli.data.folds import Fold
from mtl_cli.errors import UserError


@dataclass(frozen=True)
class HeldOut:
    fraction: float | None  # None: the whole train split, trained on too (Auto-Lambda's official code)
    seed: int

    @classmethod
    def of(cls, cfg: DictConfig) -> HeldOut | None:
        """The held-out part the run's weighting asks for, or None."""
        weighting = cfg.get("weighting")
        target = weighting.get("_target_") if isinstance(weighting, DictConfig) else None
        try:
            wanted = target is not None and getattr(get_class(target), "held_out_batches", 0) > 0
        except ImportError:  # a mistyped target: building the weighting says so
            wanted = False
        if not wanted:
            return None
        fraction = cfg.data.get("held_out")
        if fraction is not None and not 0 < float(fraction) < 1:
            raise UserError(f"data.held_out={fraction}: weighting {target.rsplit('.', 1)[-1]} learns on a held-out "
                            "part of the train split; give its fraction, between 0 and 1 (e.g. data.held_out=0.1), "
                            "or null for batches of the whole train split in another order")
        return cls(None if fraction is None else float(fraction), int(cfg.data.get("fold_seed") or 0))

    @staticmethod
    def source(split: str) -> str:
        return "train" if split == "held_out" else split

    def select(self, dataset: Dataset, split: str) -> Dataset:
        """The train split without the held-out part, or the part (`held_out`); other splits as they are."""
        if split not in ("train", "held_out") or self.fraction is None:
            return dataset
        size = len(dataset)
        count = math.ceil(self.fraction * size)
        if count >= size:
            raise UserError(f"data.held_out={self.fraction} leaves no training sample of the {size} in the train "
                            "split: give a smaller fraction")
        order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
        part = order[:count] if split == "held_out" else order[count:]
        return Fold(dataset, part.sort().values.tolist())


class HeldOutBatches:
    """Batches of the held-out split, each drawn from (seed, step, k) alone."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, collate):
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate

    def batch(self, step: int, k: int = 0) -> dict:
        generator = torch.Generator().manual_seed(hash((self.seed, step, k)) % (1 << 62))
        size = min(self.batch_size, len(self.dataset))
        indices = torch.randperm(len(self.dataset), generator=generator)[:size]
        return self.collate([self.dataset[i] for i in indices.tolist()])
