"""Gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models with
Gradient Sign Dropout", NeurIPS 2020.
"""

from collections.abc import Mapping, Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import GradientWeighting


class GradDrop(GradientWeighting):
    """Per coordinate, keeps only the task gradients of one sign, positive with probability
    P = 1/2 (1 + sum_i g_i / sum_i |g_i|) (the positive sign purity):

        U ~ uniform(0, 1) per coordinate, mask_i = [P > U][g_i > 0] + [P < U][g_i < 0],
        update = sum_i (leak_i + (1 - leak_i) mask_i) g_i.

    The update is not a combination of the rows, so `combine` is overridden; the weight logged for task i is
    the fraction of its gradient kept, <update_i, g_i> / |g_i|^2 with update_i its masked row (1 when nothing is
    dropped, leak_i when everything is). `leak`: a number for every task, or {task: leak} (0 for tasks not listed).

    The paper applies it to the activations feeding the heads (grad_target=representation, the default here).
    There the purity is computed per element of the flattened gradient, batch elements included; the paper's
    variant summing sign(activation) * gradient over the batch before computing P is not implemented (the rows
    do not carry the features' shape). U comes from torch's global generator.
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], leak: float | Mapping[str, float] = 0.0,
                 grad_target: str = "representation", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        leaks = dict(leak) if isinstance(leak, Mapping) else {t: leak for t in self.tasks}
        unknown = sorted(set(leaks) - set(self.tasks))
        if unknown:
            raise UserError(f"weighting.leak names {unknown}, which are not tasks of this run; tasks: {self.tasks}")
        values = [float(leaks.get(t, 0.0)) for t in self.tasks]
        if not all(0.0 <= v <= 1.0 for v in values):
            raise UserError(f"weighting.leak must lie in [0, 1]; got {leak}")
        self.register_buffer("leak", torch.tensor(values), persistent=False)  # config, not state
        self.leaky = any(v > 0 for v in values)

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.leaky:
            return self.combine_leaky(grads, index)
        # Without leaks the update is, per coordinate, the sum of the positive parts or of the negative parts, and
        # the purity is their ratio: two T x P temporaries and a few passes, where masking each row takes twice that
        positive = grads.clamp(min=0)
        negative = grads - positive
        up, down = positive.sum(0), negative.sum(0)
        purity = up / (up - down)  # = 1/2 (1 + sum g / sum |g|); NaN where every gradient is 0: nothing is kept
        draw = torch.rand(purity.shape, dtype=grads.dtype, device=grads.device)
        above, below = (purity > draw).to(grads.dtype), (purity < draw).to(grads.dtype)
        update = up.mul_(above).addcmul_(down, below)  # the masks as factors: two `where`s cost 3 ms at 294k
        kept = positive.square_() @ above + negative.square_() @ below
        squares = positive.sum(1) + negative.sum(1)
        return update, kept / squares.clamp(min=torch.finfo(grads.dtype).tiny)

    def combine_leaky(self, grads: torch.Tensor, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One T x P float and one T x P bool temporary in all (each fresh one costs its page faults on the CPU)
        scratch = grads.abs()
        purity = 0.5 * (1 + grads.sum(0) / scratch.sum(0))
        draw = torch.rand(purity.shape, dtype=grads.dtype, device=grads.device)
        above, below = purity > draw, purity < draw
        # where(grads > 0, above, below) as bit operations in place: a broadcast where costs 40 times as much
        keep = (grads > 0).bitwise_and_(above ^ below).bitwise_xor_(below)
        leak = self.leak[index].to(grads)[:, None]
        masked = torch.mul(leak + (1 - leak) * keep, grads, out=scratch)
        kept = (masked @ grads.T).diagonal() / (grads @ grads.T).diagonal().clamp(min=torch.finfo(grads.dtype).tiny)
        return masked.sum(0), kept
