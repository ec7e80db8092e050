"""MoCo: stochastic multi-objective gradient correction.

Fernando, Shen, Liu, Chaudhury, Murugesan and Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably
Convergent Approach", ICLR 2023.
"""

from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting import solvers
from mtl_cli.weighting.base import GradientWeighting

NORMALIZATIONS = ("none", "loss")
F64 = torch.float64


class MoCo(GradientWeighting):
    """MGDA whose direction is not biased by the noise of one batch: each task's gradient is tracked across steps,
    and the weights take one projected gradient step of MGDA's min-norm problem on the tracked gradients per
    training step (the paper's Algorithm 1):

        Y <- Y - beta_k (Y - G)                                     (T x P, from 0)
        lambda <- Proj_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)    (from 1/T)
        update = lambda @ Y

    with beta_k = beta / k^beta_sigma and gamma_k = gamma / k^gamma_sigma at the k-th step. The update is not a
    combination of this step's rows, so `combine` is overridden; the weights logged are lambda. Each head gets its
    own task's gradient, as in the code the authors shared (LibMTL's MoCo, whose defaults these are).

    Departures from the paper: its projection of each y_t onto a ball of radius L_t (a bound of its analysis) is
    left out, as in that code. The code differs from the paper in two more ways: it tracks g_t / |g_t| * L_t
    (each gradient rescaled to the norm of its loss: normalization=loss here; the paper tracks the raw gradients,
    normalization=none, the default) and maps lambda back with a softmax, where the projection onto the simplex
    (the paper's) is kept here. Since gamma_k multiplies Y Y^T, its scale is that of the squared gradients: with
    raw gradients of very different sizes lambda moves toward the smallest, as MGDA's min-norm point does.

    A task absent from a step keeps its tracked gradient and its share of lambda: the step moves the present
    tasks' lambda renormalised to sum to 1 (uniform if they hold none), stores it back at the share they held,
    and the update is that renormalised lambda times their rows of Y.

    Y, T x P floats (as much memory as T copies of the shared parameters), is a buffer saved with checkpoints,
    sized at the first step (a fresh instance has 0 columns and takes the checkpoint's size). Only `params`:
    feature gradients of different batches do not line up to be tracked.
    """

    grad_targets = ("params",)
    loss_weights = False

    def __init__(self, tasks: Sequence[str], beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, normalization: str = "none",
                 grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        if normalization not in NORMALIZATIONS:
            raise UserError(f"MoCo: normalization={normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if not 0 < beta <= 1 or gamma <= 0 or rho < 0 or beta_sigma < 0 or gamma_sigma < 0:
            raise UserError(f"MoCo: needs 0 < beta <= 1 (got {beta}), gamma > 0 (got {gamma}), rho >= 0 (got {rho}) "
                            f"and non-negative decay rates (beta_sigma={beta_sigma}, gamma_sigma={gamma_sigma})")
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma = map(float, (beta, beta_sigma, gamma, gamma_sigma))
        self.rho, self.normalization = float(rho), normalization
        count = len(self.tasks)
        self.register_buffer("tracked", torch.zeros(count, 0))
        self.register_buffer("lambdas", torch.full((count,), 1 / count, dtype=F64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tracked.shape[1] != grads.shape[1]:
            if self.tracked.shape[1]:
                raise RuntimeError(f"MoCo: gradients of {grads.shape[1]} parameters, tracked gradients of "
                                   f"{self.tracked.shape[1]}")
            self.tracked = grads.new_zeros(len(self.tasks), grads.shape[1])
        self.updates += 1
        step = int(self.updates)
        beta, gamma = self.beta / step**self.beta_sigma, self.gamma / step**self.gamma_sigma
        if self.normalization == "loss":
            grads = grads * (losses.to(grads) / (grads.norm(dim=1) + 1e-8))[:, None]
        if self.in_place(self.tracked, index, grads):
            tracked = self.tracked.lerp_(grads, beta)  # Y - beta (Y - G), in place: no T x P temporaries
        else:
            tracked = self.tracked[index].to(grads).lerp_(grads, beta)
            self.tracked[index] = tracked.to(self.tracked)

        held = self.lambdas[index].cpu()
        share = held.sum()
        current = held / share if share > 0 else torch.full_like(held, 1 / len(held))
        gram = solvers.gramian(tracked)
        moved = solvers.project_to_simplex(current - gamma * (gram @ current + self.rho * current))
        self.lambdas[index] = (share * moved).to(self.lambdas)
        moved = moved.to(grads)
        return moved @ tracked, moved

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "tracked")
        if saved is not None and saved.dim() == 2 and saved.shape[1] != self.tracked.shape[1]:
            self.tracked = saved.new_zeros(self.tracked.shape[0], saved.shape[1], device=self.tracked.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
