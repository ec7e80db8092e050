"""mtl train: the training recipe, one loop read top to bottom."""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtl_cli.build import (adopt_facts, build_dataset, build_delta, build_loader, build_model, build_optimizer,
                           build_scheduler, build_tasks, build_weighting, call, instantiate, resolve_data)
from mtl_cli.engine.checkpoint import load_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.progress import EpochProgress
from mtl_cli.data.collate import PRESENT
from mtl_cli.engine.report import metrics_table
from mtl_cli.engine.records import write_record
from mtl_cli.errors import Interrupted, UserError, reports_user_errors
from mtl_cli.evaluate import evaluate, flatten, limited, to_device
from mtl_cli.models.summary import summarize, summary_markdown, summary_table
from mtl_cli.paths import config_dir
from mtl_cli.runtime import autocast, config_from_checkpoint, pick_device, seed_everything, without_trust
from mtl_cli.schema import check_config
from mtl_cli.tasks import Task
from mtl_cli.weighting.base import Weighting
from mtl_cli.weighting.gradients import FeatureCut

log = logging.getLogger("mtl")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@reports_user_errors("train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best value of the monitored metric (what a Hydra sweeper such as Optuna optimises)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint, resume = None, resume_path(cfg.resume, run_dir)
    if resume is not None:
        checkpoint = load_checkpoint(resume, "resume")
        cfg = config_from_checkpoint(checkpoint, cfg)
    try:
        return train(without_trust(cfg), run_dir, checkpoint)
    except KeyboardInterrupt:
        last = run_dir / "checkpoints" / "last.pt"
        raise Interrupted(f"the last checkpoint is {last}: continue with mtl train resume={last}" if last.is_file()
                          else f"no checkpoint was written yet in {run_dir}") from None


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """resume=auto: the run dir's own last.pt when there is one (a requeued job continues), else a fresh start."""
    if resume != "auto":
        return None if resume is None else Path(str(resume))
    last = run_dir / "checkpoints" / "last.pt"
    return last if last.is_file() else None


def train(cfg: DictConfig, run_dir: Path, checkpoint: dict | None = None) -> float | None:
    # 1. Build every part from the config.
    check_config(cfg)  # types and ranges, also of a checkpoint's config and of each job of a sweep
    seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)
    autocast(cfg.trainer.precision, device)  # checks the precision before anything is written
    train_set = build_dataset(resolve_data(cfg), "train")
    cfg = adopt_facts(cfg, train_set)  # e.g. the class maps of a folder dataset, built from its train split
    tasks = {name: task.to(device) for name, task in build_tasks(cfg).items()}
    shuffle = torch.Generator()
    pin = device.type == "cuda"
    train_loader = build_loader(cfg, train_set, shuffle=shuffle, pin=pin)
    if len(train_loader) == 0:  # full batches only: a split smaller than one batch would train nothing, silently
        raise UserError(f"the train split has {len(train_set)} samples, fewer than data.batch_size="
                        f"{cfg.data.batch_size}: no full batch, so no training step. Lower data.batch_size")
    val_loader = build_loader(cfg, build_dataset(cfg, cfg.data.split), pin=pin)
    model = build_model(cfg, tasks).to(device)
    weighting = build_weighting(cfg, tasks).to(device)
    optimizer = build_optimizer(cfg, model, weighting)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16")
    delta = build_delta(cfg, tasks)
    monitor = Monitor(cfg.trainer.monitor, cfg.trainer.monitor_mode, tasks, delta is not None)
    state = {"epoch": 0, "step": 0, "best": None, "best_results": None, "results": None}

    # 2. Resume: every part and every random generator as they were at the end of the saved epoch.
    if checkpoint is not None:
        scheduler = restore(checkpoint, cfg, model, weighting, optimizer, scheduler, scaler)
        state.update({key: checkpoint[key] for key in state})
        set_rng_state(checkpoint["rng"])
        log.info(f"resumed from {cfg.resume} at epoch {state['epoch']}, step {state['step']}")

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger: Logger = call(instantiate(cfg.logger, "logger"), "logger", run_dir=run_dir)
    logger.text("config", "```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "\n```")
    log.info(f"run dir: {run_dir}\ndevice: {device}, tasks: {', '.join(tasks)}, weighting: "
             f"{type(weighting).__name__}")
    size = input_size(train_set)
    title = f"model: {type(model).__name__}, {cfg.backbone.get('name', 'small_cnn')}, {size[0]}x{size[1]} input"
    rows = summarize(model, size)
    log.info(summary_table(rows, title))
    logger.text("model", summary_markdown(rows, title))

    # 3. The epochs: train, validate, keep the best and the last checkpoint.
    max_epochs, max_steps = int(cfg.trainer.max_epochs), cfg.trainer.max_steps
    progress = EpochProgress(cfg.trainer.progress)
    started = time.perf_counter()
    limit, first_epoch = cfg.trainer.limit_train_batches, state["epoch"]
    for epoch in range(state["epoch"], max_epochs):
        shuffle.manual_seed(epoch_seed(cfg.seed, epoch))  # the order depends on (seed, epoch) alone: exact resume
        batches = limited(train_loader, limit)
        progress.start(epoch, max_epochs, len(train_loader) if limit is None else min(len(train_loader), limit))
        state["step"] = train_epoch(model, tasks, weighting, optimizer, scaler, batches, device, cfg, logger,
                                    progress, state["step"], check_targets=epoch == first_epoch)
        progress.stop()
        scheduler.step()
        weighting.epoch_end()
        state["epoch"] = epoch + 1
        done = state["epoch"] >= max_epochs or (max_steps is not None and state["step"] >= max_steps)

        improved = False
        if done or state["epoch"] % int(cfg.trainer.val_every) == 0:
            val_batches = limited(val_loader, cfg.trainer.limit_val_batches)
            results = evaluate(model, tasks, val_batches, device, cfg.trainer.precision, logger.num_images, delta)
            log_validation(logger, tasks, results, state["step"])
            state["results"] = {key: results[key] for key in ("loss", "metrics", "delta_m") if key in results}
            state["results"]["epoch"] = state["epoch"]
            log.info(f"epoch {state['epoch']}/{max_epochs} " + "  ".join(
                f"{k.removeprefix('val/')} {v:.4g}" for k, v in flatten(results).items()))
            improved = monitor.improved(results, state["best"])
            if improved:
                state["best"], state["best_results"] = monitor.value(results), state["results"]
        snapshot = checkpoint_state(cfg, model, weighting, optimizer, scheduler, scaler, state)
        if improved:
            save_checkpoint(snapshot, run_dir / "checkpoints" / "best.pt")
        save_checkpoint(snapshot, run_dir / "checkpoints" / "last.pt")
        if done:
            break

    # 4. Report: the table, metrics.json, the monitored best for sweepers.
    logger.close()
    write_report(run_dir, tasks, state, monitor, time.perf_counter() - started)
    return state["best"]


def train_epoch(model: nn.Module, tasks: dict[str, Task], weighting: Weighting, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, batches, device: torch.device, cfg: DictConfig, logger: Logger,
                progress: EpochProgress, step: int, check_targets: bool = False) -> int:
    """One pass over `batches`; returns the global step count. Losses are summed on the device and read
    (a synchronisation) only every logger.log_every steps."""
    model.train()
    weighting.train()
    max_steps, grad_clip = cfg.trainer.max_steps, cfg.trainer.grad_clip
    conflicts = bool(cfg.trainer.log_grad_conflicts)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    checked: set[frozenset] = set()
    samples, window_start = 0, time.perf_counter()
    for batch in batches:
        if check_targets:  # once per set of tasks present (one set, or one per member of data=multi)
            present = frozenset(name for name, task in tasks.items() if task.has_target(batch))
            if present not in checked:
                check_batch(tasks, batch, several=cfg.data.get("members") is not None)
                checked.add(present)
        batch = to_device(batch, device)
        with autocast(cfg.trainer.precision, device):
            cut = FeatureCut(model.encode(batch["image"]))  # heads read leaf copies: see weighting/gradients.py
            outputs = model.decode(cut.leaves, batch["image"].shape[-2:])
            losses = {name: task.loss(*task.select(outputs[name], batch))
                      for name, task in tasks.items() if task.has_target(batch)}
        if not losses:  # no sample of this batch has a label of any task: nothing to learn from it
            continue
        optimizer.zero_grad(set_to_none=True)
        logged = (step + 1) % logger.log_every == 0
        logs = weighting.backward(losses, model, scaler, cut, log_grads=logged, measure=logged and conflicts)
        losses = {name: loss.detach() for name, loss in losses.items()}
        del outputs, cut  # the step's graph goes now, not after the next forward
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], float(grad_clip))
        scaler.step(optimizer)
        scaler.update()
        step += 1
        samples += len(batch["image"])

        logs.update({f"train/loss/{name}": loss.detach().float() for name, loss in losses.items()})
        logs["train/loss/total"] = sum(logs[f"train/loss/{name}"] for name in losses)
        for tag, value in logs.items():  # summed on the device: no synchronisation until the log step
            sums[tag] = sums.get(tag, 0) + value
            counts[tag] = counts.get(tag, 0) + 1
        info = None
        if step % logger.log_every == 0:
            scalars = {tag: float(value) / counts[tag] for tag, value in sums.items()}
            elapsed = time.perf_counter() - window_start
            scalars.update({"lr": optimizer.param_groups[0]["lr"], "perf/samples_per_s": samples / elapsed})
            logger.scalars(scalars, step)
            info = {tag.removeprefix("train/loss/"): v for tag, v in scalars.items() if tag.startswith("train/loss/")}
            sums, counts, samples, window_start = {}, {}, 0, time.perf_counter()
            if not all(math.isfinite(v) for v in info.values()):
                log.warning(f"step {step}: a loss is not finite: {info}")
        progress.advance(step, info)
        if max_steps is not None and step >= max_steps:
            break
    return step


def restore(checkpoint: dict, cfg: DictConfig, model: nn.Module, weighting: Weighting,
            optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler):
    """Loads the saved states; returns the scheduler to go on with.

    Settings changed on the resuming command line take effect from the saved epoch on: new optimizer
    hyperparameters (optimizer.lr=...) replace the saved ones, and a changed schedule (scheduler.*, or
    trainer.max_epochs for the cosine schedule) is rebuilt and replayed up to the saved epoch."""
    load_state(model, checkpoint["model"], "model")
    load_state(weighting, checkpoint["weighting"], "weighting")
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    saved = OmegaConf.create(checkpoint["config"])
    new_optimizer = resolved(saved.optimizer) != resolved(cfg.optimizer)
    if new_optimizer:
        for group in optimizer.param_groups:
            group.update(optimizer.defaults, initial_lr=optimizer.defaults["lr"])
    if not new_optimizer and resolved(saved.scheduler) == resolved(cfg.scheduler):
        scheduler.load_state_dict(checkpoint["scheduler"])
        return scheduler
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    scheduler = build_scheduler(cfg, optimizer)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": this is a replay
        warnings.simplefilter("ignore")
        for _ in range(checkpoint["epoch"]):
            scheduler.step()
    return scheduler


def resolved(node) -> object:
    return OmegaConf.to_container(node, resolve=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's shuffle, independent across (seed, epoch) pairs (seed + epoch would make seed 1
    replay seed 0's orders one epoch later)."""
    return int(np.random.SeedSequence([int(seed), epoch]).generate_state(1)[0])


def input_size(dataset) -> tuple[int, int]:
    """The image size of the first sample that is not a skipped bad file; its random augmentation draws from a
    forked generator, so that the run's random stream (and an exact resume) does not depend on this look."""
    with torch.random.fork_rng(devices=[]):
        first = next((s for s in map(dataset.__getitem__, range(len(dataset))) if s), None)
    if first is None:
        raise UserError("every sample of the train split is bad (data.skip_bad=true skipped them all)")
    return tuple(first["image"].shape[-2:])


def check_batch(tasks: dict[str, Task], batch: dict, several: bool = False) -> None:
    """Every task's target is in the data, and its labels fit the task's class count. With several datasets
    (`several`) a batch holds the targets of one of them only, and data.tasks was checked instead."""
    for task in tasks.values():
        if not task.has_target(batch) and (several or any(PRESENT + key in batch for key in task.keys)):
            continue  # no sample of this batch has the label
        if not task.has_target(batch):
            keys = ", ".join(k for k in batch if k != "image")
            missing = [k for k in task.keys if k not in batch]
            raise UserError(f"task {task.name!r} reads the target {', '.join(missing)!r}, which the data does not "
                            f"provide (its batches hold: {keys})")
        task.check_targets(batch)


def log_validation(logger: Logger, tasks: dict[str, Task], results: dict, step: int) -> None:
    """Validation scalars, and example predictions next to their targets as images."""
    logger.scalars(flatten(results), step)
    examples = results["examples"]
    if not examples:
        return
    logger.images("images/input", examples["image"], step)
    for name, task in tasks.items():
        if task.visualize is not None and name in examples["targets"]:
            pair = [task.visualize(examples["targets"][name]), task.visualize(examples["outputs"][name])]
            logger.images(f"images/{name} (target | prediction)", torch.cat(pair, dim=-1), step)


class Monitor:
    """The quantity best.pt is chosen on: val/loss/total, val/loss/<task> or val/<task>/<metric>."""

    def __init__(self, name: str, mode: str, tasks: dict[str, Task], delta_m: bool = False):
        directions = {f"val/{task}/{metric}": higher for task in tasks
                      for metric, higher in tasks[task].directions().items()}
        directions.update({f"val/loss/{task}": False for task in [*tasks, "total"]})
        if delta_m:
            directions["val/delta_m"] = True
        if name not in directions:
            hint = " (val/delta_m needs baselines or baselines_from)" if name == "val/delta_m" else ""
            raise UserError(f"trainer.monitor={name!r} is not logged by this run{hint}; choose one of: "
                            + ", ".join(sorted(directions)))
        if mode not in ("auto", "max", "min"):
            raise UserError(f"trainer.monitor_mode={mode!r} is not one of auto, max, min")
        self.name = name
        self.mode = mode if mode != "auto" else ("max" if directions[name] else "min")

    def value(self, results: dict) -> float:
        """The monitored value; NaN when validation did not compute it (trainer.limit_val_batches cut it off)."""
        return flatten(results).get(self.name, math.nan)

    def improved(self, results: dict, best: float | None) -> bool:
        value = self.value(results)
        if best is None or (math.isnan(best) and not math.isnan(value)):
            return True
        return value > best if self.mode == "max" else value < best


def checkpoint_state(cfg, model, weighting, optimizer, scheduler, scaler, state) -> dict:
    """Everything an exact resume needs, in types that torch.load(weights_only=True) reads. The config is kept
    unresolved, so that an override on resume (trainer.max_epochs=...) reaches what interpolates it."""
    return {"config": OmegaConf.to_yaml(cfg), "model": model.state_dict(),
            "weighting": weighting.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(), **state}


def write_report(run_dir: Path, tasks: dict[str, Task], state: dict, monitor: Monitor, seconds: float) -> None:
    directions = {name: task.directions() for name, task in tasks.items()}
    final, best = state["results"], state["best_results"]
    columns = {f"final (epoch {final['epoch']})": final} if final else {}
    if best:
        columns[f"best (epoch {best['epoch']})"] = best
    if columns:
        log.info(metrics_table(columns, directions, title=f"validation metrics (best on {monitor.name}, {monitor.mode})"))
    report = {"final": final, "best": best, "monitor": {"name": monitor.name, "mode": monitor.mode,
                                                        "value": state["best"]},
              "epochs": state["epoch"], "steps": state["step"], "train_seconds": round(seconds, 2),
              "higher_is_better": directions}
    write_record(run_dir / "metrics.json", report)
    log.info(f"wrote {run_dir / 'metrics.json'} and checkpoints in {run_dir / 'checkpoints'}")
