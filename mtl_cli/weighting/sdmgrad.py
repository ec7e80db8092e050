"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

Xiao, Ban and Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms", NeurIPS
2023.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting
from mtl_cli.weighting.modo import simplex_part


class SDMGrad(GradientWeighting):
    """The update (w + lambda_ w0) @ G / (1 + lambda_), with w0 uniform (the target direction, the mean gradient) and
    w on the simplex minimising 1/2 |(w + lambda_ w0) G|^2 by `iterations` steps of projected SGD with momentum
    (learning rate lr, momentum, restarted each step; w itself carries over). The objective's matrix is G1 G2^T of
    two independent batches (the samples the loop draws, `batches_per_step = 3`), an unbiased estimate of the
    expected Gramian, divided by the squared mean of sqrt(|g1_t| |g2_t|) so that lr does not depend on the gradients'
    size; G is the step's own batch.

    Defaults: lambda_ 0.3, 20 iterations, momentum 0.5 (the paper's experiments, LibMTL), lr 10 (torchjd's reading
    of the official code; LibMTL uses 5). Departures: the official code's scale is the mean of sqrt(g1_t . g2_t) with
    negative products clamped to 0 (the same where the two batches' gradients point alike), which collapses when
    they do not and blows the step up; and it divides by (scale^2 + 1e-8), which freezes w once the gradients are
    below about 1e-4. Here the sizes are the rows' norms, and w stays put when every gradient is zero. Heads get their own task's gradient of the step's batch."""

    batches_per_step = 3
    loss_weights = False

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", lambda_: float = 0.3,
                 iterations: int = 20, lr: float = 10.0, momentum: float = 0.5):
        super().__init__(tasks, grad_target)
        self.lambda_, self.iterations = float(lambda_), int(iterations)
        self.lr, self.momentum = float(lr), float(momentum)
        self.register_buffer("simplex_weights", torch.full((len(self.tasks),), 1 / len(self.tasks),
                                                           dtype=torch.float64))

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int], *samples: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = samples
        matrix = solvers.gramian(first, second)
        sizes = (first.double().norm(dim=1) * second.double().norm(dim=1)).cpu()  # |g1_t| |g2_t|
        scale = sizes.sqrt().mean() ** 2
        weights, mass = simplex_part(self.simplex_weights, index)
        target = torch.full_like(weights, 1 / len(index))
        if scale > 0:
            matrix, velocity = matrix / scale, torch.zeros_like(weights)
            for _ in range(self.iterations):
                velocity = self.momentum * velocity + matrix @ (weights + self.lambda_ * target)
                weights = solvers.project_to_simplex(weights - self.lr * velocity)
        self.simplex_weights[index] = weights * mass
        coefficients = (weights + self.lambda_ * target) / (1 + self.lambda_)
        return coefficients.to(grads) @ grads, coefficients
