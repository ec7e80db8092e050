"""Scale-invariant loss: the sum of the tasks' log losses.

The "SI" baseline of Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (and of Liu et al.,
"FAMO", NeurIPS 2023): minimising sum_t log L_t is invariant to rescaling any task's loss.
"""

from collections.abc import Sequence

import torch

from mtl_cli.weighting.base import Weighting


class ScaleInvariant(Weighting):
    """total = sum_t log L_t, back-propagated as the weighted sum with w_t = 1 / L_t (detached): the same gradient,
    sum_t grad L_t / L_t, so multiplying a task's loss by any constant changes nothing. A loss at or below `eps`
    (a task solved on this batch) is weighted 1 / eps rather than dividing by zero."""

    def __init__(self, tasks: Sequence[str], eps: float = 1e-8):
        super().__init__(tasks)
        self.eps = float(eps)

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: 1 / loss.detach().clamp(min=self.eps) for t, loss in losses.items()}
