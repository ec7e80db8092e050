"""ConFIG.

Liu, Chen, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR 2025
(arXiv:2408.11104, 2024).
"""

import torch

from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting
from mtl_cli.weighting.imtl import equal_projections


class ConFIG(GradientWeighting):
    """The direction with equal cosine to every task gradient, scaled by the sum of their projections on it:
    y solves U y = 1 in least norm (U the unit gradients, `imtl.equal_projections`), g_u = y / |y|, and the update
    is (sum_i g_i . g_u) g_u. Every task gets the same positive cosine with the update, whatever the gradients'
    sizes. As coefficients of G: c = v (1^T M v) / (v^T M v), y = v @ G. Zero when there is no such direction
    (0 in the hull of the unit gradients, where y = 0). Heads get their own task's gradient."""

    loss_weights = False

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = solvers.gramian(grads)
        v = equal_projections(gram, len(gram) * torch.finfo(grads.dtype).eps)
        length2 = v @ gram @ v  # |y|^2
        if length2 <= 0:
            return torch.zeros(len(gram), dtype=grads.dtype, device=grads.device)
        return (v * (gram @ v).sum() / length2).to(grads)
