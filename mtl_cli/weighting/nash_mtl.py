"""Nash-MTL.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as a Bargaining Game",
ICML 2022.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting


class NashMTL(GradientWeighting):
    """The Nash bargaining solution: the weights a > 0 with M a = 1/a (M = G G^T), so that every task gets
    g_i^T d = 1 / a_i from the update d = a @ G (the paper's eq. 3 and Algorithm 1).

    Ours is the exact solution of that equation (Newton's method, checked by its residual); the official code and
    torchjd's port aim at the same equation on the raw Gramian (they divide M by its norm for conditioning and put
    the norm back in the constraints), but they do not solve it: the official code runs a few convex-concave
    iterations of cvxpy (and falls back to summing the losses, silently, when they fail), and on conflicting or
    badly scaled gradients both settle on weights whose M a differs from 1/a. Where they agree with the equation,
    they agree with us. These are loss weights (the official code back-propagates the weighted loss), so the heads
    get them too. The paper's max_norm is `trainer.grad_clip`
    and its update_weights_every is `grad_every`.

    Solved exactly by Newton's method (`solvers.positive_solution`), so there is no state to warm-start. A task
    with a zero gradient gets weight 0. When 0 is in the convex hull of the gradients there is no solution: the
    failure is reported through `solver_failed` and the iterate of least residual is used.
    """

    loss_weights = True

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1, max_iters: int = 100):
        super().__init__(tasks, grad_target, grad_every)
        self.max_iters = int(max_iters)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        weights, failure = solvers.positive_solution(solvers.gramian(grads), 1.0, self.max_iters)
        if failure:
            self.solver_failed(failure)
        return weights.to(grads)
