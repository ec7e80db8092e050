"""Dual-balancing multi-task learning.

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu and Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting.base import GradientWeighting


class DBMTL(GradientWeighting):
    """Balances the losses' scales by taking logarithms, then the gradients' norms:

        g_t = grad log(L_t + eps) = grad L_t / (L_t + eps),
        ghat_t <- b_k ghat_t + (1 - b_k) g_t   (from 0; b_k = beta / k^beta_sigma, k the task's own step count),
        update = sum_t alpha_t ghat_t, alpha_t = max_s |ghat_s| / (|ghat_t| + min(eps, sqrt(eps) |ghat_t|)).

    The official code (LibMTL) divides by |ghat_t| + eps, which guards a zero norm but is not small next to a small
    one: a task whose average was 1e-7 (a gradient of 1e-6 with a loss of 1, after the first step's factor 1 - beta)
    came out at 0.9 of the others' norm, one of 1e-9 under 0.1. Here eps never adds more than sqrt(eps) (1e-4) of the
    norm it guards; for norms above sqrt(eps) this is the official + eps exactly.

    The update is not a combination of this step's rows, so `combine` is overridden; the weights logged are the
    alpha_t. Each head gets the gradient of its log-loss (`head_weights`: 1 / (L_t + eps)), without alpha.

    The averages ghat, T x P floats (as much memory as T copies of the shared parameters), are a buffer saved
    with checkpoints; it is sized at the first step (a fresh instance has 0 columns and takes the checkpoint's
    size). A task absent from a step keeps its average, and the update and the max run over the tasks present.
    Only `params`: the representation's gradients have no fixed size or meaning across batches to average.
    """

    grad_targets = ("params",)
    loss_weights = False

    def __init__(self, tasks: Sequence[str], beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8,
                 grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self.register_buffer("averages", torch.zeros(len(self.tasks), 0))
        self.register_buffer("seen", torch.zeros(len(self.tasks), dtype=torch.long))

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.averages.shape[1] != grads.shape[1]:
            if self.averages.shape[1]:
                raise RuntimeError(f"DBMTL: gradients of {grads.shape[1]} parameters, averages of "
                                   f"{self.averages.shape[1]}")
            self.averages = grads.new_zeros(len(self.tasks), grads.shape[1])
        self.seen[index] += 1
        rate = (self.beta / self.seen[index].to(grads.dtype) ** self.beta_sigma)[:, None]
        step = (grads / (losses.to(grads) + self.eps)[:, None]).mul_(1 - rate)  # (1 - b_k) g_t
        if self.in_place(self.averages, index, grads):
            averages = self.averages.mul_(rate).add_(step)  # every task present: the same sums, in place
        else:
            averages = rate * self.averages[index].to(grads) + step
            self.averages[index] = averages.to(self.averages)
        norms = averages.norm(dim=1)
        guarded = torch.where(norms > 0, norms + (self.eps ** 0.5 * norms).clamp(max=self.eps), self.eps)
        alpha = norms.max() / guarded
        return alpha @ averages, alpha

    def head_weights(self, weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return 1 / (losses.to(weights) + self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "averages")
        if saved is not None and saved.dim() == 2 and saved.shape[1] != self.averages.shape[1]:
            self.averages = saved.new_zeros(self.averages.shape[0], saved.shape[1], device=self.averages.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
