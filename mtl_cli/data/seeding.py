"""Per-sample seeds for random augmentation, so that a training epoch is a function of its shuffle seed alone.

The batch sampler pairs every index with a seed drawn (through a generator of its own) from the epoch's shuffle
generator; the dataset wrapper loads the sample with the CPU random generator set to that seed and restores it
afterwards. Which worker process loads a sample, and what it loaded before, then change nothing: a resumed run
augments exactly as the uninterrupted one, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import Dataset, Sampler


class SeededBatches(Sampler):
    """The batches of `batches` (lists of indices), each index paired with its sample's seed."""

    def __init__(self, batches: Iterable[list[int]], generator: torch.Generator):
        self.batches, self.generator = batches, generator

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seeds = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=self.generator)))
        for batch in self.batches:
            yield list(zip(batch, torch.randint(2**62, (len(batch),), generator=seeds).tolist()))


class SeededSamples(Dataset):
    """Sample (index, seed) of `dataset`, drawn with the CPU random generator seeded by `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str):  # the wrapped dataset's facts stay visible
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
