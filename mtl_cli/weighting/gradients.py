"""Per-task gradients: the one piece of plumbing every gradient method shares.

The model splits into a shared trunk (`model.encode(image) -> features`, parameters `model.shared_parameters()`)
and task-specific parts (every other parameter; head t depends on the features and on nothing shared). The
training loop cuts the graph there (`FeatureCut`): the heads read leaf copies of the features, and the trunk
gets their gradients in a second backward call. So the exact per-task gradients cost one backward through the
heads plus T backward passes through the trunk alone:

1. for each task, `grad(L_t, leaves + head parameters)`: only head t's part of the graph runs, so the T calls
   together cost one backward through all heads; they give dL_t/dfeatures and head t's own gradient (the cut
   matters when one feature map feeds another: without it dL_t/dfeatures would count the deeper maps' paths
   twice in the trunk pass);
2. `params`: for each task, `grad(features, shared, grad_outputs=dL_t/dfeatures)`, a backward through the trunk;
   `representation`: the rows are the dL_t/dfeatures themselves and the trunk runs once, in `apply`.

On several processes the matrix is combined across the ranks before anyone aggregates it (`ranks`, an
engine.distributed.Group handed in by the training loop): averaged for `params`, gathered column-wise for
`representation` (each rank's samples), and `apply` takes this rank's columns of the update back.

`scripts/bench_jacobian.py` measures this against T full backward passes, `is_grads_batched` and torch.func;
the trunk passes are looped (`backend="loop"`): batching them with vmap was no faster (figures in the README).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl_cli.errors import UserError


class FeatureCut:
    """The trunk's output `features` (a tensor or a list of them) and the leaf copies the heads read (`leaves`,
    the same structure). After a backward of the losses, `backward_trunk` carries the leaves' gradients on."""

    def __init__(self, features):
        self.is_list = isinstance(features, (list, tuple))
        self.features = list(features) if self.is_list else [features]
        self.inputs = [f.detach().requires_grad_() for f in self.features]  # also under a frozen trunk

    @property
    def leaves(self):
        return self.inputs if self.is_list else self.inputs[0]

    def backward_trunk(self) -> None:
        pairs = [(f, x.grad) for f, x in zip(self.features, self.inputs) if x.grad is not None and f.requires_grad]
        if pairs:
            torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])


class TaskJacobian:
    """The T x P matrix of task gradients (unscaled, float32) and what is needed to write an update back."""

    def __init__(self, matrix: torch.Tensor, shared: list[torch.Tensor], heads: list[nn.Parameter],
                 head_grads: list[Sequence[torch.Tensor | None]], features: list[torch.Tensor] | None,
                 target: str, scale: float, ranks=None):
        self.matrix, self.shared, self.heads, self.head_grads = matrix, shared, heads, head_grads
        self.features, self.target, self.scale = features, target, scale
        self.ranks = ranks
        if ranks is not None:
            self.matrix = ranks.matrix(matrix, target)

    def finite(self) -> bool:
        return finite(self.matrix)

    def apply(self, update: torch.Tensor, head_weights: torch.Tensor) -> None:
        """Accumulates `update` [P] into the shared parameters' gradients (through the trunk for the
        representation target) and sum_t head_weights[t] * (task t's head gradient) into the other parameters'.
        Everything is multiplied back by the loss scale, so the GradScaler unscales and checks as usual."""
        if self.ranks is not None:
            update = self.ranks.columns(update, self.target)
            if self.target == "params":
                self.ranks.mark_global(self.shared)
        update = update * self.scale if self.scale != 1.0 else update
        pieces = update.split([t.numel() for t in self.shared])
        if self.target == "representation":
            pairs = [(f, p.view_as(f).to(f.dtype)) for p, f in zip(pieces, self.features) if f.requires_grad]
            if pairs:  # (none under a frozen trunk)
                torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
        else:
            for param, piece in zip(self.shared, pieces):
                accumulate(param, piece.view_as(param).to(param.dtype))
        weights = head_weights.tolist()  # T numbers: one small copy instead of a multiply per parameter and task
        for k, param in enumerate(self.heads):
            parts = [g[k] if w == 1.0 else w * g[k] for w, g in zip(weights, self.head_grads) if g[k] is not None]
            if parts:  # usually one: a head's parameters serve one task
                accumulate(param, (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)).to(param.dtype))


def task_gradients(losses: Sequence[torch.Tensor], model: nn.Module, cut: FeatureCut | None, target: str,
                   scaler: torch.amp.GradScaler | None = None, backend: str = "loop", ranks=None) -> TaskJacobian:
    """The gradient of each loss with respect to the shared parameters (`params`) or to the shared `features`
    (`representation`), as rows of a matrix. `cut`: the features `model.encode` returned, cut from the heads'
    graph, or None for a model without that split (then every task runs a full backward). `backend`: how the
    trunk passes run, `loop` (one retained backward each) or `batched` (`is_grads_batched`, vmap). `ranks`: the
    process group's combining points (see the module's docstring), or None for one process."""
    if scaler is not None and scaler.is_enabled():  # scaler.scale (not a plain product): it arms scaler.step
        scaled, scale = [scaler.scale(loss) for loss in losses], float(scaler.get_scale())
    else:
        scaled, scale = list(losses), 1.0
    shared_params = [p for p in getattr(model, "shared_parameters", model.parameters)() if p.requires_grad]
    if not shared_params and target == "params":
        raise UserError("every shared parameter is frozen, so grad_target=params has no gradients to balance; use "
                        "grad_target=representation (conflicts at the shared features) or a loss-based weighting")
    ids = {id(p) for p in shared_params}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    count = len(scaled)

    if cut is None:
        if target == "representation":
            raise UserError(f"grad_target=representation needs a model with a shared representation "
                            f"(encode/decode); {type(model).__name__} has none: use grad_target=params")
        matrix, head_grads = rows_for(count, shared_params), []
        for i, loss in enumerate(scaled):
            grads = torch.autograd.grad(loss, shared_params + heads, retain_graph=i < count - 1, allow_unused=True)
            flat(grads[:len(shared_params)], shared_params, out=matrix[i])
            head_grads.append(grads[len(shared_params):])
        return TaskJacobian(unscale(matrix, scale), shared_params, heads, head_grads, None, "params", scale, ranks)

    features, leaves = cut.features, cut.inputs
    feature_grads, head_grads = [], []
    for loss in scaled:
        grads = torch.autograd.grad(loss, leaves + heads, retain_graph=True, allow_unused=True)
        feature_grads.append(grads[:len(features)])  # None for a map the task's head does not read
        head_grads.append(grads[len(features):])
    if target == "representation":
        matrix = rows_for(count, features)
        for row, grads in zip(matrix, feature_grads):
            flat(grads, features, out=row)
        return TaskJacobian(unscale(matrix, scale), features, heads, head_grads, features, target, scale, ranks)

    live = [k for k, f in enumerate(features) if f.requires_grad]  # maps of frozen stages carry no gradient
    if backend == "batched":
        stacked = [torch.stack([torch.zeros_like(features[k]) if g[k] is None else g[k] for g in feature_grads])
                   for k in live]
        grads = torch.autograd.grad([features[k] for k in live], shared_params, stacked, is_grads_batched=True,
                                    allow_unused=True)
        matrix = torch.cat([torch.zeros(count, p.numel(), device=p.device) if g is None else g.reshape(count, -1)
                            for g, p in zip(grads, shared_params)], dim=1)
    else:
        matrix = rows_for(count, shared_params)
        for i, grads in enumerate(feature_grads):
            read = [k for k in live if grads[k] is not None]  # the pass starts from these maps alone: no zeros
            if not read:
                matrix[i].zero_()
                continue
            flat(torch.autograd.grad([features[k] for k in read], shared_params, [grads[k] for k in read],
                                     retain_graph=i < count - 1, allow_unused=True), shared_params, out=matrix[i])
    return TaskJacobian(unscale(matrix, scale), shared_params, heads, head_grads, None, "params", scale, ranks)


def finite(matrix: torch.Tensor) -> bool:
    """Whether every entry is finite. A NaN or an infinity makes the sum non-finite, so a finite sum settles it in one
    reduction (an elementwise isfinite over T x P costs 30 times as much); only a sum that is not finite, from a
    non-finite entry or an overflow of finite ones, is checked entry by entry."""
    return bool(torch.isfinite(matrix.sum())) or bool(torch.isfinite(matrix).all())


def rows_for(count: int, like: Sequence[torch.Tensor]) -> torch.Tensor:
    """An empty float32 matrix with one row per task and one column per element of `like`."""
    return torch.empty(count, sum(t.numel() for t in like), device=like[0].device)


def flat(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], out: torch.Tensor | None = None
         ) -> torch.Tensor:
    """One float32 vector from a list of gradients (zeros where a tensor got none), written into `out` if given
    (a row of the matrix: one copy of the gradients, not two)."""
    parts = [(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(grads, like)]
    if out is None:
        return torch.cat(parts).float()
    if all(part.dtype == out.dtype for part in parts):
        return torch.cat(parts, out=out)
    start = 0
    for part in parts:
        out[start:start + part.numel()].copy_(part)
        start += part.numel()
    return out


def unscale(matrix: torch.Tensor, scale: float) -> torch.Tensor:
    return matrix.div_(scale) if scale != 1.0 else matrix


def accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad
