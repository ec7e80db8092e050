"""Several processes, one run: torch.distributed with one process per device (NCCL between GPUs, gloo on the CPU).

Every rank reads its shard of each global batch (data/seeding.py) and runs the same step. The ranks combine what
they computed at three explicit points of the step, not through DistributedDataParallel's reducer: the step runs
`model.forward_cut`, not the module call that DDP hooks, and gradient methods write `.grad` themselves after T
trunk passes, so the reducer would see none of it. The points (`Group`):

1. `losses`: each task loss's value becomes its mean over the ranks while its gradient stays this rank's. Every
   weighting then computes the same weights on every rank, whatever it does with the values (softmax, logs, the
   history of DWA and FAMO), and its learned parameters get the gradient of the global objective: for any f,
   mean_r f'(mean L) dL_r = f'(mean L) d(mean L).
2. `matrix`, before `aggregate`: the task-gradient matrix averaged over the ranks (exact target), or the ranks'
   feature columns gathered side by side (representation target: each rank's samples are its own columns), so
   every rank computes the same coefficients; `columns` hands each rank its own columns of the update back.
3. `average_grads`, after the backward: one bucketed all-reduce of every gradient that is still this rank's own.

A single process gets `Alone`, whose points hand their input back: one process pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from mtl_cli.losses import mean_count

BUCKET_ELEMENTS = 2**23  # 32 MB of float32 per all-reduce, about DDP's default bucket (25 MB)


class Alone:
    """One process: nothing to combine."""
    rank, world, main = 0, 1, True

    def losses(self, losses: dict[str, torch.Tensor], tasks: Mapping, outputs: Mapping, batch: Mapping) -> dict:
        return losses

    def matrix(self, matrix: torch.Tensor, target: str) -> torch.Tensor:
        return matrix

    def columns(self, update: torch.Tensor, target: str) -> torch.Tensor:
        return update

    def mark_global(self, params: Iterable[torch.Tensor]) -> None:
        """`params` hold gradients that are the same on every rank already (the exact target's update)."""

    def average_grads(self, params: Iterable[torch.Tensor]) -> None:
        pass

    def agree(self, received: int | None) -> int | None:
        """A stop request (a signal number) one rank received is every rank's."""
        return received

    def total(self, values: torch.Tensor) -> torch.Tensor:
        return values


class Group(Alone):
    """This process's place in the initialised default process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.already_global: set[int] = set()

    def losses(self, losses: dict[str, torch.Tensor], tasks: Mapping, outputs: Mapping, batch: Mapping) -> dict:
        """Each rank's loss weighs by the number of terms it is the mean of (valid pixels, labelled samples:
        losses.mean_count), so that the value is the mean over the global batch's terms, as one process computes
        it. A rank without a task's labels contributes a zero gradient through a graph-connected zero loss (every
        rank must take part in the collectives that follow)."""
        names = list(tasks)
        device = next(iter(losses.values())).device if losses else torch.device("cpu")
        own = torch.zeros(3, len(names), dtype=torch.float64, device=device)  # sum of terms, terms, present
        for i, name in enumerate(names):
            if name in losses:
                count = mean_count(tasks[name].loss, *tasks[name].select(outputs[name], batch))
                own[:, i] = torch.stack([losses[name].detach().double() * count, torch.as_tensor(count).double(),
                                         torch.ones((), dtype=torch.float64, device=device)])
        both = own.clone()
        dist.all_reduce(both)
        combined = {}
        for i, name in enumerate(names):
            total_sum, terms, present = both[:, i].tolist()
            if not present:
                continue
            loss = losses[name] if name in losses else zero_loss(outputs[name])
            if terms == 0:  # no labelled term in the whole batch: the zero loss one process has too
                combined[name] = loss
                continue
            share = loss * (self.world * float(own[1, i]) / terms)  # the ranks' mean gradient is the batch's
            combined[name] = share + (torch.as_tensor(total_sum / terms, dtype=share.dtype) - share.detach())
        return combined

    def matrix(self, matrix: torch.Tensor, target: str) -> torch.Tensor:
        if target == "params":
            dist.all_reduce(matrix)
            return matrix.div_(self.world)
        parts = [torch.empty_like(matrix) for _ in range(self.world)]
        dist.all_gather(parts, matrix.contiguous())
        return torch.cat(parts, dim=1).div_(self.world)

    def columns(self, update: torch.Tensor, target: str) -> torch.Tensor:
        if target == "params":
            return update
        width = update.shape[-1] // self.world
        return update[..., self.rank * width:(self.rank + 1) * width] * self.world

    def mark_global(self, params: Iterable[torch.Tensor]) -> None:
        self.already_global.update(id(p) for p in params)

    def average_grads(self, params: Iterable[torch.Tensor]) -> None:
        """The mean over ranks of each gradient (a rank without one counts zeros; a parameter no rank has a
        gradient for keeps none, as in a single process), in buckets of float32 that are all-reduced together."""
        params = [p for p in params if p.requires_grad and id(p) not in self.already_global]
        self.already_global.clear()
        if not params:
            return
        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        pending = [(dist.all_reduce(has, async_op=True), has, [])]
        for bucket in buckets(params):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                              for p in bucket])
            pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))
        for work, _, _ in pending:
            work.wait()
        for _, flat, bucket in pending[1:]:
            for p, piece in zip(bucket, flat.div_(self.world).split([p.numel() for p in bucket])):
                p.grad = piece.view_as(p).to(p.dtype)
        for p, present in zip(params, has.tolist()):
            if not present:
                p.grad = None

    def agree(self, received: int | None) -> int | None:
        flag = torch.tensor([received or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def total(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values)
        return values


def buckets(params: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    bucket, size = [], 0
    for p in params:
        if bucket and size + p.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def zero_loss(output) -> torch.Tensor:
    """0 with the graph of a task's output (a tensor, or the dicts and lists of a detection head)."""
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.sum() for t in leaves) * 0.0


def ranks() -> Alone:
    """The group this process belongs to, or Alone."""
    return Group() if dist.is_available() and dist.is_initialized() else Alone()
