"""Aligned-MTL.

Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for Multi-Task Learning", CVPR 2023.
"""

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import GradientWeighting

SCALE_MODES = ("min", "median", "rmse")


def balance_transform(gram: torch.Tensor, scale_mode: str, eps: float) -> torch.Tensor:
    """B = sigma V Lambda^{-1/2} V^T from M = G G^T = V Lambda V^T, over the eigenvalues above
    max(Lambda) * T * eps: the rows of B G are orthogonal with equal norms sigma (on the span of G). sigma^2 is the
    smallest kept eigenvalue (min), their median, or their mean (rmse: sigma is then the root mean square of the
    singular values of G). The identity when G is 0."""
    values, vectors = torch.linalg.eigh(gram)
    kept = values > values.max() * len(gram) * eps
    if not kept.any():
        return torch.eye(len(gram), dtype=gram.dtype)
    values, vectors = values[kept], vectors[:, kept]
    scale = {"min": values.min, "median": values.median, "rmse": values.mean}[scale_mode]()
    return scale.sqrt() * (vectors / values.sqrt()) @ vectors.T


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
        gram = (grads @ grads.T).double().cpu()
        preferences = self.preferences[index].cpu()
        transform = balance_transform(gram, self.scale_mode, torch.finfo(grads.dtype).eps)
        return (transform @ (preferences / preferences.sum())).to(grads.device)
