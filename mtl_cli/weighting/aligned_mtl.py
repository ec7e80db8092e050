"""Aligned-MTL.

Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for Multi-Task Learning", CVPR 2023.
"""

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting

SCALE_MODES = ("min", "median", "rmse")


def balance_transform(gram: torch.Tensor, scale_mode: str, eps: float) -> torch.Tensor:
    """B = sigma U S^-1 U^T from the singular values S and left vectors U of G (M = G G^T = U S^2 U^T): the rows
    of B G = sigma U W^T are orthogonal with equal norms sigma (on the span of G). sigma^2 is the smallest kept S^2
    (min), their median, or their mean (rmse: sigma is then the root mean square of the singular values of G).

    Not from the eigendecomposition of M, whose condition number is G's squared (1e18 for gradient norms over
    1e-6..1e3, beyond even float64: float32 and float64 then gave updates 800 times apart): with D = diag(|g_i|)
    and the cosine matrix C = D^-1 M D^-1 = V L V^T, U and S are those of the small matrix D V L^(1/2). Directions
    are dropped where C's eigenvalues fall under max * T * eps (dependent directions, whatever the gradients'
    sizes); a zero gradient gets a zero row and column. The identity when G is 0."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    live = (norms > 0).nonzero().flatten()
    if len(live) == 0:
        return torch.eye(len(gram), dtype=gram.dtype)
    n = norms[live]
    values, vectors = torch.linalg.eigh(gram[live][:, live] / (n[:, None] * n))
    kept = values > values.max() * len(live) * eps
    u, s, _ = torch.linalg.svd(n[:, None] * vectors[:, kept] * values[kept].sqrt(), full_matrices=False)
    scale = {"min": s.square().min, "median": s.square().median, "rmse": s.square().mean}[scale_mode]()
    transform = torch.zeros_like(gram)
    transform[live[:, None], live] = scale.sqrt() * (u / s) @ u.T
    return transform


class AlignedMTL(GradientWeighting):
    """update = w @ (B G) = (B w) @ G: the preference-weighted sum of the aligned gradients, `balance_transform`.

    `preferences`: relative task preferences, {task: value} (1 for tasks not listed), normalised to sum 1 over
    the tasks present, so that by default w = 1/T, as in torchjd. (The authors' code sums the aligned gradients,
    w = 1: the same direction, T times longer, which only rescales the learning rate.)
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], scale_mode: str = "min", preferences: Mapping[str, float] | None = None,
                 grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        if scale_mode not in SCALE_MODES:
            raise UserError(f"AlignedMTL: scale_mode={scale_mode!r} is not one of {', '.join(SCALE_MODES)}")
        preferences = dict(preferences or {})
        unknown = sorted(set(preferences) - set(self.tasks))
        if unknown:
            raise UserError(f"weighting.preferences names {unknown}, which are not tasks of this run; "
                            f"tasks: {self.tasks}")
        values = torch.tensor([float(preferences.get(t, 1.0)) for t in self.tasks], dtype=torch.float64)
        if (values <= 0).any():
            raise UserError(f"weighting.preferences must be positive; got {preferences}")
        self.scale_mode = scale_mode
        self.register_buffer("preferences", values, persistent=False)  # config, not state

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = solvers.gramian(grads)
        preferences = self.preferences[index].cpu()
        transform = balance_transform(gram, self.scale_mode, torch.finfo(grads.dtype).eps)
        return (transform @ (preferences / preferences.sum())).to(grads.device)
