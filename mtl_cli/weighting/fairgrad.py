"""FairGrad.

Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (arXiv:2402.15638).
"""

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting


class FairGrad(GradientWeighting):
    """alpha-fair allocation of the update: weights w > 0 with M w = w^(-1/alpha) (M = G G^T, the paper's eq. 4),
    update w @ G. alpha = 1 is proportional fairness (Nash-MTL's solution), alpha -> infinity max-min fairness.

    As in the official code, only the shared parameters get the combination and each head gets its own task's
    gradient (it back-propagates every raw loss, then overwrites the shared gradients). Solved exactly by Newton's
    method (`solvers.positive_solution`); a task with a zero gradient gets weight 0; when 0 is in the convex hull of
    the gradients there is no solution, which is reported through `solver_failed`, the iterate of least residual
    being used.
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1, alpha: float = 1.0,
                 max_iters: int = 100):
        super().__init__(tasks, grad_target, grad_every)
        if not alpha > 0:
            raise UserError(f"FairGrad: alpha={alpha} must be positive")
        self.alpha, self.max_iters = float(alpha), int(max_iters)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        weights, failure = solvers.positive_solution(solvers.gramian(grads), self.alpha, self.max_iters)
        if failure:
            self.solver_failed(failure)
        return weights.to(grads)
