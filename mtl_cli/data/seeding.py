"""Per-sample seeds for random augmentation, so that a training epoch is a function of its shuffle seed alone.

The batch sampler pairs every index with a seed drawn (through a generator of its own) from the epoch's shuffle
generator; the dataset wrapper loads the sample with the CPU random generator set to that seed and restores it
afterwards. Which worker process loads a sample, and what it loaded before, then change nothing: a resumed run
augments exactly as the uninterrupted one, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's shuffle, independent across (seed, epoch) pairs (seed + epoch would make seed 1
    replay seed 0's orders one epoch later)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class SeededBatches(Sampler):
    """The batches of `batches` (lists of indices), each index paired with its sample's seed.

    `generator` is the one `batches` shuffles with; `set_epoch(e)` seeds it for epoch e of the run seeded `seed`,
    so an epoch's order and augmentation depend on (seed, epoch) alone. `skip(k)` makes the next pass start after
    its first k batches (a resume in the middle of an epoch), without loading them and with the same seeds for
    the batches after. `shard=(rank, world)`: each batch is rank's part of the global batch (several processes),
    so the global order and every sample's seed are those of a single process."""

    def __init__(self, batches: Iterable[list[int]], generator: torch.Generator, seed: int = 0,
                 shard: tuple[int, int] = (0, 1)):
        self.batches, self.generator, self.seed, self.shard = batches, generator, int(seed), shard
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def skip(self, k: int) -> None:
        self.skipped = int(k)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skipped, self.skipped = self.skipped, 0
        seeds = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=self.generator)))
        for i, batch in enumerate(self.batches):
            batch_seeds = torch.randint(2**62, (len(batch),), generator=seeds).tolist()
            if i >= skipped:
                yield part(list(zip(batch, batch_seeds)), *self.shard)


class ShardedBatches(Sampler):
    """Rank's part of each batch of `batches` (scoring on several processes: every sample scored once), leaving
    out the batches that give this rank nothing."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            mine = part(list(batch), self.rank, self.world)
            if mine:
                yield mine


def part(batch: list, rank: int, world: int) -> list:
    """Rank's contiguous part of a global batch; the parts' sizes differ by one at most."""
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return batch[start:start + size + (rank < extra)]


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
