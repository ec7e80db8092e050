"""Losses that torch does not provide directly.

Conventions: dense predictions and targets are ``[B, C, H, W]``; depth uses ``0`` (``invalid_value``) for
missing pixels; surface normals use an all-zero target vector for missing pixels.  Each loss is the mean over
the *valid* elements of the batch; a batch with no valid element gives a zero that still carries the graph
(``pred.sum() * 0``), never NaN.  Cross-entropy (with ``ignore_index``) and BCE-with-logits are used straight
from ``torch.nn``.

A prediction whose shape does not match its target raises :class:`UserError`: it almost always means a head
configured with the wrong number of output channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtl_cli.errors import UserError
from mtl_cli.ops import unit_vectors


def _check_same_shape(what: str, pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise UserError(
            f"{what} prediction has shape {list(pred.shape)} but its target has shape {list(target.shape)}; "
            "check the number of output channels of the task's head"
        )


def _masked_mean(values: Tensor, valid: Tensor, pred: Tensor) -> Tensor:
    """Mean of ``values[valid]``; a zero carrying ``pred``'s graph when nothing is valid.

    Written without boolean indexing or a host-side check, so it never waits for the GPU."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1)


class MaskedL1Loss(nn.Module):
    """Mean absolute error over pixels whose target differs from ``invalid_value`` (depth: 0 = missing).

    ``pred`` and ``target`` are ``[B, 1, H, W]`` (any identical shapes work).
    """

    def __init__(self, invalid_value: float = 0.0) -> None:
        super().__init__()
        self.invalid_value = invalid_value

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("depth", pred, target)
        target = target.to(pred.dtype)
        return _masked_mean((pred - target).abs(), target != self.invalid_value, pred)


class NormalCosineLoss(nn.Module):
    """Mean over valid pixels of ``1 - cos(pred, target)`` for surface normals ``[B, 3, H, W]``.

    A pixel is valid where its target vector is non-zero; valid targets are unit vectors (the data's contract).
    The prediction is taken as a unit vector too, as the normals head outputs it (``normalize: true`` in
    tasks/normals.yaml); with ``normalize=True`` the loss normalises the prediction itself (with ``eps``), for
    heads that do not. Normalising again what is already unit costs a third of the step's loss time on a CPU.
    """

    def __init__(self, normalize: bool = False, eps: float = 1e-8) -> None:
        super().__init__()
        self.normalize, self.eps = normalize, eps

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape("surface-normal", pred, target)
        if pred.dim() < 2 or pred.shape[1] != 3:
            raise UserError(f"surface-normal prediction must have 3 channels, got shape {list(pred.shape)}")
        target = target.to(pred.dtype)
        pred = unit_vectors(pred, eps=self.eps) if self.normalize else pred
        return _masked_mean(1 - (pred * target).sum(dim=1), (target != 0).any(dim=1), pred)


class ScalarL1Loss(nn.Module):
    """Mean absolute error for a per-image scalar (e.g. an object count).

    ``pred`` is ``[B, 1]`` or ``[B]``, ``target`` is ``[B]`` (``[B, 1]`` is accepted too; integer or float, cast
    to ``pred``'s dtype).
    """

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.reshape(-1) if target.dim() == 2 and target.shape[1] == 1 else target
        ok = target.dim() == 1 and pred.shape in (target.shape, (target.shape[0], 1))
        if not ok:
            raise UserError(
                f"scalar prediction has shape {list(pred.shape)} but its target has shape {list(target.shape)}; "
                "expected a prediction of shape [B] or [B, 1] (a head with 1 output) for a target of shape [B]"
            )
        if target.numel() == 0:
            return pred.sum() * 0
        return (pred.reshape(target.shape) - target.to(pred.dtype)).abs().mean()
