"""Smooth Tchebycheff scalarization.

Lin, Zhang, Yang, Liu, Wang and Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
ICML 2024.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting.base import Weighting


class SmoothTchebycheff(Weighting):
    """total = T mu logsumexp_t(log(L_t / nadir_t) / mu), after `warmup_epochs` epochs of sum_t log L_t.

    The nadir point is each task's mean training loss over the last warm-up epoch. As loss weights (detached,
    with exactly the gradient of total): w_t = 1 / L_t during the warm-up, then w_t = T p_t / L_t with
    p = softmax_t(log(L_t / nadir_t) / mu), T the number of tasks present that have a nadir. A task with no loss
    in the last warm-up epoch takes its nadir from the latest earlier one; a task never seen yet keeps the log
    loss until the end of the first epoch it appears in. Sums, counts, nadir and the epoch count are buffers.

    The official code (LibMTL's STCH, STCH_warmup_epoch=4 on 0-based epochs) trains epochs 0-4 on the log loss
    and takes the nadir from epoch 4: five epochs, so warmup_epochs=5 here.
    """

    def __init__(self, tasks: Sequence[str], mu: float = 1.0, warmup_epochs: int = 5):
        super().__init__(tasks)
        self.mu, self.warmup_epochs = mu, int(warmup_epochs)
        n = len(self.tasks)
        self.register_buffer("loss_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("nadir", torch.full((n,), torch.nan))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = [self.tasks.index(t) for t in losses]
        values = torch.stack([loss.detach().float() for loss in losses.values()]).to(self.nadir).clamp(min=1e-20)
        if self.training:
            self.loss_sum[index] += values.double()
            self.loss_count[index] += 1
        nadir = self.nadir[index]
        scalarised = (self.epochs >= self.warmup_epochs) & torch.isfinite(nadir)
        scores = torch.where(scalarised, (values / nadir).log() / self.mu, -torch.inf)
        p = torch.softmax(scores, dim=0)  # NaN when no task is scalarised yet; torch.where discards it
        weights = torch.where(scalarised, scalarised.sum() * p / values, 1 / values)
        return dict(zip(losses, weights))

    def epoch_end(self) -> None:
        seen = self.loss_count > 0
        record = seen & ((self.epochs < self.warmup_epochs) | torch.isnan(self.nadir))
        self.nadir.copy_(torch.where(record, self.loss_sum / self.loss_count.clamp(min=1), self.nadir))
        self.epochs += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()
