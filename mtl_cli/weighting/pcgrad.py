"""Projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting.base import GradientWeighting


def project_conflicts(gram: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """Row i of the result holds the coefficients of g_i' over the original rows, g_i' being g_i projected, in
    `orders[i]`, onto the normal plane of each g_j it conflicts with (g_i' . g_j < 0). `gram` is G G^T."""
    rows = torch.eye(len(gram), dtype=gram.dtype)
    for i, order in enumerate(orders):
        for j in order:
            if j == i:
                continue
            dot = rows[i] @ gram[j]  # g_i' . g_j
            if dot < 0:
                rows[i, j] -= dot / gram[j, j]
    return rows


class PCGrad(GradientWeighting):
    """update = sum_i g_i', each g_i' being g_i with its conflicting components removed (`project_conflicts`).

    Each task visits the others in its own random order, drawn from torch's global generator (seeded and
    checkpointed by the trainer): a permutation of all the tasks present, skipping itself, as the paper's code
    shuffles the whole list. The projections run on the T x T Gram matrix, on the CPU in float64.
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = (grads @ grads.T).double().cpu()
        orders = [torch.randperm(len(gram)).tolist() for _ in range(len(gram))]
        return project_conflicts(gram, orders).sum(0).to(grads.device)
