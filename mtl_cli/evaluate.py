"""mtl eval: score a checkpoint on a split. `evaluate` is also the validation of mtl train, so both agree."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from mtl_cli.build import build_dataset, build_delta, build_loader, build_model, build_tasks, resolve_data
from mtl_cli.engine.checkpoint import load_checkpoint, load_state
from mtl_cli.engine.records import write_record
from mtl_cli.engine.report import metrics_table
from mtl_cli.errors import reports_user_errors
from mtl_cli.paths import config_dir
from mtl_cli.schema import check_config
from mtl_cli.runtime import autocast, config_from_checkpoint, pick_device
from mtl_cli.tasks import Task

log = logging.getLogger("mtl")


def to_device(batch: dict, device: torch.device) -> dict:
    """Moves the tensors of a batch (and lists of tensors) to `device`."""
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True)
        return [move(v) for v in x] if isinstance(x, list) else x
    return {key: move(value) for key, value in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, tasks: dict[str, Task], batches: Iterable[dict], device: torch.device,
             precision: str = "32", keep_examples: int = 0, delta_m: Callable | None = None) -> dict:
    """Losses and metrics of every task over all of `batches` (metrics accumulate over the whole split).

    Returns {"loss": {task: mean loss per sample, "total": sum}, "metrics": {task: {metric: value}},
    "examples": the first `keep_examples` images of the first batch with their outputs and targets}, and
    "delta_m" when `delta_m` (metrics -> delta_m over single-task baselines) is given.
    """
    model.eval()
    for task in tasks.values():
        task.reset_metrics()
    loss_sum = {name: 0.0 for name in tasks}
    count = {name: 0 for name in tasks}
    examples = None
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(precision, device):
            outputs = model(batch["image"])
        for name, task in tasks.items():
            if not task.has_target(batch):
                continue
            output, target = task.select(outputs[name], batch)
            output = output.float() if isinstance(output, torch.Tensor) else output
            mask = task.present(batch)
            n = len(batch["image"]) if mask is None else int(mask.sum())
            if n == 0:
                continue
            loss_sum[name] += float(task.loss(output, target)) * n
            count[name] += n
            task.update_metrics(output, target)
        if examples is None and keep_examples:
            examples = {"image": batch["image"][:keep_examples],
                        "outputs": {k: v[:keep_examples].float() for k, v in outputs.items() if tasks[k].visualize},
                        "targets": {t.name: batch[t.target][:keep_examples] for t in tasks.values()
                                    if t.visualize and t.has_target(batch) and t.present(batch) is None}}
    losses = {name: loss_sum[name] / count[name] for name in tasks if count[name]}
    losses["total"] = sum(losses.values())
    metrics = {name: task.compute_metrics() for name, task in tasks.items() if count[name]}
    results = {"loss": losses, "metrics": metrics, "examples": examples}
    if delta_m is not None:
        results["delta_m"] = delta_m(metrics)
    return results


def flatten(results: dict, prefix: str = "val") -> dict[str, float]:
    """{"loss": ..., "metrics": ..., "delta_m"} -> {"val/loss/<task>": v, "val/<task>/<metric>": v, "val/delta_m"}."""
    scalars = {f"{prefix}/loss/{name}": value for name, value in results["loss"].items()}
    if "delta_m" in results:
        scalars[f"{prefix}/delta_m"] = results["delta_m"]
    for task, values in results["metrics"].items():
        scalars.update({f"{prefix}/{task}/{metric}": value for metric, value in values.items()})
    return scalars


def limited(loader: Iterable, limit: int | None) -> Iterable:
    return loader if limit is None else itertools.islice(loader, int(limit))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
@reports_user_errors("eval")
def main(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint = load_checkpoint(cfg.ckpt, "eval")
    cfg = resolve_data(config_from_checkpoint(checkpoint, cfg))
    check_config(cfg)
    device = pick_device(cfg.trainer.device)
    tasks = {name: task.to(device) for name, task in build_tasks(cfg).items()}
    model = build_model(cfg, tasks)
    load_state(model, checkpoint["model"], "model")
    model.to(device)
    split = cfg.data.split
    loader = build_loader(cfg, build_dataset(cfg, split), pin=device.type == "cuda")
    log.info(f"evaluating {cfg.ckpt} (epoch {checkpoint['epoch']}, step {checkpoint['step']}) on split {split!r}")
    results = evaluate(model, tasks, limited(loader, cfg.trainer.limit_val_batches), device, cfg.trainer.precision,
                       delta_m=build_delta(cfg, tasks))
    directions = {name: task.directions() for name, task in tasks.items()}
    log.info(metrics_table({"value": results}, directions, title=f"{split} metrics"))
    report = {"checkpoint": str(Path(cfg.ckpt).resolve()), "split": split, "epoch": checkpoint["epoch"],
              "step": checkpoint["step"], "loss": results["loss"], "metrics": results["metrics"],
              **({"delta_m": results["delta_m"]} if "delta_m" in results else {}),
              "higher_is_better": directions}
    write_record(run_dir / "eval.json", report)
    log.info(f"wrote {run_dir / 'eval.json'}")
    return report
