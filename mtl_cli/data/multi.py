"""`data: multi`: tasks from different datasets. Each batch comes from one member dataset and holds the targets of
the tasks assigned to it; the loop computes the losses of the tasks present and the weighting combines those.

Which member gives the next training batch is the sampling strategy's choice:
- `round_robin`: the members in turn;
- `proportional`: at random, with probability proportional to the member's size;
- `temperature`: at random, with probability proportional to size^(1/tau) (tau = 1 is proportional, a large
  tau tends to uniform; the smoothing of multilingual and multi-task NLP).
An epoch is as many batches as the members hold together; a member that runs out within an epoch is reshuffled
and goes on. Validation goes through every member once, the members in turn.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from mtl_cli.data.checks import sample_name
from mtl_cli.errors import UserError

STRATEGIES = ("round_robin", "proportional", "temperature")


class MultiDataset(Dataset):
    """The members, one after the other; sample i of member m keeps only the keys of m's tasks (and the image)."""

    def __init__(self, members: Mapping[str, Dataset], keys: Mapping[str, Sequence[str]],
                 sampling: str = "round_robin", tau: float = 2.0):
        if sampling not in STRATEGIES:
            raise UserError(f"data.sampling={sampling!r} is not one of {', '.join(STRATEGIES)}")
        if sampling == "temperature" and not float(tau) > 0:
            raise UserError(f"data.tau={tau} must be positive")
        self.names = list(keys)
        self.members = [members[name] for name in self.names]
        self.keys = [{"image", *keys[name]} for name in self.names]
        self.sizes = [len(member) for member in self.members]
        for name, size in zip(self.names, self.sizes):
            if size == 0:
                raise UserError(f"data member {name!r} has no samples in this split")
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))
        self.sampling, self.tau = sampling, float(tau)

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def facts(self) -> dict:
        """The members' facts decided by their train splits (class maps, identity counts), for adopt_facts."""
        facts = {name: getattr(member, "facts", None) for name, member in zip(self.names, self.members)}
        return {"members": {name: value for name, value in facts.items() if value}}

    def member_of(self, index: int) -> int:
        return bisect.bisect_right(self.offsets, index) - 1

    def describe(self, index: int, key: str | None = None) -> str:
        """The member of sample `index` and the member's name of it, for messages."""
        m = self.member_of(index)
        return f"member {self.names[m]!r}, {sample_name(self.members[m], index - self.offsets[m], key)}"

    def __getitem__(self, index: int):
        m = self.member_of(index)
        sample = self.members[m][index - self.offsets[m]]
        return None if sample is None else {k: v for k, v in sample.items() if k in self.keys[m]}

    def probabilities(self) -> torch.Tensor:
        """The chance of each member giving the next batch under a random strategy."""
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        weights = sizes if self.sampling == "proportional" else sizes ** (1.0 / self.tau)
        return weights / weights.sum()

    def batch_sampler(self, batch_size: int, shuffle: torch.Generator | None) -> Sampler:
        return MemberBatches(self, batch_size, shuffle)


class MemberBatches(Sampler):
    """Batches of indices of a MultiDataset, each from one member (see the module's docstring)."""

    def __init__(self, dataset: MultiDataset, batch_size: int, shuffle: torch.Generator | None):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle

    def member_batches(self, m: int) -> int:
        size = self.dataset.sizes[m]
        if self.shuffle is None:
            return -(-size // self.batch_size)
        return max(size // self.batch_size, 1)

    def __len__(self) -> int:
        return sum(self.member_batches(m) for m in range(len(self.dataset.sizes)))

    def __iter__(self) -> Iterator[list[int]]:
        offsets, sizes = self.dataset.offsets, self.dataset.sizes
        if self.shuffle is None:  # the members in turn, so that trainer.limit_val_batches still sees each
            members = [[[offsets[m] + i for i in range(start, min(start + self.batch_size, size))]
                        for start in range(0, size, self.batch_size)] for m, size in enumerate(sizes)]
            for turn in itertools.zip_longest(*members):
                yield from (batch for batch in turn if batch is not None)
            return
        streams = [self.stream(m) for m in range(len(sizes))]
        for m in self.order():
            yield [offsets[m] + i for i in next(streams[m])]

    def order(self) -> list[int]:
        """The member of each batch of the epoch."""
        count, members = len(self), len(self.dataset.sizes)
        if self.dataset.sampling == "round_robin":
            return [i % members for i in range(count)]
        return torch.multinomial(self.dataset.probabilities(), count, replacement=True,
                                 generator=self.shuffle).tolist()

    def stream(self, m: int) -> Iterator[list[int]]:
        """Shuffled batches of member m, reshuffled whenever it runs out (a member smaller than a batch gives
        batches of its size)."""
        size = self.dataset.sizes[m]
        batch = min(self.batch_size, size)
        while True:
            order = torch.randperm(size, generator=self.shuffle).tolist()
            for start in range(0, size - batch + 1, batch):
                yield order[start:start + batch]
