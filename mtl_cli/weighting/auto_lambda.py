"""Auto-Lambda: task weights learned by a one-step lookahead on held-out data.

Liu, Davison and Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import Lookahead, Weighting


class AutoLambda(Weighting):
    """Loss weights lambda (from `init`), learned before each step: the model takes a virtual SGD step on the
    weighted training loss, theta' = theta - lr grad sum_t lambda_t L_t(theta), and lambda moves to lower the
    held-out loss of the `primary` tasks (all by default: the multi-task setting) at theta'. Its gradient,
    -lr grad L_val(theta')^T grad L_t(theta), is the finite difference -lr (L_t(theta+) - L_t(theta-)) / (2 eps)
    with theta+- = theta +- eps grad L_val(theta') and eps = `fd_radius` / |grad L_val(theta')| (as DARTS and the
    official code); lambda then takes an Adam step (lr `meta_lr`). The step itself is an ordinary weighted backward.

    A step costs two forward-backward passes (the step's batch, a held-out batch) and two forward passes more than
    ew. The held-out batch comes from data.held_out (data/held_out.py); `data.held_out=null` reads the whole train
    split in another order, as the official code. Departures from it: the virtual step is plain SGD at the
    optimizer's learning rate (the official code adds SGD's momentum and weight decay, which other optimizers do not
    have); lambda stays at least `floor` (the official code lets it go negative). Adam's moments are buffers, so a
    resumed run continues exactly. One process only: the lookahead's gradients are not combined across ranks."""

    held_out_batches = 1

    def __init__(self, tasks: Sequence[str], init: float = 0.1, meta_lr: float = 1e-4,
                 primary: Sequence[str] | None = None, fd_radius: float = 0.01, floor: float = 0.0,
                 betas: Sequence[float] = (0.9, 0.999), adam_eps: float = 1e-8):
        super().__init__(tasks)
        primary = list(self.tasks if primary is None else primary)
        unknown = [t for t in primary if t not in self.tasks]
        if unknown or not primary:
            raise UserError(f"auto_lambda: primary={primary} must name some of the run's tasks: {', '.join(tasks)}")
        self.meta_lr, self.fd_radius, self.floor = float(meta_lr), float(fd_radius), float(floor)
        self.betas, self.adam_eps = tuple(betas), float(adam_eps)
        self.primary = primary
        n = len(self.tasks)
        self.register_buffer("lambdas", torch.full((n,), float(init)))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long))

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.lambdas[self.tasks.index(t)] for t in losses}

    def before_step(self, ahead: Lookahead) -> None:
        if not self.training:
            return
        if ahead.world > 1:
            raise UserError("weighting=auto_lambda runs on one process: its lookahead's gradients are not combined "
                            "across ranks; use trainer.devices=1")
        gradient = self.meta_gradient(ahead)
        if gradient is not None:
            self._adam(gradient)

    def meta_gradient(self, ahead: Lookahead) -> torch.Tensor | None:
        """d L_val(theta'(lambda)) / d lambda by the finite difference, or None when the held-out loss is flat."""
        params = [p for p in ahead.model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        losses = ahead.batch()
        total = sum(self.lambdas[self.tasks.index(t)] * loss for t, loss in losses.items())
        grads = torch.autograd.grad(total, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(ahead.lr * g)
        held_out = ahead.held_out[0]()
        primary = [held_out[t] for t in self.primary if t in held_out]
        directions = torch.autograd.grad(sum(primary), params, allow_unused=True) if primary else []
        directions = [torch.zeros_like(p) if d is None else d for p, d in zip(params, directions)]
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in directions)) if directions else torch.zeros(())
        if not primary or not torch.isfinite(norm) or norm == 0:
            self._restore(params, saved)
            return None
        eps = self.fd_radius / float(norm)
        ends = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, s, d in zip(params, saved, directions):
                    p.copy_(s + sign * eps * d)
                values = ahead.batch()
            ends.append(torch.stack([values[t].float() if t in values else torch.zeros(()) for t in self.tasks]))
        self._restore(params, saved)
        return -ahead.lr * (ends[0] - ends[1]).to(self.lambdas) / (2 * eps)

    @staticmethod
    def _restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    def _adam(self, grad: torch.Tensor) -> None:
        """One step of torch.optim.Adam on lambda (no weight decay), then lambda >= floor."""
        beta1, beta2 = self.betas
        self.meta_steps += 1
        k = int(self.meta_steps)
        self.exp_avg.mul_(beta1).add_((1 - beta1) * grad)
        self.exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad**2)
        step = self.meta_lr * (self.exp_avg / (1 - beta1**k)) / ((self.exp_avg_sq / (1 - beta2**k)).sqrt()
                                                                   + self.adam_eps)
        self.lambdas.sub_(step).clamp_(min=self.floor)
