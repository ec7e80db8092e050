"""Fast adaptive multitask optimization.

Liu, Feng, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.
"""

from collections.abc import Callable, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import Weighting


class FastAdaptiveMultitaskOptimization(Weighting):
    """Loss weights w_t = z_t / (c D_t), with z = softmax(xi), D_t = L_t - min_loss + eps, c = sum_t z_t / D_t.

    sum_t w_t L_t has the gradient of sum_t z_t log D_t / c (c held constant). The logits xi then learn from
    the losses' progress over a step: delta_t = log D_t(before) - log D_t(after), xi gets the gradient of
    delta . softmax(xi) and an Adam step (lr w_lr, L2 weight decay gamma, as torch.optim.Adam), which raises
    the weight of the tasks whose losses fell least.

    `update`: where "after the step" losses come from. `same_batch` is the official code's: an extra forward pass
    on the step's batch with the updated weights (in train mode, as the official code; about a third more compute
    per step). `next_batch` (the default) lets the next step's losses (another batch) stand in, at no extra cost;
    the comparison then mixes the step's progress with the difference between the two batches.
    Only the tasks present both before and after count: delta and the softmax are restricted to them (the other
    logits get a zero gradient), and with fewer than two such tasks there is nothing to compare and no update. Adam's
    moments and step count are buffers, so a resumed run continues exactly.
    """

    UPDATES = ("next_batch", "same_batch")

    def __init__(self, tasks: Sequence[str], w_lr: float = 0.025, gamma: float = 0.01, min_loss: float = 0.0,
                 eps: float = 1e-8, betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 update: str = "next_batch"):
        super().__init__(tasks)
        if update not in self.UPDATES:
            raise UserError(f"famo: update={update!r} is not one of {', '.join(self.UPDATES)}")
        self.update = update
        self.w_lr, self.gamma, self.min_loss, self.eps = w_lr, gamma, min_loss, eps
        self.betas, self.adam_eps = tuple(betas), adam_eps
        n = len(self.tasks)
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_gaps", torch.ones(n))
        self.register_buffer("prev_present", torch.zeros(n, dtype=torch.bool))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = [self.tasks.index(t) for t in losses]
        values = torch.stack([loss.detach().float() for loss in losses.values()]).to(self.logits)
        gaps = values - self.min_loss + self.eps
        if self.training:
            present, now = self._gaps(index, gaps)
            if self.update == "next_batch":
                self._learn(present, now)
            self.prev_gaps.copy_(now)
            self.prev_present.copy_(present)
        z = torch.softmax(self.logits[index], dim=0)
        c = (z / gaps).sum()
        return dict(zip(losses, z / (c * gaps)))

    def after_step(self, losses_now: Callable[[], dict[str, torch.Tensor]]) -> None:
        if self.update == "same_batch":
            losses = losses_now()
            values = torch.stack([loss.detach().float() for loss in losses.values()]).to(self.logits)
            self._learn(*self._gaps([self.tasks.index(t) for t in losses], values - self.min_loss + self.eps))

    def _gaps(self, index: list[int], gaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(which tasks are present, their gaps with 1 for the absent) over all tasks."""
        present = torch.zeros_like(self.prev_present)
        present[index] = True
        now = torch.ones_like(self.prev_gaps)
        now[index] = gaps
        return present, now

    def _learn(self, present: torch.Tensor, gaps: torch.Tensor) -> None:
        """One Adam step of the logits on the progress from the previous step to this one (no host sync)."""
        delta = self.prev_gaps.log() - gaps.log()
        common = present & self.prev_present & torch.isfinite(delta)
        delta = torch.where(common, delta, 0.0)
        z = torch.where(common, torch.softmax(self.logits.masked_fill(~common, -torch.inf), dim=0), 0.0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # d(delta . softmax)/dxi + L2
        active = common.sum() >= 2
        beta1, beta2 = self.betas
        steps = self.adam_steps + active.long()
        exp_avg = torch.where(active, beta1 * self.exp_avg + (1 - beta1) * grad, self.exp_avg)
        exp_avg_sq = torch.where(active, beta2 * self.exp_avg_sq + (1 - beta2) * grad**2, self.exp_avg_sq)
        k = steps.clamp(min=1).to(exp_avg)
        step = self.w_lr * exp_avg / (1 - beta1**k) / ((exp_avg_sq / (1 - beta2**k)).sqrt() + self.adam_eps)
        self.logits.copy_(torch.where(active, self.logits - step, self.logits))
        self.exp_avg.copy_(exp_avg)
        self.exp_avg_sq.copy_(exp_avg_sq)
        self.adam_steps.copy_(steps)
