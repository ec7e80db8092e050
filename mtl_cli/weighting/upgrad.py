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
    norm_eps: the update is then the mean gradient; torchjd's 1e-4, 0 by default here) and reg_eps I is added, so
    that the QP is strictly convex; with norm_eps=1e-4 the result matches torchjd's UPGrad. Only the shared parameters get the combination; each head gets its
    own task's gradient. The QPs are solved exactly (`solvers.dual_cone_projections`); a failed check is reported
    through `solver_failed` and the best point found is used.
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
        gram = gram / trace if trace > 0 and trace >= self.norm_eps else torch.zeros_like(gram)
        eye = torch.eye(tasks, dtype=gram.dtype)
        projections, failure = solvers.dual_cone_projections(gram + self.reg_eps * eye, self.projected(tasks),
                                                             self.max_iters)
        if failure:
            self.solver_failed(failure)
        return projections.sum(0).to(grads)

    @staticmethod
    def projected(tasks: int) -> torch.Tensor:
        """The weightings of G whose projections onto the dual cone are summed: each task's gradient, 1/T each."""
        return torch.eye(tasks, dtype=torch.float64) / tasks
