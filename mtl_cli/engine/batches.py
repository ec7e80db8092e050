"""The batch loop for scoring: predict a batch, then score it. Validation in `mtl train`, `mtl eval` and the tools
that come (predict, robustness, saliency) share it, and every evaluation scores with fresh metric objects
(`Scores`), so several evaluations may run side by side."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from mtl_cli.losses import mean_count
from mtl_cli.runtime import autocast
from mtl_cli.tasks import Task


def to_device(batch: dict, device: torch.device) -> dict:
    """Moves the tensors of a batch (and lists of tensors) to `device`."""
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        return [move(v) for v in x] if isinstance(x, list) else x
    return {key: move(value) for key, value in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, precision: str = "32") -> dict:
    """Every task's raw output for `image` (the model in eval mode)."""
    model.eval()
    with autocast(precision, image.device):
        return model(image)


class Scores:
    """Losses and metrics of every task, accumulated over all the batches given to `update` (metrics over the whole
    split, never an average of per-batch values), with metric objects of its own. On several processes (`ranks`,
    an engine.distributed.Group) each scores its shard and `compute` combines them (the metrics through
    torchmetrics' own synchronisation), giving every rank the scores of the whole split."""

    def __init__(self, tasks: Mapping[str, Task], ranks=None):
        self.tasks, self.ranks = dict(tasks), ranks
        self.metrics = {name: copy.deepcopy(task.metrics) for name, task in self.tasks.items()}
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.reset()
        self.loss_sum = {name: 0.0 for name in self.tasks}
        self.count = {name: 0.0 for name in self.tasks}  # the terms the losses were means of
        self.samples = {name: 0 for name in self.tasks}

    @torch.no_grad()
    def update(self, outputs: Mapping, batch: Mapping) -> None:
        for name, task in self.tasks.items():
            if not task.has_target(batch):
                continue
            output, target = task.select(outputs[name], batch)
            output = output.float() if isinstance(output, torch.Tensor) else output
            mask = task.present(batch)
            if mask is not None and not bool(mask.any()):
                continue
            terms = float(mean_count(task.loss, output, target))  # the split's mean loss is over all its terms
            self.loss_sum[name] += float(task.loss(output, target)) * terms
            self.count[name] += terms
            self.samples[name] += len(batch["image"]) if mask is None else int(mask.sum())
            prediction = task.decode(output) if task.decode is not None else output
            for metric in self.metrics[name].values():
                metric.update(prediction, target)

    def compute(self) -> dict:
        """{"loss": {task: its loss's mean over all the split's terms (valid pixels, labelled samples), "total": the
        sum}, "metrics": {task: {metric: value}}}, over the tasks that had at least one labelled sample."""
        names = list(self.tasks)
        totals = torch.tensor([[self.loss_sum[n], self.count[n], self.samples[n]] for n in names], dtype=torch.float64)
        if self.ranks is not None:
            totals = self.ranks.total(totals)
        scored = [name for name, (_, _, samples) in zip(names, totals.tolist()) if samples]
        losses = {name: loss_sum / max(count, 1.0) for name, (loss_sum, count, samples) in zip(names, totals.tolist())
                  if samples}
        losses["total"] = sum(losses.values())
        metrics = {name: values(self.metrics[name]) for name in scored}
        return {"loss": losses, "metrics": metrics}


def values(metrics: Mapping) -> dict[str, float]:
    """Every value of every metric; a dict-valued metric gives several."""
    found = {}
    for name, metric in metrics.items():
        result = metric.compute()
        items = result.items() if isinstance(result, Mapping) else [(name, result)]
        found.update({key: float(value) for key, value in items})
    return found


def evaluate(model: nn.Module, tasks: Mapping[str, Task], batches: Iterable[dict], device: torch.device,
             precision: str = "32", keep_examples: int = 0, delta_m: Callable | None = None, ranks=None) -> dict:
    """Scores of `model` over all of `batches`: {"loss", "metrics", "examples"} and "delta_m" when `delta_m`
    (metrics -> delta_m over single-task baselines) is given. "examples": the first `keep_examples` images of the
    first batch with their outputs and targets, for TensorBoard. `ranks`: see Scores."""
    scores = Scores(tasks, ranks)
    examples = None
    for batch in batches:
        batch = to_device(batch, device)
        outputs = predict(model, batch["image"], precision)
        scores.update(outputs, batch)
        if examples is None and keep_examples:
            examples = first_examples(tasks, batch, outputs, keep_examples)
    results = {**scores.compute(), "examples": examples}
    if delta_m is not None:
        results["delta_m"] = delta_m(results["metrics"])
    return results


def first_examples(tasks: Mapping[str, Task], batch: Mapping, outputs: Mapping, n: int) -> dict:
    return {"image": batch["image"][:n],
            "outputs": {k: v[:n].float() for k, v in outputs.items() if tasks[k].visualize},
            "targets": {t.name: batch[t.target][:n] for t in tasks.values()
                        if t.visualize and t.has_target(batch) and t.present(batch) is None}}


def flatten(results: dict, prefix: str = "val") -> dict[str, float]:
    """{"loss": ..., "metrics": ..., "delta_m"} -> {"val/loss/<task>": v, "val/<task>/<metric>": v, "val/delta_m"}."""
    scalars = {f"{prefix}/loss/{name}": value for name, value in results["loss"].items()}
    if "delta_m" in results:
        scalars[f"{prefix}/delta_m"] = results["delta_m"]
    for task, metrics in results["metrics"].items():
        scalars.update({f"{prefix}/{task}/{metric}": value for metric, value in metrics.items()})
    return scalars


def limited(loader: Iterable, limit: int | None) -> Iterable:
    return loader if limit is None else itertools.islice(loader, int(limit))
