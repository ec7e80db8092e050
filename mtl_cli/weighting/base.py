"""The weighting interface: the training loop hands over the step's task losses; the weighting fills the gradients.

Loss-based methods only implement `weights` (and, if they learn something, a `regularizer`); `backward` then
back-propagates the weighted sum. Gradient-based methods (which need per-task gradients of the shared parameters
or of the shared features) override `backward` itself, using the model's `shared_parameters()` or `encode`/`decode`
split; the loop does not change. State that must survive a resume lives in parameters and buffers, so the
weighting's `state_dict` is saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Weighting(nn.Module):
    """Combines the losses of the tasks present in a step into one backward pass.

    `losses` maps task name -> scalar loss, for the tasks that have targets in this batch (a subset of `tasks`).
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weight of each task present, as 0-dim tensors (they may carry gradients, e.g. learned weights)."""
        raise NotImplementedError

    def regularizer(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """A term added to the weighted loss (e.g. uncertainty weighting's log-variances); 0 by default."""
        return 0.0

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module, scaler: torch.amp.GradScaler
                 ) -> dict[str, torch.Tensor]:
        """Back-propagates the combined loss into `.grad` (scaled for fp16) and returns the weights used."""
        weights = self.weights(losses)
        total = sum(weights[t] * losses[t] for t in losses) + self.regularizer(losses)
        scaler.scale(total).backward()
        return {t: w.detach() for t, w in weights.items()}

    def epoch_end(self) -> None:
        """Called after every training epoch, for methods that adapt per epoch."""
