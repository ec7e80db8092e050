"""Batching of sample dicts: tensors of one shape are stacked; per-sample lists (boxes, labels) stay lists.

A sample may lack a target (the key is absent or None): the batch then holds that target for the samples that
have it only, and `present/<key>`, a bool [B] saying which samples those are. Samples that are None (a bad file
skipped with data.skip_bad) are dropped.
"""

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError

PRESENT = "present/"


def collate(samples: Sequence[Mapping[str, torch.Tensor] | None]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    samples = [s for s in samples if s is not None]
    if not samples:
        raise UserError("every sample of a batch was bad and skipped (data.skip_bad=true): check the data files")
    keys = list(dict.fromkeys(key for s in samples for key in s))
    batch = {}
    for key in keys:
        present = [s.get(key) is not None for s in samples]
        values = [s[key] for s, p in zip(samples, present) if p]
        if not all(present):
            batch[PRESENT + key] = torch.tensor(present)
            if not values:
                continue
        same_shape = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        stackable = same_shape and key not in ("boxes", "labels")
        batch[key] = torch.stack([v.as_subclass(torch.Tensor) for v in values]) if stackable else values
    return batch
