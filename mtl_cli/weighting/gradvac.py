"""Gradient Vaccine.

Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
Multilingual Models", ICLR 2021.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting.base import GradientWeighting


def vaccinate(gram: torch.Tensor, targets: torch.Tensor, orders: Sequence[Sequence[int]], beta: float,
              eps: float) -> torch.Tensor:
    """Row i of the result holds the coefficients of g_i' over the original rows. For each j in `orders[i]`,
    with phi = cos(g_i', g_j) and phi_hat = targets[i, j]: if phi < phi_hat, g_i' += w g_j with w chosen so that
    the cosine becomes phi_hat; then targets[i, j] <- (1 - beta) phi_hat + beta phi (in place). `gram` is G G^T.

    Relative to the gradients' own sizes: phi is 0 when g_i' or g_j is 0 (and nothing is added), and eps keeps w
    finite for a target of +-1, its denominator being |g_j| (sin phi_hat + eps). The official code and torchjd add
    eps to |g_i'| |g_j| and to |g_j| sin phi_hat themselves, which is no longer small for small gradients: with norms
    1e-4 and 1e-6 the cosine came out at 1% of its value, and a target was missed by 1% for |g_j| = 1e-6."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    rows = torch.eye(len(gram), dtype=gram.dtype)
    for i, order in enumerate(orders):
        dots = gram[i].clone()  # g_i' . g_k for every k
        for j in order:
            norm_i = (rows[i] @ dots).clamp(min=0).sqrt()
            scale = norm_i * norms[j]
            phi = dots[j] / scale if scale > 0 else torch.zeros_like(scale)
            target = targets[i, j]
            if phi < target and scale > 0:
                sin_phi, sin_target = (1 - phi**2).clamp(min=0).sqrt(), (1 - target**2).clamp(min=0).sqrt()
                w = norm_i * (target * sin_phi - phi * sin_target) / (norms[j] * (sin_target + eps))
                rows[i, j] += w
                dots += w * gram[j]
            targets[i, j] = (1 - beta) * target + beta * phi
    return rows


class GradVac(GradientWeighting):
    """Like PCGrad, but each ordered pair (i, j) has a target cosine phi_hat_ij, an EMA of the cosines observed
    (from 0), and g_i' is raised to it whenever cos(g_i', g_j) falls below (`vaccinate`). update = sum_i g_i'.

    Whole-model granularity (one target per pair over all shared parameters). Each task visits the others in a
    random order from torch's global generator. Only `params`: the targets are statistics of the same parameters'
    gradients across steps. The targets are a buffer (checkpointed); the pairs of absent tasks keep theirs.
    """

    grad_targets = ("params",)
    loss_weights = False

    def __init__(self, tasks: Sequence[str], beta: float = 0.01, eps: float = 1e-8, grad_target: str = "params",
                 grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        self.beta, self.eps = float(beta), float(eps)
        self.register_buffer("targets", torch.zeros(len(self.tasks), len(self.tasks), dtype=torch.float64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = (grads @ grads.T).double().cpu()
        count = len(gram)
        orders = []
        for i in range(count):
            others = [j for j in range(count) if j != i]
            orders.append([others[k] for k in torch.randperm(count - 1).tolist()])
        pairs = torch.tensor(index)[:, None], torch.tensor(index)
        targets = self.targets[pairs].cpu()
        rows = vaccinate(gram, targets, orders, self.beta, self.eps)
        self.targets[pairs] = targets.to(self.targets.device)
        return rows.sum(0).to(grads.device)
