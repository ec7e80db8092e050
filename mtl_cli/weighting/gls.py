"""Geometric loss strategy.

Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
Strategy for Multi-Task Learning", CVPR Workshops 2019.
"""

import torch

from mtl_cli.weighting.base import Weighting


class GeometricLossStrategy(Weighting):
    """total = (prod_t L_t)^(1/T), the geometric mean of the losses of the T tasks present.

    As loss weights: d total / d L_t = total / (T L_t), so w_t = total / (T L_t), detached, gives sum_t w_t L_t
    exactly the gradient of the geometric mean. The mean is computed in log space, which does not overflow.
    """

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = torch.stack([loss.detach().float() for loss in losses.values()]).clamp(min=1e-20)
        total = values.log().mean().exp()
        return dict(zip(losses, total / (len(values) * values)))
