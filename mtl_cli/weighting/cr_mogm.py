"""CR-MOGM: another gradient method with its coefficients averaged over the steps.

Zhou, Zhang, Jiang, Zhong, Gu and Zhu, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and
Beyond", NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from mtl_cli.build import instantiate
from mtl_cli.errors import UserError, suggest
from mtl_cli.paths import config_dir
from mtl_cli.weighting.base import GradientWeighting

F64 = torch.float64
OWN_KEYS = ("grad_target", "grad_every")  # set on the wrapper, which does the gradient plumbing (and the grouping)


class CRMOGM(GradientWeighting):
    """The coefficients lambda_hat_k a gradient method (`method`) computes from one batch's gradients are noisy, and
    a stochastic gradient manipulation built on them need not converge to a Pareto-stationary point; averaging them
    over the steps fixes that (the paper's CR-MOGM):

        lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda_hat_k,   lambda_1 = lambda_hat_1,   update = lambda_k @ G

    alpha weighs the previous average, as in torchjd's CRMOGMWeighting, whose default 0.9 is this one's (the
    paper's analysis lets alpha_k grow toward 1 as the learning rate decays; a constant is used here).

    `method` names any option of configs/weighting/ whose update is a combination of the task gradients (its
    `aggregate`); `options` are its settings on top of its YAML. grad_target and grad_every, when given, replace
    the method's (null keeps its own); the method checks them. Its coefficients keep their meaning: if they are
    loss weights (MGDA, Nash-MTL) the averaged ones weigh the heads too, else each head gets its own gradient.
    The method is a submodule: its state (buffers, learned parameters) is saved in this one's state_dict, and its
    solver failures are counted here. A task absent from a step keeps its average; one seen for the first time
    starts at its lambda_hat.
    """

    def __init__(self, tasks: Sequence[str], method: str = "mgda", options: Mapping[str, Any] | None = None,
                 alpha: float = 0.9, grad_target: str | None = None, grad_every: int | None = None):
        if not 0 <= alpha <= 1:
            raise UserError(f"CRMOGM: alpha={alpha} must be in [0, 1] (0: no averaging, 1: the first weights forever)")
        own = {key: value for key, value in zip(OWN_KEYS, (grad_target, grad_every)) if value is not None}
        inner = build_method(method, dict(options or {}), tasks, own)
        super().__init__(tasks, inner.grad_target, inner.grad_every)
        self.inner, self.alpha, self.method = inner, float(alpha), method
        self.loss_weights = inner.loss_weights
        self.register_buffer("averages", torch.zeros(len(self.tasks), dtype=F64))
        self.register_buffer("started", torch.zeros(len(self.tasks), dtype=torch.bool))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        self.inner.loss_scale = self.loss_scale
        fresh = self.inner.aggregate(grads, losses, index).detach().to("cpu", F64)
        self.solver_failures.copy_(self.inner.solver_failures)
        previous = torch.where(self.started[index].cpu(), self.averages[index].cpu(), fresh)
        averaged = self.alpha * previous + (1 - self.alpha) * fresh
        self.averages[index] = averaged.to(self.averages)
        self.started[index] = True
        return averaged.to(grads)

    def head_weights(self, weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return self.inner.head_weights(weights, losses)


def build_method(name: str, options: dict[str, Any], tasks: Sequence[str], own: dict[str, Any]) -> GradientWeighting:
    """The gradient method of configs/weighting/<name>.yaml with `options` and the wrapper's keys on top."""
    allowed = combinable_methods()
    if name not in allowed:
        raise UserError(f"CRMOGM: weighting.method={name!r} is not a method whose coefficients can be averaged"
                        f"{suggest(name, allowed)}; allowed: {', '.join(allowed)}")
    clash = sorted(set(options) & {*OWN_KEYS, "groups"})
    if clash:
        raise UserError(f"CRMOGM: set {', '.join(clash)} as weighting.{clash[0]}=..., not in weighting.options")
    cfg = OmegaConf.load(config_dir() / "weighting" / f"{name}.yaml")
    cfg = OmegaConf.merge(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "groups"]), options, own)
    return instantiate(cfg, f"weighting.method={name}", tasks=list(tasks))


def combinable_methods() -> list[str]:
    """The options of configs/weighting/ whose update is `aggregate`'s coefficients times G: gradient methods that
    keep the base class's plumbing (no own backward, combine or per-step hooks, one batch per step)."""
    names = []
    for path in sorted((config_dir() / "weighting").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        cls = get_class(target) if isinstance(target, str) else None
        if (isinstance(cls, type) and issubclass(cls, GradientWeighting) and cls is not CRMOGM
                and cls.batches_per_step == 1
                and all(getattr(cls, hook, None) is getattr(GradientWeighting, hook, None) for hook in (
                    "backward", "combine", "before_step", "after_step", "epoch_end", "sample_gradients"))):
            names.append(path.stem)
    return names
