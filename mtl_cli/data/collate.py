"""Batching of sample dicts: tensors of one shape are stacked; per-sample lists (boxes, labels) stay lists."""

from collections.abc import Mapping, Sequence

import torch


def collate(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        same_shape = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        stackable = same_shape and key not in ("boxes", "labels")
        batch[key] = torch.stack([v.as_subclass(torch.Tensor) for v in values]) if stackable else values
    return batch
