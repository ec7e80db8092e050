"""Random loss weighting.

Lin, Ye, Xu, Shi, Zhang and Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
Learning", TMLR 2022.
"""

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import Weighting


class RandomLossWeighting(Weighting):
    """w = softmax(z) over the tasks present, with z ~ N(0, I) drawn afresh at every step.

    z is drawn for every task, present or not, from torch's global CPU generator (which the trainer seeds and
    checkpoints), so the stream of draws does not depend on which tasks a batch has. sum_to: `one`, as in the
    paper and LibMTL (the weights sum to 1, so the step is 1/T of equal weighting's), or `tasks` (they sum to the
    number of tasks present, like ew's and dwa's, so each weight is 1 on average).
    """

    def __init__(self, tasks: Sequence[str], sum_to: str = "one"):
        super().__init__(tasks)
        if sum_to not in ("one", "tasks"):
            raise UserError(f"RandomLossWeighting: sum_to={sum_to!r} must be 'one' or 'tasks'")
        self.sum_to = sum_to

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        draw = torch.randn(len(self.tasks))
        weights = torch.softmax(draw[[self.tasks.index(t) for t in losses]], dim=0)
        if self.sum_to == "tasks":
            weights = weights * len(losses)
        return dict(zip(losses, weights.to(next(iter(losses.values())).device)))
