"""Learning to Branch (Guo, Lee and Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020): the tree of
shared and task-specific backbone stages, searched while training.

Every backbone stage has T nodes (copies); node t of stage k reads the output of one parent node of stage k - 1,
chosen by a hard Gumbel-softmax sample over its learned logits (straight-through: the forward uses the one-hot
choice, the backward the soft sample's gradient). Children that pick the same parent share it: the sampled choices
form a tree whose leaves, the last stage's nodes, are the T tasks' columns; a node no child picks is pruned. In eval
mode every node reads its most likely parent (the argmax of its logits): the derived tree, deterministic, which
`mtl eval`, `predict` and `export` use, and which the run logs at each epoch (during the warm-up, the mean of the
parents, as trained).

Temperature tau = temperature / sqrt(epoch + 1), where temperature defaults to LibMTL's max_epochs / 20 at 100
epochs. The first `warmup_epochs` epochs every node reads the mean of its parents and the logits get no gradient
(LibMTL sums the parents): the nodes' weights train before the choices start. The epoch comes from the run
(`start_epoch`); draws come from torch's global generator, which the checkpoint holds, so a resumed run samples
what the straight run would.

Not here: the paper's second phase, retraining the derived tree alone from scratch (the pruned nodes are still
computed, as every node is: the tree is searched, not built smaller).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn import functional

from mtl_cli.errors import UserError
from mtl_cli.models.backbones import Backbone
from mtl_cli.models.base import MultiTaskModel, make_heads
from mtl_cli.models.cross_stitch import CrossStitch

log = logging.getLogger("mtl")


class Branching(nn.Module):
    """The parent choices: logits [stages, T children, T parents] -> choice matrices of the same shape."""

    def __init__(self, stages: int, tasks: int, temperature: float, warmup_epochs: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(stages, tasks, tasks))  # every parent equally likely at first
        self.temperature, self.warmup_epochs = temperature, warmup_epochs
        self.epoch = 0
        # In the checkpoint, so that a model saved during the warm-up is evaluated as it trained (a tensor, not a
        # branch: torch.export captures both cases)
        self.register_buffer("searching", torch.tensor(warmup_epochs == 0))

    def start(self, epoch: int) -> None:
        self.epoch = epoch
        self.searching.fill_(epoch >= self.warmup_epochs)

    @property
    def tau(self) -> float:
        return self.temperature / math.sqrt(self.epoch + 1)

    def forward(self) -> torch.Tensor:
        mean = torch.full_like(self.logits, 1 / self.logits.shape[-1]).detach()
        if not self.training:
            tree = functional.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).to(self.logits.dtype)
            return torch.where(self.searching, tree, mean)
        if self.epoch < self.warmup_epochs:
            return mean
        return functional.gumbel_softmax(self.logits, tau=self.tau, hard=True, dim=-1)

    def parents(self) -> list[list[int]]:
        """The derived tree: for each stage after the first, each node's parent."""
        return self.logits.argmax(-1).tolist()


class LearningToBranch(MultiTaskModel):
    """image -> T nodes per backbone stage, each reading one parent node of the stage before -> head t on node t of
    the last stage."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 temperature: float = 5.0, warmup_epochs: int = 1):
        super().__init__()
        if not float(temperature) > 0 or int(warmup_epochs) < 0:
            raise UserError(f"architecture.temperature={temperature} must be above 0 and architecture.warmup_epochs="
                            f"{warmup_epochs} at least 0 (defaults 5.0 and 1)")
        self.columns = nn.ModuleDict({task: backbone() for task in heads})
        first = next(iter(self.columns.values()))
        self.last_stage = first.out_indices[-1]
        if self.last_stage < 1:
            raise UserError("architecture=ltb branches between backbone stages, but the features come from stage 0 "
                            "alone: give backbone.out_indices a later stage")
        self.branching = Branching(self.last_stage, len(heads), float(temperature), int(warmup_epochs))
        self.heads = make_heads(heads, first.channels, first.strides)

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        self.branching.start(epoch)
        if self.branching.searching:
            log.info(f"ltb: epoch {epoch + 1}, tau {self.branching.tau:.3g}, tree {self.tree()}")

    def tree(self) -> str:
        """Each task's path of nodes from the first stage to its own leaf, e.g. 'depth 0-0-1-1'."""
        tasks, parents = list(self.heads), self.branching.parents()
        paths = []
        for leaf, task in enumerate(tasks):
            path = [leaf]
            for stage in reversed(parents):
                path.append(stage[path[-1]])
            paths.append(f"{task} " + "-".join(map(str, reversed(path))))
        return ", ".join(paths)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        columns = list(self.columns.values())
        choices = self.branching()
        xs = [c.stages[0](c.normalize(image)) for c in columns]
        outs: list[list[torch.Tensor]] = [[] for _ in columns]
        for k in range(self.last_stage + 1):
            if k > 0:
                maps = torch.stack([c.to_map(x) for c, x in zip(columns, xs)])  # [T parents, B, C, H, W]
                read = torch.einsum("ts,sbchw->tbchw", choices[k - 1].to(maps.dtype), maps).unbind(0)
                xs = [c.stages[k](c.from_map(m, x)) for c, m, x in zip(columns, read, xs)]
            if k in columns[0].out_indices:
                for out, c, x in zip(outs, columns, xs):
                    out.append(c.to_map(x))
        return [m for out in outs for m in out]

    decode = CrossStitch.decode  # head t reads the maps of column t, which encode lists column by column

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.columns.parameters()
        yield from self.branching.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"shared": [self.branching], **{t: [self.columns[t], h] for t, h in self.heads.items()}}
