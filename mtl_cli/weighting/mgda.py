"""MGDA and MGDA-UB.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
"""

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientWeighting):
    """The update is the min-norm point of the convex hull of the task gradients: c = argmin_{c in simplex}
    |c @ G|^2, a direction that decreases every task's loss (or zero at a Pareto-stationary point). With
    grad_target=representation it is MGDA-UB, the paper's cheaper upper bound.

    normalization: Sener's optional gradient normalisations (not in the paper; `gradient_normalizers` in the
    official code): `l2` divides each row by its norm, `loss` by its loss, `loss+` by both, before solving. As in
    the official code, the solution then weighs the raw gradients (the weighted sum of the raw losses is what it
    back-propagates), so the update is c @ G on the raw rows. A row that cannot be normalised (zero norm or a
    non-positive loss) stays as it is. The weights sum to 1 and are loss weights: the heads get them too.

    The QP is solved exactly (`solvers.min_norm_point`); a failed check is reported through `solver_failed` and the
    best point found is used.
    """

    loss_weights = True

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1,
                 normalization: str = "none", max_iters: int = 10_000):
        super().__init__(tasks, grad_target, grad_every)
        if normalization not in NORMALIZATIONS:
            raise UserError(f"MGDA: normalization={normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        self.normalization, self.max_iters = normalization, int(max_iters)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = solvers.gramian(grads)
        scale = self.normalizers(gram, losses.detach().to("cpu", torch.float64))
        coefficients, failure = solvers.min_norm_point(gram / torch.outer(scale, scale), self.max_iters)
        if failure:
            self.solver_failed(failure)
        return coefficients.to(grads)

    def normalizers(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        norms = gram.diagonal().clamp(min=0).sqrt()
        scale = {"none": torch.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}
        scale = scale[self.normalization]
        return torch.where(scale.isfinite() & (scale > 0), scale, torch.ones_like(scale))
