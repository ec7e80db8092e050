"""UPGrad.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232, 2024.
"""

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting


class UPGrad(GradientWeighting):
    """Each task gradient, weighted 1/T, is projected onto the dual cone of all of them (the directions that
    conflict with none) and the projections are summed: c = sum_i v_i, v_i = argmin_{v >= e_i / T} v^T M v.
    The update never conflicts with a task gradient, and equals the mean gradient when none conflict.

    As torchjd (the authors' library) does, M is divided by its trace (or zeroed when the trace, |G|_F^2, is below
    norm_eps: the update is then the mean gradient; torchjd's 1e-4, 0 by default here) and a ridge reg_eps I is
    added, so that the QP is strictly convex; with norm_eps=1e-4 the result matches torchjd's UPGrad (whenever every
    task's |g_i|^2 is at least sqrt(reg_eps) |G|_F^2: see below). Only the shared parameters get the combination;
    each head gets its own task's gradient. The QPs are solved exactly (`solvers.dual_cone_projections`); a failed
    check is reported through `solver_failed` and the best point found is used.

    Departure from torchjd: task i's ridge is capped at sqrt(reg_eps) |g_i|^2 / |G|_F^2, i.e. at sqrt(reg_eps) (1% by
    default) of its own squared norm (a task without gradient gets none; its weight stays at its bound). torchjd's
    reg_eps swamps a task whose squared norm is below reg_eps |G|_F^2: its conflicts are then ignored (a task 1e-3
    the size of another got cos(g_i, update) = -0.5). Capped, a task of any size conflicts with the update by at
    most about sqrt(reg_eps) |cos| (relative to its own norm), as a task of squared norm sqrt(reg_eps) |G|_F^2 did
    before; every larger task keeps torchjd's ridge.
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1,
                 norm_eps: float = 0.0, reg_eps: float = 1e-4, max_iters: int = 10_000):
        super().__init__(tasks, grad_target, grad_every)
        if norm_eps < 0 or reg_eps <= 0:
            raise UserError(f"UPGrad: norm_eps={norm_eps} must be >= 0 and reg_eps={reg_eps} > 0 (it makes the "
                            "projection's QP strictly convex)")
        self.norm_eps, self.reg_eps, self.max_iters = float(norm_eps), float(reg_eps), int(max_iters)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = solvers.gramian(grads)
        tasks, trace = gram.shape[0], gram.trace()
        ridge = torch.full((tasks,), self.reg_eps, dtype=gram.dtype)
        if trace > 0 and trace >= self.norm_eps:
            gram = gram / trace
            ridge = torch.minimum(ridge, self.reg_eps ** 0.5 * gram.diagonal())
        else:
            gram = torch.zeros_like(gram)
        projections, failure = solvers.dual_cone_projections(gram + torch.diag(ridge), self.projected(tasks),
                                                             self.max_iters)
        if failure:
            self.solver_failed(failure)
        return projections.sum(0).to(grads)

    @staticmethod
    def projected(tasks: int) -> torch.Tensor:
        """The weightings of G whose projections onto the dual cone are summed: each task's gradient, 1/T each."""
        return torch.eye(tasks, dtype=torch.float64) / tasks
