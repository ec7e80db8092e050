"""GradNorm.

Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018.
"""

from collections.abc import Sequence

import torch
from torch import nn

from mtl_cli.weighting.base import GradientWeighting


class GradNorm(GradientWeighting):
    """Learned loss weights w = T softmax(theta) that pull the task gradient norms toward a common rate.

    With n_t = |g_t| (the norm of task t's gradient row), r_t = (L_t / L_t(0)) / mean_k(L_k / L_k(0)) and the
    constant target_t = mean_k(w_k n_k) r_t^alpha, theta gets the gradient of L_grad = sum_t |w_t n_t - target_t|
    (accumulated into theta.grad, for the main optimizer) and the update uses w before that step. L_t(0) is the
    first loss seen for each task (a buffer). T, the softmax and the means run over the tasks present.

    The paper takes the gradients of the last shared layer; grad_target=params takes all shared parameters,
    grad_target=representation the shared features (one trunk backward in all).
    """

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        self.alpha = alpha
        self.logits = nn.Parameter(torch.zeros(len(self.tasks)))
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), torch.nan))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        first = self.initial_losses[index]
        first = torch.where(torch.isnan(first), losses.to(first), first)
        self.initial_losses[index] = first
        progress = losses.to(first) / first.clamp(min=1e-20)
        target_rate = (progress / progress.mean()) ** self.alpha
        norms = grads.detach().norm(dim=1).to(self.logits)
        with torch.enable_grad():
            weights = len(index) * torch.softmax(self.logits[index], dim=0)
            weighted = weights * norms
            gap = (weighted - weighted.mean().detach() * target_rate).abs().sum()
            (grad,) = torch.autograd.grad(gap, self.logits)
        grad = grad * self.loss_scale  # the GradScaler unscales theta.grad with every other gradient
        self.logits.grad = grad if self.logits.grad is None else self.logits.grad + grad
        return weights.detach()
