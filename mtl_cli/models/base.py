"""The contract every architecture keeps, which the training step and the weighting methods rely on
(weighting/gradients.py), and the helpers the architectures share.

`encode(image)` computes the trunk, a list of feature maps, from `shared_parameters()` alone; `decode(features,
size)` computes each task's output from those features alone, with modules of its own (heads, attention masks,
gates); `parts()` names the modules of the trunk (`shared`) and of each task, for the model summary.
`forward_cut` is the training step's forward: the heads read leaf copies of the features (a FeatureCut), so that
the per-task gradients stop at the trunk's output. `check_contract` refuses, at build time, a model whose decode
breaks the contract in a way the gradients would silently get wrong.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from mtl_cli.errors import UserError
from mtl_cli.weighting.gradients import FeatureCut


class MultiTaskModel(nn.Module, ABC):
    """image -> encode (the trunk) -> features -> decode (each task's own modules) -> {task: output}."""

    @abstractmethod
    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's feature maps, computed from `shared_parameters()` alone."""

    @abstractmethod
    def decode(self, features: list[torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Each task's output from `features` alone; dense outputs at `size`, the input's height and width."""

    @abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The trunk's parameters: those `encode` uses."""

    @abstractmethod
    def parts(self) -> dict[str, list[nn.Module]]:
        """{"shared": the trunk's modules, task: that task's modules}, for the model summary."""

    def decode_shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of `decode` that several tasks' outputs use on purpose (none by default). The gradient
        methods treat them as head parameters of every task that uses them (the head weights combine their task
        gradients); `check_contract` refuses any other parameter of decode that two tasks reach."""
        return iter(())

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Called by the run before each training epoch (`epoch` counts from 0; again after a resume): an
        architecture whose training forward depends on the progress (ltb's Gumbel temperature) reads it here."""

    memory_format = torch.contiguous_format  # trainer.channels_last sets torch.channels_last: the images follow

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(image.contiguous(memory_format=self.memory_format)), image.shape[-2:])

    def forward_cut(self, image: torch.Tensor) -> tuple[dict[str, torch.Tensor], FeatureCut]:
        """The outputs, computed from the leaf copies of the trunk's features, and the cut (see FeatureCut)."""
        cut = FeatureCut(self.encode(image.contiguous(memory_format=self.memory_format)))
        return self.decode(cut.leaves, image.shape[-2:]), cut

    def task_losses(self, tasks: Mapping, outputs: Mapping, batch: Mapping) -> dict[str, torch.Tensor]:
        """The training loss of each task with targets in `batch`, from the outputs of `forward_cut`. An
        architecture whose decode also makes intermediate predictions adds their (deep-supervision) losses to
        their task's here."""
        return {name: task.loss(*task.select(outputs[name], batch))
                for name, task in tasks.items() if task.has_target(batch)}

    def check_contract(self, size: int | None = None) -> None:
        """Raises UserError if decode reaches a trunk parameter, or if a parameter of decode serves two or more
        tasks without being declared in `decode_shared_parameters()`.

        An empty batch of images of `size` (default: the backbone's probe size) goes through encode without
        autograd and through decode with it, in eval mode: no arithmetic to speak of, no statistics updated, no
        random draw. Each task's output is then traced back through its autograd graph to the parameters it
        reaches (no backward pass runs). A decode that cannot take an empty batch gets one image instead."""
        size = size or next((m.probe_size for m in self.modules() if hasattr(m, "probe_size")), 64)
        try:
            outputs = self._decode_probe(0, size)
        except (RuntimeError, IndexError, ValueError):
            outputs = self._decode_probe(1, size)
        users: dict[int, list[str]] = {}
        for task, output in outputs.items():
            for key in reached_parameters(output.values() if isinstance(output, Mapping) else [output]):
                users.setdefault(key, []).append(task)
        name = {id(p): n for n, p in self.named_parameters()}
        shared = {id(p) for p in self.shared_parameters()}
        declared = {id(p) for p in self.decode_shared_parameters()}
        where = f"architecture {type(self).__name__}"
        for key in name:  # in the model's order, so that the first fault is named
            tasks = users.get(key, [])
            if tasks and key in shared:
                raise UserError(f"{where}: decode uses the trunk parameter {name[key]} (for {', '.join(tasks)}); "
                                "the task outputs must come from encode's features alone: compute it in encode")
            if len(tasks) > 1 and key not in declared:
                raise UserError(f"{where}: the decode parameter {name[key]} serves several tasks "
                                f"({', '.join(tasks)}), so every gradient method would treat it as each one's head: "
                                "move it into encode and shared_parameters(), or list it in "
                                "decode_shared_parameters() if a shared decoder is intended")

    def _decode_probe(self, batch: int, size: int) -> dict[str, torch.Tensor]:
        """decode's outputs, with their autograd graph, for `batch` blank images; features without one."""
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                features = self.encode(torch.zeros(batch, 3, size, size, device=next(self.parameters()).device))
            with torch.enable_grad():  # (also when built under no_grad)
                return self.decode(features, (size, size))
        finally:
            self.train(was_training)


def compile_parts(model: MultiTaskModel, trunk: bool = True) -> None:
    """trainer.compile: torch.compile the modules of each task and, if `trunk`, of the trunk, in place (their
    state_dict keys stay), leaving the feature cut between them eager."""
    # Gradient methods run several backward passes over one graph (retain_graph); a compiled backward that donates
    # its buffers allows only one, and torch's own message names this switch.
    torch._functorch.config.donated_buffer = False
    for part, modules in model.parts().items():
        if part != "shared" or trunk:
            for module in modules:
                module.compile()


def reached_parameters(tensors) -> set[int]:
    """The ids of the parameters (leaves that require grad) whose gradient the `tensors` would reach: a walk of
    their autograd graph, cheaper than a backward pass."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    found, seen = {id(t) for t in tensors if t.grad_fn is None}, set()  # (a parameter returned as it is)
    stack = [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # an AccumulateGrad node: it writes the gradient of one leaf
            found.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def make_heads(heads: Mapping[str, Callable[..., nn.Module]], channels: list[int], strides: list[int]
               ) -> nn.ModuleDict:
    """One head per task, each built for maps of `channels` at `strides`."""
    return nn.ModuleDict({task: make(in_channels=channels, strides=strides) for task, make in heads.items()})


def conv_bn(c_in: int, c_out: int, kernel: int, last: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out), last)
