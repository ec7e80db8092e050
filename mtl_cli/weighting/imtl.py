"""Impartial multi-task learning.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting, Logs, Weighting

MODES = ("hybrid", "gradient", "loss")


def equal_projections(gram: torch.Tensor, rtol: float) -> torch.Tensor:
    """v such that y = v @ G projects equally, 1, on every unit row u_t = g_t / |g_t|: the least-norm solution
    of U y = 1. With D = diag(|g|) and the cosine matrix C = D^-1 G G^T D^-1, u_t . y = (C D v)_t, so
    v = D^-1 pinv(C) 1. The pseudo-inverse is taken of C, not of G G^T: its cut-off `rtol` then discards directions
    that are nearly dependent, never a task whose gradient is merely small (on G G^T a task 2,000 times smaller
    than the largest fell under T x float32 epsilon and was dropped). A zero gradient gets 0."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    live = norms > 0
    v = torch.zeros_like(norms)
    if live.any():
        n = norms[live]
        cosines = gram[live][:, live] / (n[:, None] * n)
        v[live] = torch.linalg.pinv(cosines, rtol=rtol, hermitian=True) @ torch.ones_like(n) / n
    return v


def impartial_coefficients(gram: torch.Tensor, rtol: float) -> torch.Tensor | None:
    """IMTL-G: the coefficients alpha, summing to 1, of the combination d = alpha @ G whose projections on the
    unit rows are all equal: `equal_projections` normalised (the paper's closed form, with D = (g_1 - g_t) and
    U = (u_1 - u_t), when the rows are independent; extended to dependent rows). None where the sum is 0 (no such
    combination)."""
    v = equal_projections(gram, rtol)
    total = v.sum()
    return None if total.abs() <= 1e-12 * v.abs().sum() else v / total


class IMTL(GradientWeighting):
    """mode `gradient` (IMTL-G): update = alpha @ G with `impartial_coefficients`; each head gets its raw gradient.

    mode `loss` (IMTL-L): learned s_t, total = sum_t e^{s_t} L_t - s_t, back-propagated once like any loss
    weighting (`backward` takes the loss-based path: no per-task gradients are computed).

    mode `hybrid` (IMTL, the paper's best): IMTL-G on the gradients of the scaled losses e^{s_t} L_t, i.e. on the
    rows e^{s_t} g_t, so the coefficient of g_t is alpha_t e^{s_t}; each head gets its scaled loss's gradient;
    s gets the gradient of sum_t e^{s_t} L_t - s_t with the losses detached, e^{s_t} L_t - 1.

    s (zeros at the start) is a parameter: the trainer puts it into the main optimizer.
    """

    loss_weights = False

    def __init__(self, tasks: Sequence[str], mode: str = "hybrid", grad_target: str = "params",
                 grad_every: int = 1):
        if mode not in MODES:
            raise UserError(f"IMTL: mode={mode!r} is not one of {', '.join(MODES)}")
        super().__init__(tasks, grad_target, grad_every)
        self.mode = mode
        self.log_scales = nn.Parameter(torch.zeros(len(self.tasks))) if mode != "gradient" else None
        self._head_scales: torch.Tensor | None = None

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.log_scales is None:
            return super().weights(losses)
        return {t: self.log_scales[self.tasks.index(t)].exp() for t in losses}

    def regularizer(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if self.log_scales is None:
            return 0.0
        return -sum(self.log_scales[self.tasks.index(t)] for t in losses)

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module, scaler: torch.amp.GradScaler,
                 features=None, log_grads: bool = False, measure: bool = False, samples=()) -> Logs:
        if self.mode == "loss":
            return Weighting.backward(self, losses, model, scaler, features, log_grads, measure)
        if self.mode == "hybrid":
            weights = self.weights(losses)
            self._head_scales = torch.stack([w.detach() for w in weights.values()])
            # through the scaler like every other gradient, so that its unscaling leaves s's gradient right
            own = sum(w * losses[t].detach() for t, w in weights.items()) + self.regularizer(losses)
            scaler.scale(own).backward()
        return super().backward(losses, model, scaler, features, log_grads, measure)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        gram = solvers.gramian(grads)
        scales = torch.ones(len(gram), dtype=gram.dtype)
        if self.log_scales is not None:
            scales = self.log_scales[index].detach().double().cpu().exp()
        alpha = impartial_coefficients(scales[:, None] * gram * scales, len(gram) * torch.finfo(grads.dtype).eps)
        if alpha is None:
            self.solver_failed("IMTL-G has no solution (its coefficients sum to 0); the shared update is 0")
            alpha = torch.zeros_like(scales)
        return (alpha * scales).to(grads.device)

    def head_weights(self, weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        if self.mode == "hybrid" and self._head_scales is not None:
            return self._head_scales.to(weights)
        return torch.ones_like(weights)
