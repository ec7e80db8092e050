"""Uncertainty weighting.

Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
Semantics", CVPR 2018.
"""

from collections.abc import Sequence

import torch
from torch import nn

from mtl_cli.weighting.base import Weighting


class UncertaintyWeighting(Weighting):
    """Learns s_t = log sigma_t^2 per task: total = sum_t exp(-s_t) / 2 * L_t + s_t / 2.

    The weight of task t is 1 / (2 sigma_t^2); the s_t / 2 term keeps sigma from growing without bound. (This is
    the form used for regression in the paper, and by most implementations for every task.)
    """

    def __init__(self, tasks: Sequence[str], init_log_var: float = 0.0):
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: 0.5 * torch.exp(-self.log_vars[self.tasks.index(t)]) for t in losses}

    def regularizer(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(0.5 * self.log_vars[self.tasks.index(t)] for t in losses)
