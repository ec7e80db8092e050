"""Groups of shared parameters that a gradient method aggregates separately (`weighting.groups`).

`whole`: one group, every shared parameter (the methods as their papers state them). `layer`: each module that
holds parameters of its own (a convolution's weight and bias, a norm layer's scale and shift): GradVac's
per-layer granularity, TorchJD's per-parameter-group aggregation. `stage`: each indexed block of the trunk, the part
of a parameter's name up to its first number (`backbone.stages.2`, `experts.0`), e.g. the backbone's stages.

A group is a run of consecutive shared parameters (the order of `model.shared_parameters()`, which is the order of
the task-gradient matrix's columns), so each group is a slice of the columns.
"""

from __future__ import annotations

from torch import nn

LEVELS = ("whole", "stage", "layer")


def group_key(name: str, level: str) -> str:
    """The group of the parameter called `name` (as in `model.named_parameters()`) at `level`."""
    parts = name.split(".")
    if level == "layer":
        return ".".join(parts[:-1])
    indexed = next((k for k, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[:1] if indexed is None else parts[:indexed + 1])


def column_groups(model: nn.Module, level: str) -> list[tuple[str, slice]]:
    """(group name, its columns in the task-gradient matrix) for each group of the trainable shared parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[tuple[str, slice]] = []
    start = 0
    for param in (p for p in model.shared_parameters() if p.requires_grad):
        key, stop = group_key(names[id(param)], level), start + param.numel()
        if groups and groups[-1][0] == key:
            groups[-1] = (key, slice(groups[-1][1].start, stop))
        else:
            groups.append((key, slice(start, stop)))
        start = stop
    return groups
