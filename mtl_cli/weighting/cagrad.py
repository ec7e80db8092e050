"""CAGrad.

Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
"""

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting

RESCALES = {0: lambda c: 1.0, 1: lambda c: 1 + c**2, 2: lambda c: 1 + c}


class CAGrad(GradientWeighting):
    """The update maximises the worst task's decrease within a ball around the mean gradient g0:
    max_{|d - g0| <= c |g0|} min_i g_i^T d. Its dual gives w = argmin_{w in simplex} g_w^T g0 + c |g0| |g_w|, and
    d = g0 + (c |g0| / |g_w|) g_w, divided by the official code's `rescale` factor: 0 none, 1 (default) 1 + c^2,
    2 1 + c. So the coefficients are (1/T + lambda w) / rescale, lambda = c |g0| / |g_w|; c = 0 gives the mean
    gradient exactly.

    When |g_w| <= norm_eps sum_i w_i |g_i| (g_w is 0 up to the rounding of its own terms) the gradients are
    Pareto-stationary and lambda is undefined: the coefficients are zero, as in torchjd. The test is relative to
    the gradients g_w combines, not to |G|_F: against |G|_F, a task whose gradient was 1e-4 of the others' zeroed
    every update. Only the shared parameters get the combination; each head gets its own
    task's gradient, as in the official code. The dual is solved exactly (`solvers.cagrad_dual`); a failed check is
    reported through `solver_failed` and the best point found is used.
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1, c: float = 0.4,
                 rescale: int = 1, norm_eps: float = 1e-3, max_iters: int = 10_000):
        super().__init__(tasks, grad_target, grad_every)
        if c < 0 or rescale not in RESCALES:
            raise UserError(f"CAGrad: c={c} must be >= 0 and rescale={rescale} one of 0, 1, 2")
        self.c, self.rescale, self.norm_eps, self.max_iters = float(c), int(rescale), float(norm_eps), int(max_iters)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = solvers.gramian(grads)
        tasks = gram.shape[0]
        coefficients = torch.full((tasks,), 1 / tasks, dtype=gram.dtype)
        radius = self.c * gram.mean().clamp(min=0).sqrt()  # c |g0|
        if radius > 0:
            w, failure = solvers.cagrad_dual(gram, self.c, self.max_iters)
            if failure:
                self.solver_failed(failure)
            norm = (w @ gram @ w).clamp(min=0).sqrt()  # |g_w|
            combined = (w * gram.diagonal().clamp(min=0).sqrt()).sum()  # sum_i w_i |g_i|: the scale of g_w's terms
            if norm > self.norm_eps * combined:
                coefficients = coefficients + radius / norm * w
            else:
                coefficients = torch.zeros_like(coefficients)
        return (coefficients / RESCALES[self.rescale](self.c)).to(grads)
