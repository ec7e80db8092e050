"""PLE, progressive layered extraction (Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020), over a shared backbone's maps.

PLE stacks CGC levels. Each extraction level has shared experts and experts of each task's own; each task's gate
mixes its own experts and the shared ones into that task's input to the next level, and a shared gate mixes all the
level's experts, every task's included, into the input of the next level's shared experts. The last level has no
shared gate; its task mixtures feed the heads. So the tasks part progressively: a lower level's task experts still
serve every task (through the shared gate), and only the last level's are a task's alone.

The levels are a stack of expert layers on each tapped stage of the backbone, not the backbone's stages: every
expert keeps its stage's shape, so levels stack, and the backbone is PLE's shared input (the paper's embedding
layer). Levels made of the stages themselves would run each task's stream through its own copy of the next stage,
a tower per task at cross-stitch's cost. As in MMoE and CGC here, a gate is a softmax of a linear layer on a pooled
coarsest map, the same weights mixing the experts at every stage; as in the paper, that map is the gate's own
input stream (the backbone's at the first level, where PLE is CGC). Experts are built only at the stages read: a
task's at those its head reads, shared ones at those any head reads. At a stage that a task's head does not read,
the shared gate's softmax runs over the experts there (a departure forced by the pruning; none where all read).

The split (models/base.py): what several tasks reach is trunk (`encode`): the backbone, every level's shared
experts and shared gate, the task experts of every level but the last, and the task gates of every level but the
last two. What one task alone reaches is that task's (`decode`): its gate of the last level but one (it makes the
task's input to the last level), its last-level experts and gate, and its head. So a gradient method sees each
task's exact gradient on everything shared and leaves each task's own path to that task. `levels=1` is CGC exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.models.backbones import Backbone
from mtl_cli.models.cgc import CGC
from mtl_cli.models.mmoe import expert


def mix(logits: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """The softmax(`logits`) [B,n] weighted sum of n maps [B,C,H,W]."""
    gate = torch.softmax(logits, dim=1)[:, :, None, None, None]
    return (gate * torch.stack(candidates, dim=1)).sum(1)


def task_stream(gate: nn.Module, source: torch.Tensor, shared_out: Mapping[int, list[torch.Tensor]],
                own_out: Mapping[int, list[torch.Tensor]]) -> dict[int, torch.Tensor]:
    """A task's input to the next level: at each stage of `own_out` (the task's experts' maps there), its gate's
    mixture, from the pooled `source` (the coarsest map of the task's input to this level), of the shared
    experts' maps (`shared_out`) and its own."""
    logits = gate(source.mean((2, 3)))
    return {j: mix(logits, shared_out[j] + maps) for j, maps in own_out.items()}


class Extraction(nn.Module):
    """One level below the last: shared experts at the `shared_stages`, each task's own experts at the stages its
    head reads (`read`), and the shared gate, whose logits list the shared experts, then each task's in turn."""

    def __init__(self, channels: list[int], shared_stages: list[int], read: Mapping[str, list[int]], experts: int,
                 task_experts: int, reduction: int):
        super().__init__()
        self.shared = nn.ModuleList(nn.ModuleDict({str(j): expert(channels[j], reduction) for j in shared_stages})
                                    for _ in range(experts))
        self.own = nn.ModuleDict({
            task: nn.ModuleList(nn.ModuleDict({str(j): expert(channels[j], reduction) for j in stages})
                                for _ in range(task_experts))
            for task, stages in read.items()})
        self.shared_gate = nn.Linear(channels[-1], experts + task_experts * len(read))
        columns = {j: list(range(experts)) for j in shared_stages}  # the shared gate's logits of the experts at j
        for i, stages in enumerate(read.values()):
            for j in stages:
                columns[j] += range(experts + i * task_experts, experts + (i + 1) * task_experts)
        self.columns = columns

    def experts(self, shared: Mapping[int, torch.Tensor], own: Mapping[str, Mapping[int, torch.Tensor]]):
        """The maps of this level's shared experts ({stage: [maps]}) and of each task's ({task: {stage: [maps]}}),
        from the shared stream and each task's stream."""
        shared_out = {j: [e[str(j)](x) for e in self.shared] for j, x in shared.items()}
        own_out = {task: {j: [e[str(j)](x) for e in self.own[task]] for j, x in own[task].items()} for task in self.own}
        return shared_out, own_out

    def shared_stream(self, source: torch.Tensor, shared_out, own_out) -> dict[int, torch.Tensor]:
        """The next level's shared input: at each stage, the shared gate's mixture (from the pooled `source`, the
        coarsest map of this level's shared input) of all the experts there."""
        logits = self.shared_gate(source.mean((2, 3)))
        return {j: mix(logits[:, self.columns[j]],
                       maps + [m for task in self.own for m in own_out[task].get(j, [])])
                for j, maps in shared_out.items()}


class PLE(CGC):
    """image -> backbone -> `levels` - 1 extraction levels on each stage read -> CGC's last level (shared experts,
    then per task: its gate's mixture of the shared experts and its own) -> head.

    `encode` returns named maps (`names`, fixed at build): the last level's shared experts; with levels=1 the
    backbone's maps; else the experts of the level below the last, and the maps its task gates read."""

    def __init__(self, backbone: Callable[[], Backbone], heads: Mapping[str, Callable[..., nn.Module]],
                 experts: int = 2, task_experts: int = 1, levels: int = 2, reduction: int = 4):
        if int(levels) < 1:
            raise UserError(f"architecture.levels={levels}: give 1 or more extraction levels (1 is CGC)")
        super().__init__(backbone, heads, experts, task_experts, reduction)
        channels = self.backbone.channels
        self.last = len(channels) - 1
        self.stages_read = sorted({j for stages in self.read.values() for j in stages})
        self.lower = nn.ModuleList(
            Extraction(channels, self.stages_read, self.read, self.num_experts, int(task_experts), reduction)
            for _ in range(int(levels) - 1))
        self.lower_gates = nn.ModuleList(  # per level below the last: task -> its gate
            nn.ModuleDict({task: nn.Linear(channels[-1], self.num_experts + int(task_experts)) for task in heads})
            for _ in range(int(levels) - 1))
        self.names = self.feature_names()

    def feature_names(self) -> list[tuple]:
        """What `encode` returns, in order (`decode` reads it by these names)."""
        names = [("shared", j, e) for j in self.stages_read for e in range(self.num_experts)]
        if not self.lower:
            return names + [("map", j) for j in self.stages_read]
        names += [("below shared", j, e) for j in self.stages_read for e in range(self.num_experts)]
        names += [("below", task, j, e) for task in self.heads for j in self.read[task]
                  for e in range(len(self.own_experts[task]))]
        return names + ([("stream", task) for task in self.heads] if len(self.lower) > 1 else [("map", self.last)])

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        maps = self.backbone(image)
        named = {("map", j): maps[j] for j in self.stages_read}
        shared = {j: maps[j] for j in self.stages_read}
        own = {task: {j: maps[j] for j in stages} for task, stages in self.read.items()}
        for k, level in enumerate(self.lower):
            shared_out, own_out = level.experts(shared, own)
            if k < len(self.lower) - 1:
                own = {task: task_stream(gate, own[task][self.last], shared_out, own_out[task])
                       for task, gate in self.lower_gates[k].items()}
            else:  # the tasks' gates of this level are theirs alone: decode mixes it
                named.update({("below shared", j, e): m for j, ms in shared_out.items() for e, m in enumerate(ms)})
                named.update({("below", task, j, e): m for task, stages in own_out.items()
                              for j, ms in stages.items() for e, m in enumerate(ms)})
                named.update({("stream", task): stages[self.last] for task, stages in own.items()})
            shared = level.shared_stream(shared[self.last], shared_out, own_out)
        named.update({("shared", j, e): experts[j](shared[j]) for j in self.stages_read
                      for e, experts in enumerate(self.experts)})
        return [named[name] for name in self.names]

    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        named = dict(zip(self.names, features))
        outputs = {}
        for task, head in self.heads.items():
            stream = self.last_input(named, task)
            logits = self.gates[task](stream[self.last].mean((2, 3)))
            mixed = [None] * (self.last + 1)  # a stage the head does not read stays None
            for j, x in stream.items():
                shared = [named["shared", j, e] for e in range(self.num_experts)]
                mixed[j] = mix(logits, shared + [own[str(j)](x) for own in self.own_experts[task]])
            outputs[task] = head(mixed, size)
        return outputs

    def last_input(self, named: Mapping[tuple, torch.Tensor], task: str) -> dict[int, torch.Tensor]:
        """{stage: map}, the task's input to the last level: the backbone's maps, or the mixture of the level
        below by the task's gate there (from the pooled coarsest map of the task's input to that level)."""
        if not self.lower:
            return {j: named["map", j] for j in self.read[task]}
        source = named["stream", task] if len(self.lower) > 1 else named["map", self.last]
        shared = {j: [named["below shared", j, e] for e in range(self.num_experts)] for j in self.read[task]}
        own = {j: [named["below", task, j, e] for e in range(len(self.own_experts[task]))] for j in self.read[task]}
        return task_stream(self.lower_gates[-1][task], source, shared, own)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from super().shared_parameters()
        yield from self.lower.parameters()
        for gates in self.lower_gates[:-1]:
            yield from gates.parameters()

    def parts(self) -> dict[str, list[nn.Module]]:
        below = [self.lower_gates[-1]] if self.lower_gates else []
        return {"shared": [self.backbone, self.experts, self.lower, *self.lower_gates[:-1]],
                **{t: [*(gates[t] for gates in below), self.gates[t], self.own_experts[t], h]
                   for t, h in self.heads.items()}}
