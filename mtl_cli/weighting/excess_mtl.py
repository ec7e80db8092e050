"""ExcessMTL: task weights from excess risks.

He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi and Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024.
"""

import math
from collections.abc import Sequence

import torch

from mtl_cli.errors import UserError
from mtl_cli.weighting.base import GradientWeighting

F64 = torch.float64
ADAGRAD_EPS = 1e-7  # under the square root of the accumulated squares, as in the official code


class ExcessMTL(GradientWeighting):
    """Weights the tasks by how far each is from convergence (its excess risk), not by its loss, so that a task
    with noisy labels (a large loss it can never remove) does not take over the update.

    The excess risk of task t is estimated by a second-order Taylor expansion, E_t ~ g_t^T H_t^-1 g_t, with a
    diagonal H_t from the squared gradients accumulated over the steps (AdaGrad's preconditioner):

        S_t <- S_t + g_t^2,   E_t = sum_p g_tp^2 / sqrt(S_tp + 1e-7),
        r_t = E_t / E_t(0)    (scale processing: E_t(0) the mean of the task's first `warmup_steps` estimates),
        w <- w exp(eta r) / sum(w exp(eta r))    (exponentiated gradient, from w = 1/T; eta = robust_step_size)

    The weights are loss weights summing to 1 (the heads get them too); during the warm-up r_t = 0, so they stay
    where they are. The update is done in log space, so a large ratio saturates a weight instead of overflowing.

    Departures: the official code (and LibMTL) starts from w = 1 and rescales the weights to sum to T, a constant
    factor T on the update; here they lie on the simplex, as in the paper (and torchjd). warmup_steps = 1 is the
    official code's behaviour (the first step's estimate is the baseline and the weights move from the second);
    the paper (Appendix C.1) collects the statistics for three epochs, warmup_steps = 3 x (steps per epoch).
    torchjd's ExcessMTL with n_warmup_steps = k equals warmup_steps = k here (its n_warmup_steps = 0 also
    moves the weights on the first step, by the unnormalised estimate). A task whose baseline is 0 (no gradient
    during its warm-up) keeps ratio 0. A task absent from a step keeps its statistics and its share of the
    weights; the update runs on the present tasks' share, renormalised.

    The accumulated squares, T x P floats (as much memory as T copies of the shared parameters), are a buffer
    sized at the first step (a fresh instance takes a checkpoint's size). Only `params`: squared gradients are
    accumulated per parameter, and feature gradients of different batches do not line up.
    """

    grad_targets = ("params",)
    loss_weights = True

    def __init__(self, tasks: Sequence[str], robust_step_size: float = 1e-2, warmup_steps: int = 1,
                 grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks, grad_target, grad_every)
        if robust_step_size <= 0 or int(warmup_steps) < 1:
            raise UserError(f"ExcessMTL: robust_step_size={robust_step_size} must be > 0 and warmup_steps="
                            f"{warmup_steps} a positive integer (the steps whose estimates make the baseline)")
        self.robust_step_size, self.warmup_steps = float(robust_step_size), int(warmup_steps)
        count = len(self.tasks)
        self.register_buffer("squares", torch.zeros(count, 0))
        self.register_buffer("seen", torch.zeros(count, dtype=torch.long))
        self.register_buffer("baseline_sums", torch.zeros(count, dtype=F64))
        self.register_buffer("log_weights", torch.full((count,), -math.log(count), dtype=F64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        if self.squares.shape[1] != grads.shape[1]:
            if self.squares.shape[1]:
                raise RuntimeError(f"ExcessMTL: gradients of {grads.shape[1]} parameters, squares of "
                                   f"{self.squares.shape[1]}")
            self.squares = grads.new_zeros(len(self.tasks), grads.shape[1])
        squared = grads.to(self.squares).square()
        if self.in_place(self.squares, index, squared):
            squares = self.squares.add_(squared)
        else:
            squares = self.squares[index].add_(squared)
            self.squares[index] = squares
        # g^2 / sqrt(S + eps) in one scratch matrix: each fresh T x P temporary costs its page faults on the CPU
        excess = (squares + ADAGRAD_EPS).rsqrt_().mul_(squared).sum(1).to(F64).cpu()

        self.seen[index] += 1
        warming = self.seen[index].cpu() <= self.warmup_steps
        baseline_sums = self.baseline_sums[index].cpu() + torch.where(warming, excess, 0.0)
        self.baseline_sums[index] = baseline_sums.to(self.baseline_sums)
        baseline = baseline_sums / self.warmup_steps
        ratio = torch.where(warming | (baseline <= 0), 0.0, excess / baseline.where(baseline > 0, 1.0))

        log_weights = self.log_weights[index].cpu()
        moved = torch.log_softmax(log_weights + self.robust_step_size * ratio, dim=0)
        self.log_weights[index] = (moved + torch.logsumexp(log_weights, 0)).to(self.log_weights)
        return moved.exp().to(grads)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "squares")
        if saved is not None and saved.dim() == 2 and saved.shape[1] != self.squares.shape[1]:
            self.squares = saved.new_zeros(self.squares.shape[0], saved.shape[1], device=self.squares.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
