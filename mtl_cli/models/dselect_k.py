"""DSelect-k (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi, "DSelect-k: Differentiable
Selection in the Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021): MMoE with each task's
softmax gate replaced by one that selects at most k of the n experts, differentiably.

The gate holds k single-expert selectors. Selector i has m = ceil(log2 n) logits z_i1..z_im, each put through the
smooth step S (0 up to -gamma/2, 1 from gamma/2, the cubic -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 between), and
gives expert e the weight r_i(e) = prod_b (S(z_ib) if bit b of e is 1 else 1 - S(z_ib)) (bit 1 the most
significant): a point of the simplex, on one expert alone once every S(z_ib) is 0 or 1, where the flat ends of S
keep it. The gate's weights are sum_i softmax(w)_i r_i, so at most k experts weigh. z and w are linear in the
routing input (the paper's per-example gate; the input is MMoE's here, the pooled coarsest backbone map), and
start as in the official code: uniform within +-gamma/100 and +-0.05.

Training adds to each task's loss (`task_losses`) the paper's regulariser `entropy` * sum_i H(r_i), which drives
each selector to one expert, and, when n is not a power of two (codes of m bits that name no expert can take
weight), the official code's sum_i 1 / sum_e r_i(e), here less its floor k so that it is zero once the selectors
sit on experts and the logged loss keeps its meaning (each sum floored at 1e-6: a selector saturated on codes that
name no expert costs a large finite loss, not inf). Both are batch means (the official code sums over the batch,
which ties the weight to the batch size). decode returns the selectors beside the outputs (`GatedOutputs`), so
task_losses finds those of the forward that made the outputs.

Not here: the static gate (z and w as plain parameters), and skipping the experts a gate leaves out (they are the
trunk, computed for every task).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.models.backbones import Backbone
from mtl_cli.models.mmoe import MMoE

EPSILON = 1e-6  # inside the entropy's log, as in the official code


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """0 for t <= -gamma/2, 1 for t >= gamma/2, and between them the cubic that joins the two with zero slope."""
    cubic = t * (1.5 / gamma - 2.0 * t * t / gamma ** 3) + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, cubic))


class GatedOutputs(dict):
    """{task: output}, with `selectors` = {task: its gate's selector weights [B,k,n]} beside the keys."""

    def __init__(self, outputs: Mapping[str, torch.Tensor], selectors: Mapping[str, torch.Tensor]):
        super().__init__(outputs)
        self.selectors = dict(selectors)


class DSelectKGate(nn.Module):
    """Routing input [B,F] -> (expert weights [B,n], the k selectors' weights [B,k,n])."""

    def __init__(self, in_features: int, experts: int, k: int, gamma: float = 1.0):
        super().__init__()
        self.k, self.gamma = k, gamma
        self.bits = math.ceil(math.log2(experts))
        codes = [[(e >> (self.bits - 1 - b)) & 1 for b in range(self.bits)] for e in range(experts)]
        self.register_buffer("codes", torch.tensor(codes, dtype=torch.bool), persistent=False)  # [n, m]
        self.z = nn.Linear(in_features, k * self.bits)
        self.w = nn.Linear(in_features, k)
        for parameter in self.z.parameters():
            nn.init.uniform_(parameter, -gamma / 100, gamma / 100)
        for parameter in self.w.parameters():
            nn.init.uniform_(parameter, -0.05, 0.05)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = smooth_step(self.z(x).view(x.shape[0], self.k, 1, self.bits), self.gamma)
        selectors = torch.where(self.codes, step, 1 - step).prod(-1)  # [B,k,n]
        return (torch.softmax(self.w(x), dim=1)[:, :, None] * selectors).sum(1), selectors


class DSelectK(MMoE):
    """image -> backbone -> E experts per stage (shared) -> per task: its DSelect-k gate's mixture -> head."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 experts: int = 4, k: int = 2, gamma: float = 1.0, entropy: float = 1e-6, reduction: int = 4):
        if int(experts) < 2 or not 1 <= int(k) <= int(experts):
            raise UserError(f"architecture.experts={experts}, architecture.k={k}: DSelect-k selects k experts of "
                            "n >= 2, 1 <= k <= n (the official example: k=2 of 4)")
        if float(gamma) <= 0 or float(entropy) < 0:
            raise UserError(f"architecture.gamma={gamma}, architecture.entropy={entropy}: give gamma > 0 (the smooth "
                            "step's width, 1 in the paper) and entropy >= 0")
        super().__init__(backbone, heads, experts, reduction)
        self.entropy = float(entropy)
        self.gates = nn.ModuleDict({task: DSelectKGate(self.backbone.channels[-1], self.num_experts, int(k),
                                                       float(gamma)) for task in heads})

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> GatedOutputs:
        *expert_maps, coarsest = features
        pooled = coarsest.mean((2, 3))
        stacked = [torch.stack(expert_maps[j:j + self.num_experts], dim=1)  # [B,E,C,H,W] per stage
                   for j in range(0, len(expert_maps), self.num_experts)]
        outputs, selectors = {}, {}
        for task, head in self.heads.items():
            weights, selectors[task] = self.gates[task](pooled)
            weights = weights[:, :, None, None, None]
            outputs[task] = head([(weights * s).sum(1) for s in stacked], size)
        return GatedOutputs(outputs, selectors)

    def task_losses(self, tasks: Mapping, outputs: Mapping, batch: Mapping) -> dict[str, torch.Tensor]:
        """Each task's loss plus its gate's regulariser, from the selectors beside `outputs`."""
        losses = super().task_losses(tasks, outputs, batch)
        return {task: loss + self.regulariser(outputs.selectors[task]) for task, loss in losses.items()}

    def regulariser(self, selectors: torch.Tensor) -> torch.Tensor:
        """The batch mean of `entropy` * sum_i H(r_i), plus sum_i (1 / sum_e r_i(e) - 1) when the codes name
        more than the n experts (`selectors` [B,k,n])."""
        term = -self.entropy * (selectors * torch.log(selectors + EPSILON)).sum((1, 2)).mean()
        if selectors.shape[-1] & (selectors.shape[-1] - 1):  # n is not a power of two
            term = term + (1 / selectors.sum(-1).clamp_min(EPSILON) - 1).sum(1).mean()
        return term
