"""The weighting interface: the training loop hands over the step's task losses; the weighting fills the gradients.

Two families, one call (`backward`), so the loop never knows which method runs:

- `Weighting` (loss-based): implements `weights` (and, if it learns something, a `regularizer`); `backward`
  back-propagates the weighted sum once. Per-task gradients are computed only when asked to measure them
  (`trainer.log_grad_conflicts`).
- `GradientWeighting`: implements `aggregate`, a pure function of the T x P matrix of task gradients (and of the
  method's own state) giving the coefficient of each task gradient in the update. Obtaining that matrix and writing
  the update back are shared (`mtl_cli/weighting/gradients.py`).

State that must survive a resume lives in parameters and buffers, so the weighting's `state_dict` is checkpointed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.weighting import gradients, groups

log = logging.getLogger("mtl")

Logs = dict[str, torch.Tensor]
Sample = Callable[[], tuple[dict[str, torch.Tensor], "gradients.FeatureCut"]]  # another batch's losses and cut


@dataclass
class Lookahead:
    """What a weighting may compute before the step's forward pass (`before_step`); each call is a forward pass
    of the model as it is then (with its parameters' graph: no feature cut), giving the task losses."""

    model: nn.Module
    batch: Callable[[], dict[str, torch.Tensor]]  # the step's batch
    held_out: Sequence[Callable[[], dict[str, torch.Tensor]]]  # `held_out_batches` batches of the held-out split
    lr: float  # the optimizer's learning rate (of its first group) for this step
    world: int  # the number of processes


class Weighting(nn.Module):
    """Combines the losses of the tasks present in a step into one update.

    `losses` maps task name -> scalar loss, for the tasks that have targets in this batch (a subset of `tasks`).
    """

    batches_per_step = 1  # independent batches of the epoch each step reads: the loop draws them (MoDo, SDMGrad)
    held_out_batches = 0  # batches of the held-out split (data.held_out) each step may read in before_step

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.ranks = None  # on several processes, where they combine the task gradients: set by the training loop

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weight of each task present, as 0-dim tensors (they may carry gradients, e.g. learned weights)."""
        raise NotImplementedError

    def regularizer(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """A term added to the weighted loss (e.g. uncertainty weighting's log-variances); 0 by default."""
        return 0.0

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module, scaler: torch.amp.GradScaler,
                 cut: gradients.FeatureCut | None = None, log_grads: bool = False, measure: bool = False,
                 samples: Sequence[Sample] = ()) -> Logs:
        """Fills `.grad` (scaled for fp16) and returns what to log: `train/weight/<task>` and, when the
        gradients were computed and `log_grads` is set, `grad/norm/<task>` and `grad/cos/<a>-<b>`.

        `cut`: the shared representation the model computed (`model.encode`), cut from the heads' graph; `measure`
        asks a loss-based method to compute the per-task gradients anyway (exactly the same update, T backward
        passes); `samples`: the `batches_per_step - 1` other batches of the step, each computing its losses and cut
        when called."""
        weights = self.weights(losses)
        logs = {f"train/weight/{t}": w.detach() for t, w in weights.items()}
        if not measure:
            total = sum(weights[t] * losses[t] for t in losses) + self.regularizer(losses)
            scaler.scale(total).backward()
            if cut is not None:
                cut.backward_trunk()
            return logs
        own = sum(weights[t] * losses[t].detach() for t in losses) + self.regularizer(losses)
        if isinstance(own, torch.Tensor) and own.requires_grad:  # learned weights get their gradient alone
            scaler.scale(own).backward()
        coefficients = torch.stack([weights[t].detach() for t in losses]).float()
        jacobian = gradients.task_gradients(list(losses.values()), model, cut, "params", scaler,
                                             ranks=self.ranks)
        jacobian.apply(coefficients @ jacobian.matrix, coefficients)
        logs.update(gradient_stats(jacobian.matrix, list(losses)))
        return logs

    def group_by(self, level: str, model: nn.Module | None) -> None:
        """`weighting.groups`: a loss-based method has no per-task gradients to aggregate by groups."""
        if level != "whole":
            raise UserError(f"weighting.groups={level}: {type(self).__name__} weighs the losses, so there are no task "
                            "gradients to aggregate by groups; groups apply to gradient methods (e.g. weighting=pcgrad)")

    def before_step(self, ahead: Lookahead) -> None:
        """Called before each training step's forward pass, for a method that learns its weights by looking ahead
        (Auto-Lambda); nothing by default, and nothing in `ahead` is computed unless called."""

    def after_step(self, losses_now: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Called after each optimizer step; `losses_now()` computes the step batch's task losses with the updated
        weights (an extra forward pass, so only a method that learns from them calls it: FAMO's same_batch)."""

    def epoch_end(self) -> None:
        """Called after every training epoch, for methods that adapt per epoch."""


class GradientWeighting(Weighting):
    """A method that looks at the per-task gradients: the update of the shared parameters is `c @ G`, with G the
    T x P matrix of task gradients and c the coefficients from `aggregate`.

    grad_target: `params` (exact gradients of the shared parameters: one trunk backward per task) or
    `representation` (gradients of the shared features, one trunk backward in all; the coefficients computed
    from them are then applied exactly). grad_every: for methods whose coefficients are loss weights, compute
    them every k steps and reuse the last ones in between (an ordinary backward of the weighted loss).

    Class attributes a method sets: `grad_targets`, the targets it allows; `loss_weights`, whether its
    coefficients are loss weights (then the task-specific parameters, the heads, get them too and grad_every may
    reuse them) or only coefficients of a combined direction (then each head gets its own task's raw gradient).
    """

    grad_targets: tuple[str, ...] = ("params", "representation")
    loss_weights: bool = True

    def __init__(self, tasks: Sequence[str], grad_target: str = "params", grad_every: int = 1):
        super().__init__(tasks)
        name = type(self).__name__
        if grad_target not in self.grad_targets:
            raise UserError(f"{name} does not support grad_target={grad_target!r}; it allows: "
                            + ", ".join(self.grad_targets))
        if int(grad_every) < 1 or (int(grad_every) > 1 and not self.loss_weights):
            allowed = "a positive integer" if self.loss_weights else "1 (it does not produce loss weights to reuse)"
            raise UserError(f"{name}: grad_every={grad_every} must be {allowed}")
        self.grad_target, self.grad_every = grad_target, int(grad_every)
        self.register_buffer("last_weights", torch.ones(len(self.tasks)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("solver_failures", torch.zeros((), dtype=torch.long))
        self._warned = False
        self.parts, self.columns = nn.ModuleList(), []  # weighting.groups: one copy of the method per group
        self.loss_scale = 1.0  # the step's GradScaler scale, for methods that write their own parameters' .grad

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int]) -> torch.Tensor:
        """The coefficient of each row of `grads` [T', P] in the update; `losses` [T'] are the detached task
        losses and `index` the position in `self.tasks` of each row (the tasks present this step)."""
        raise NotImplementedError

    def combine(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int], *samples: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the update [P], the weights to log [T']). Methods whose update is not a combination of the rows
        (GradDrop, DB-MTL's averaged gradients) override this, and so do methods that read the task gradients of
        independent batches (`samples`, each [T', P] in the rows' order, given when `batches_per_step` > 1)."""
        coefficients = self.aggregate(grads, losses, index)
        return coefficients.to(grads.dtype) @ grads, coefficients

    def in_place(self, state: torch.Tensor, index: list[int], grads: torch.Tensor) -> bool:
        """Whether a T x P state buffer can be updated in place for the rows `index`: every task present, in order,
        and the buffer in the gradients' dtype and device. Otherwise the method gathers and scatters its rows, each a
        fresh T x P copy (and its page faults on the CPU)."""
        return index == list(range(len(self.tasks))) and (state.dtype, state.device) == (grads.dtype, grads.device)

    def group_by(self, level: str, model: nn.Module | None) -> None:
        """Aggregates each group of `model`'s shared parameters (weighting/groups.py) separately, each with a copy
        of this method and of its state (GradVac's targets are then per group, as in its paper)."""
        if level not in groups.LEVELS:
            raise UserError(f"weighting.groups={level!r} is not one of {', '.join(groups.LEVELS)}")
        if level == "whole":
            return
        if self.grad_target != "params":
            raise UserError(f"weighting.groups={level} groups the shared parameters; grad_target="
                            f"{self.grad_target} has the shared features' gradients instead: use grad_target=params")
        found = groups.column_groups(model, level)
        self.parts = nn.ModuleList(copy.deepcopy(self) for _ in found)
        self.columns = [columns for _, columns in found]
        log.info(f"{type(self).__name__}: aggregating {len(found)} groups of shared parameters separately "
                 f"(weighting.groups={level})")

    def combine_groups(self, grads: torch.Tensor, losses: torch.Tensor, index: list[int], *samples: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`combine` on the whole matrix, or on each group's columns with that group's copy: the updates side by
        side, and the weights' mean over the groups (what the heads and the log get)."""
        if not self.parts:
            return self.combine(grads, losses, index, *samples)
        results = [part.combine(grads[:, columns], losses, index, *(s[:, columns] for s in samples))
                   for part, columns in zip(self.parts, self.columns)]
        return torch.cat([update for update, _ in results]), torch.stack([w.float() for _, w in results]).mean(0)

    def head_weights(self, weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The factor on each task's gradient for its own (task-specific) parameters."""
        return weights if self.loss_weights else torch.ones_like(weights)

    def solver_failed(self, message: str) -> None:
        """A sub-problem did not converge: warn once per run, count every time (logged as grad/solver_failures)."""
        self.solver_failures += 1
        if not self._warned:
            log.warning(f"{type(self).__name__}: {message} (warned once; every failure is counted in "
                        "grad/solver_failures)")
            self._warned = True

    def weights(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.last_weights[self.tasks.index(t)] for t in losses}

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module, scaler: torch.amp.GradScaler,
                 cut: gradients.FeatureCut | None = None, log_grads: bool = False, measure: bool = False,
                 samples: Sequence[Sample] = ()) -> Logs:
        names = list(losses)
        index = [self.tasks.index(t) for t in names]
        refresh = int(self.steps) % self.grad_every == 0
        self.steps += 1
        if not refresh:  # reuse the last loss weights: one ordinary backward
            return super().backward(losses, model, scaler, cut, log_grads, measure)
        jacobian = gradients.task_gradients(list(losses.values()), model, cut, self.grad_target, scaler,
                                             ranks=self.ranks)
        values = torch.stack([losses[t].detach().float() for t in names])
        self.loss_scale = jacobian.scale
        others = [self.sample_gradients(sample, names, model, scaler) for sample in samples]
        if jacobian.finite() and all(gradients.finite(other) for other in others):
            update, weights = self.combine_groups(jacobian.matrix, values, index, *others)
            weights = weights.detach().float()
        else:  # an fp16 overflow: hand the non-finite sum on, so that the GradScaler skips this step
            update, weights = jacobian.matrix.sum(0), self.last_weights[index].float()
        jacobian.apply(update, self.head_weights(weights, values).to(update.dtype))
        if self.loss_weights:
            self.last_weights[index] = weights.to(self.last_weights)
        logs = {f"train/weight/{t}": weights[i] for i, t in enumerate(names)}
        if log_grads:
            logs.update(gradient_stats(jacobian.matrix, names))
            logs["grad/solver_failures"] = sum((part.solver_failures for part in self.parts),
                                               self.solver_failures).float()
        return logs


    def sample_gradients(self, sample: Sample, names: list[str], model: nn.Module,
                         scaler: torch.amp.GradScaler) -> torch.Tensor:
        """The task-gradient matrix of another batch, in the rows' order (`names`); a task without targets in
        that batch gets a zero row. Only its matrix is kept: its graph goes before the next sample's forward."""
        losses, cut = sample()
        present = [t for t in names if t in losses]
        matrix = gradients.task_gradients([losses[t] for t in present], model, cut, self.grad_target, scaler,
                                          ranks=self.ranks).matrix
        if len(present) == len(names):
            return matrix
        rows = matrix.new_zeros(len(names), matrix.shape[1])
        rows[[names.index(t) for t in present]] = matrix
        return rows


def gradient_stats(grads: torch.Tensor, names: list[str]) -> Logs:
    """grad/norm/<task> and the pairwise cosine similarities grad/cos/<a>-<b> of the task gradients."""
    gram = grads @ grads.T
    norms = gram.diagonal().clamp(min=0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-12)
    logs = {f"grad/norm/{t}": norms[i] for i, t in enumerate(names)}
    logs.update({f"grad/cos/{a}-{b}": cos[i, j] for i, a in enumerate(names) for j, b in enumerate(names) if i < j})
    return logs
