"""A loss or gradient that is NaN or infinite (trainer.nonfinite): the step makes no update, and the run either
stops at once (stop, the default) or skips the step, counting it, until trainer.nonfinite_patience skips in a
row. Either way no checkpoint ever holds non-finite weights (TrainState.save refuses them). With fp16 the
gradient scaler keeps skipping its own overflow steps, as it always does: only the losses are checked there."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mtl_cli.engine.state import NonFinite, TrainState

log = logging.getLogger("mtl")


def gradient_norm(state: TrainState, clip: float | None) -> torch.Tensor | None:
    """The global gradient norm, after clipping it to `clip` if given; None under fp16 without clipping (the
    scaler checks its gradients itself)."""
    params = [p for group in state.optimizer.param_groups for p in group["params"] if p.grad is not None]
    if clip is not None:
        state.scaler.unscale_(state.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, float(clip))
        return None if state.scaler.is_enabled() else norm
    return None if state.scaler.is_enabled() else torch.nn.utils.get_total_norm([p.grad for p in params])


class NonFinitePolicy:
    def __init__(self, mode: str = "stop", patience: int = 10):
        self.mode, self.patience, self.in_a_row = mode, int(patience), 0

    def allows(self, state: TrainState, losses: dict[str, torch.Tensor], norm: torch.Tensor | None,
               last: Path) -> bool:
        """Whether the step may update the weights (one synchronisation); else counts it, or ends the run."""
        values = [loss.detach().float() for loss in losses.values()] + ([norm.float()] if norm is not None else [])
        if bool(torch.isfinite(torch.stack(values)).all()):
            self.in_a_row = 0
            return True
        state.optimizer.zero_grad(set_to_none=True)
        self.in_a_row += 1
        bad = [name for name, loss in losses.items() if not torch.isfinite(loss.detach()).all()]
        what = f"the loss of {', '.join(bad)} is" if bad else "the gradient is (the losses are finite)"
        where = f"step {state.step + 1} (epoch {state.epoch + 1}, batch {state.batch})"
        if self.mode == "skip" and self.in_a_row < self.patience:
            state.skipped_steps += 1
            log.warning(f"{where}: {what} not finite: skipped ({state.skipped_steps} so far, {self.in_a_row} in a "
                        f"row of at most {self.patience})")
            return False
        in_a_row = f", {self.in_a_row} steps in a row" if self.in_a_row > 1 else ""
        try:
            state.save(last)
            kept = f"{last} holds the weights before that step"
        except NonFinite:
            kept = f"the checkpoints in {last.parent} keep the last finite weights"
        raise NonFinite(f"{where}: {what} NaN or infinite{in_a_row}: the run stops ({kept}). Lower optimizer.lr, "
                        "set trainer.grad_clip, or use trainer.nonfinite=skip")
