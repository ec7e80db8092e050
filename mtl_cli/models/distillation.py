"""What PAD-Net and MTI-Net share: deep supervision of intermediate task predictions, and the multi-modal
distillation between the dense tasks' intermediate features.

Multi-modal distillation (Xu, Ouyang, Wang and Sebe, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation
Network for Simultaneous Depth Estimation and Scene Parsing", CVPR 2018, the attention-guided message passing):
task k's features become F_k + G_k * sum_{t != k} W_t F_t, with the gate G_k = sigmoid(W_g F_k) computed from
task k's own features and W_t, W_g 3x3 convolutions. (The code of Vandenhende et al., Multi-Task-Learning-PyTorch,
computes each message's mask from the sending task's features instead; this follows the paper.)

The intermediate predictions are not task outputs: evaluation, the contract check and the distributed loss read
`outputs[task]` as the final prediction. So decode returns a `TaskOutputs`, the usual {task: final output} with
the intermediate predictions beside its keys, and `task_losses` adds their losses, weighted by `aux_weight`, to
their task's. They are made at the input size (as the reference code upsamples them for the loss), so each is
a mean over the same valid pixels as the final loss, and a task's summed loss still weighs by that count across
processes (engine/distributed.py). In eval mode they are not computed: they serve training alone, so
train/loss/<task> includes them and val/loss/<task> is the final prediction's.

A task is dense when its head returns a map at the input size; the others (image-level classification, counts,
landmarks, detection) keep their usual head on the backbone's maps, outside the distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.models.base import MultiTaskModel


class TaskOutputs(dict):
    """{task: final output}, with `intermediate` = {dense task: [intermediate predictions at the input size]}."""

    def __init__(self, outputs: Mapping[str, torch.Tensor], intermediate: Mapping[str, list[torch.Tensor]]):
        super().__init__(outputs)
        self.intermediate = dict(intermediate)


class DeepSupervised(MultiTaskModel):
    """A MultiTaskModel whose decode returns TaskOutputs: each task's training loss is its final prediction's loss
    plus `aux_weight` times the loss of each of its intermediate predictions."""

    aux_weight = 1.0

    def task_losses(self, tasks: Mapping, outputs: Mapping, batch: Mapping) -> dict[str, torch.Tensor]:
        losses = super().task_losses(tasks, outputs, batch)
        for name, predictions in outputs.intermediate.items():
            if name in losses:
                task = tasks[name]
                aux = sum(task.loss(*task.select(prediction, batch)) for prediction in predictions)
                losses[name] = losses[name] + self.aux_weight * aux
        return losses


def dense_tasks(heads: nn.ModuleDict, channels: Sequence[int], strides: Sequence[int], probe_size: int,
                architecture: str) -> list[str]:
    """The tasks whose head, built on the backbone's maps, returns a [B, C, H, W] map at the input size (one blank
    image in eval mode: nothing is updated, nothing random is drawn). UserError if there is none."""
    maps = [torch.zeros(1, c, max(1, probe_size // s), max(1, probe_size // s)) for c, s in zip(channels, strides)]
    size = (probe_size, probe_size)
    dense = []
    for task, head in heads.items():
        was_training = head.training
        with torch.no_grad():
            output = head.eval()(maps, size)
        head.train(was_training)
        if isinstance(output, torch.Tensor) and output.dim() == 4 and tuple(output.shape[-2:]) == size:
            dense.append(task)
    if not dense:
        raise UserError(f"architecture {architecture} distils between dense (per-pixel) tasks, and none of "
                        f"{', '.join(heads)} has a dense head: add one (e.g. tasks=[segmentation,depth,...]) or use "
                        "architecture=hps")
    return dense


class Distillation(nn.Module):
    """One task's multi-modal distillation at one scale: its features plus the gated messages of the `senders`."""

    def __init__(self, receiver: str, senders: Iterable[str], channels: int):
        super().__init__()
        self.receiver = receiver
        self.messages = nn.ModuleDict({task: nn.Conv2d(channels, channels, 3, padding=1, bias=False)
                                       for task in senders if task != receiver})
        self.gate = nn.Conv2d(channels, channels, 3, padding=1) if self.messages else None

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        own = features[self.receiver]
        if self.gate is None:  # a single dense task: nothing to receive
            return own
        messages = sum(message(features[task]) for task, message in self.messages.items())
        return own + torch.sigmoid(self.gate(own)) * messages


def predictors(heads: Mapping[str, Callable[..., nn.Module]], tasks: Iterable[str], channels: int, stride: int
               ) -> nn.ModuleDict:
    """One intermediate prediction per task from its features (`channels` at `stride`): the task's own kind of head
    (its output channels, its normalisation), so that its own loss applies."""
    return nn.ModuleDict({task: heads[task](in_channels=[channels], strides=[stride]) for task in tasks})
