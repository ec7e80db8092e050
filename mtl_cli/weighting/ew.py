"""Equal weighting: every task's loss counts once."""

import torch

from mtl_cli.weighting.base import Weighting


class EqualWeighting(Weighting):
    """total = sum_t L_t."""

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: torch.ones((), device=loss.device) for t, loss in losses.items()}
