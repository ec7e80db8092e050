"""Penalty-based boundary intersection (PBI).

Zhang and Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition", IEEE Transactions on
Evolutionary Computation, 2007 (the PBI decomposition, section II-C), used here as a loss weighting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import Weighting
from mtl_cli.weighting.cosmos import per_task

F64 = torch.float64
RAY = 1e-8  # within this distance of the ray, relative to |L - z|, the penalty's gradient is scaled down to 0


class PenaltyBoundaryIntersection(Weighting):
    """total = d1 + theta d2, with the losses L measured from a reference point z along the preference's unit
    direction r: d1 = (L - z) . r is the progress along the ray, d2 = |L - z - d1 r| the distance from it. The
    penalty pulls the losses onto the ray, so the trade-off between the tasks follows the preference.

    It is back-propagated as the weighted sum with the detached weights w = d total / dL (the same gradient):

        w = r + theta p / |p|,   p = L - z - d1 r   (the losses' offset from the ray, orthogonal to r).

    total is homogeneous in L - z, so sum_t w_t (L_t - z_t) = total; and w . r = 1. A task below the ray gets a
    negative weight when theta is large enough: d2's gradient pushes its loss up, back toward the ray. On the ray
    d2 has no gradient: within RAY |L - z| of it the penalty's gradient fades linearly to 0 (torchjd's PBI smooths
    it the same way with an absolute 1e-12 under the square root).

    preference: relative values per task (tasks not listed 1.0; uniform by default), normalised to a unit vector
    over the tasks present; reference: z per task (tasks not listed 0: the origin, as losses are non-negative).
    theta = 5, the value of the MOEA/D paper's experiments (and torchjd's documented choice).
    """

    def __init__(self, tasks: Sequence[str], theta: float = 5.0, preference: Mapping[str, float] | None = None,
                 reference: Mapping[str, float] | None = None):
        super().__init__(tasks)
        if theta < 0:
            raise UserError(f"PenaltyBoundaryIntersection: theta={theta} must be >= 0 (0: the projection d1 alone)")
        self.theta = float(theta)
        self.preference = per_task(self.tasks, preference, "preference")  # from the config: not state
        self.reference = per_task(self.tasks, reference, "reference", default=0.0)
        if (self.preference < 0).any() or not (self.preference > 0).any():
            raise UserError(f"PenaltyBoundaryIntersection: the preference must be non-negative and not all zero; "
                            f"got {preference}")

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        index = [self.tasks.index(t) for t in losses]
        values = torch.stack([loss.detach() for loss in losses.values()]).to("cpu", F64)
        weights = pbi_weights(values - self.reference[index], self.preference[index], self.theta)
        first = next(iter(losses.values()))
        return dict(zip(losses, weights.to(first.device, torch.promote_types(first.dtype, torch.float32))))


def pbi_weights(shifted: torch.Tensor, preference: torch.Tensor, theta: float) -> torch.Tensor:
    """d/dL (d1 + theta d2) at L - z = shifted."""
    if preference.norm() == 0:  # none of the tasks present has a share of the preference
        preference = torch.ones_like(preference)
    direction = preference / preference.norm()
    offset = shifted - (shifted @ direction) * direction
    return direction + theta * offset / torch.maximum(offset.norm(), RAY * shifted.norm()).clamp(min=1e-300)
