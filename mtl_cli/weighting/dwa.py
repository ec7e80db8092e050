"""Dynamic weight average.

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting.base import Weighting


class DynamicWeightAverage(Weighting):
    """w_t = T exp(r_t / temperature) / sum_k exp(r_k / temperature), with r_t = L_t(e-1) / L_t(e-2).

    L_t(e) is task t's mean training loss over epoch e. The first two epochs use w_t = 1. The running sums and
    the last two epoch means are buffers, so they are saved with checkpoints.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        self.temperature = temperature
        n = len(self.tasks)
        self.register_buffer("loss_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("history", torch.zeros(2, n, dtype=torch.float64))  # epoch means: [e-2, e-1]
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("current", torch.ones(n))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training:
            idx = [self.tasks.index(t) for t in losses]
            self.loss_sum[idx] += torch.stack([l.detach().double() for l in losses.values()])
            self.loss_count[idx] += 1
        return {t: self.current[self.tasks.index(t)] for t in losses}

    def epoch_end(self) -> None:
        mean = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp(min=1), self.history[1])
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.epochs += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()
        if self.epochs >= 2:
            ratio = (self.history[1] / self.history[0].clamp(min=1e-12)).float()
            self.current.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))
