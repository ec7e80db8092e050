"""MoDo: multi-objective gradient descent with double sampling.

Chen, Fernando, Ying and Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023 (JMLR 2024).
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting


class MoDo(GradientWeighting):
    """Weights lambda on the simplex, updated once per step by one projected gradient step on 1/2 |lambda G|^2:
    lambda <- Proj(lambda - gamma (G1 G2^T lambda + rho lambda)), then the update lambda @ G3. G1, G2 and G3 are the
    task gradients of three independent batches (G3 the step's own; the other two the samples the loop draws,
    `batches_per_step = 3`): G1 G2^T is an unbiased estimate of the expected Gramian, which one batch's G G^T is
    not, and is what the method's convergence rests on. An epoch therefore has a third as many steps.

    gamma and rho are LibMTL's defaults (0.001, 0.1; torchjd's MoDoWeighting uses gamma 0.1). lambda is a buffer,
    so a resumed run continues it. The step is not scale-invariant (the paper's choice): gamma acts on G1 G2^T as
    is. Heads get their own task's gradient of the step's batch (LibMTL averages the three batches' head
    gradients). When only some tasks have targets, the step moves their part of lambda and keeps its mass."""

    batches_per_step = 3
    loss_weights = False

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", gamma: float = 1e-3, rho: float = 0.1):
        super().__init__(tasks, grad_target)
        self.gamma, self.rho = float(gamma), float(rho)
        self.register_buffer("lambdas", torch.full((len(self.tasks),), 1 / len(self.tasks), dtype=torch.float64))

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int], *samples: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = samples
        lambdas, mass = simplex_part(self.lambdas, index)
        step = solvers.gramian(first, second) @ lambdas + self.rho * lambdas
        lambdas = solvers.project_to_simplex(lambdas - self.gamma * step)
        self.lambdas[index] = lambdas * mass
        return lambdas.to(grads) @ grads, lambdas


def simplex_part(weights: torch.Tensor, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the tasks `index` as a point of their own simplex, and the mass they had together (uniform
    when they had none), so that writing `part * mass` back keeps the whole on the simplex."""
    part = weights[index].cpu()
    mass = part.sum()
    if mass <= 0:
        part, mass = torch.full_like(part, 1 / len(index)), torch.ones_like(mass) * len(index) / len(weights)
    return part / mass, mass
