"""Static weighting: fixed per-task weights from the config."""

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import Weighting


class StaticWeighting(Weighting):
    """total = sum_t w_t L_t with w_t from `weights` (1.0 for tasks not listed)."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise UserError(f"weighting.weights names {unknown}, which are not tasks of this run; tasks: {list(tasks)}")
        self.register_buffer("values", torch.tensor([float(weights.get(t, 1.0)) for t in tasks]))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.values[self.tasks.index(t)] for t in losses}
