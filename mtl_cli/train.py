"""mtl train: the training recipe, read top to bottom. The run's state (engine/state.py) owns every part and the
checkpoint; the loop below only says what happens in what order."""

from __future__ import annotations

import functools
import itertools
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mtl_cli.analysis.affinity import TaskAffinity
from mtl_cli.build import adopt_facts, build_dataset, build_delta, build_loader, call, instantiate, resolve_data
from mtl_cli.data.collate import collate
from mtl_cli.data.held_out import HeldOutBatches
from mtl_cli.engine import distributed
from mtl_cli.engine.batches import evaluate, flatten, limited, to_device
from mtl_cli.engine.checkpoint import CheckpointSchedule
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.monitor import Monitor, Objectives
from mtl_cli.engine.nonfinite import NonFinitePolicy, gradient_norm
from mtl_cli.engine.progress import EpochProgress
from mtl_cli.engine.run import Run
from mtl_cli.engine.state import TrainState, build_state
from mtl_cli.errors import UserError
from mtl_cli.models.summary import input_size, log_summary
from mtl_cli.runtime import autocast, pick_device, seed_everything
from mtl_cli.schema import check_config
from mtl_cli.weighting.base import Lookahead
from mtl_cli.weighting.gradients import FeatureCut

log = logging.getLogger("mtl")


def train(cfg: DictConfig, run_dir: Path, checkpoint: dict | None = None) -> float | list[float]:
    """Trains `cfg` (from `checkpoint` when resuming) into `run_dir`; returns what a Hydra sweeper such as Optuna
    optimises: the best monitored value, or the `objectives` at the best epoch (engine/monitor.py)."""
    run = prepare(cfg, run_dir, checkpoint)
    state, started = run.state, time.perf_counter()
    with run.logger:  # closes the sinks with the run's outcome, after metrics.json (an artifact to some)
        with run.stops:
            while not finished(state):
                train_epoch(run)
                end_epoch(run)
        run.report(time.perf_counter() - started)
        if run.affinity is not None and run.ranks.main:
            run.affinity.finish(run_dir / "metrics.json")
    return run.objectives.values(state.best, state.best_results)


def prepare(cfg: DictConfig, run_dir: Path, checkpoint: dict | None) -> Run:
    """Every part built from the config, restored from `checkpoint` if given; the run dir's config and logger. On
    several processes (launch.py) each rank reads its shard of every batch, and rank 0 alone writes."""
    check_config(cfg)  # types and ranges, also of a checkpoint's config and of each job of a sweep
    seed_everything(cfg.seed)  # the same on every rank: the same initial weights, the same draws of the methods
    ranks = distributed.ranks()
    device = pick_device(cfg.trainer.device)
    autocast(cfg.trainer.precision, device)  # checks the precision before anything is written
    train_set = build_dataset(resolve_data(cfg), "train")
    cfg = adopt_facts(cfg, train_set)  # e.g. the class maps of a folder dataset, built from its train split
    pin, shard = device.type == "cuda", (ranks.rank, ranks.world)
    if int(cfg.data.batch_size) % ranks.world:
        raise UserError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not split evenly over "
                        f"{ranks.world} processes: use a multiple of {ranks.world}")
    train_loader = build_loader(cfg, train_set, train=True, pin=pin, shard=shard)
    if len(train_loader) == 0:  # full batches only: a split smaller than one batch would train nothing, silently
        raise UserError(f"the train split has {len(train_set)} samples, fewer than data.batch_size="
                        f"{cfg.data.batch_size}: no full batch, so no training step. Lower data.batch_size")
    state = build_state(cfg, device, ranks)
    check_batches_per_step(cfg, state, len(train_loader))
    if checkpoint is not None:
        state.restore(checkpoint)
        log.info(f"resumed from {cfg.resume} at epoch {state.epoch}, step {state.step}"
                 + (f", batch {state.batch} of the epoch" if state.batch else ""))
    delta = build_delta(cfg, state.tasks)
    monitor = Monitor(cfg.trainer.monitor, cfg.trainer.monitor_mode, state.tasks, delta is not None)
    objectives = Objectives(cfg.get("objectives"), monitor, state.tasks, delta is not None)
    logger = open_run_dir(cfg, run_dir, state, train_set, device) if ranks.main else Logger(
        run_dir, log_every=cfg.logger.log_every)  # no sinks; the same logged steps as rank 0
    saves = CheckpointSchedule(cfg.trainer.get("checkpoint_every_n_steps"), cfg.trainer.get("checkpoint_every_minutes"))
    val_loader = build_loader(cfg, build_dataset(cfg, cfg.data.split), pin=pin, shard=shard)
    held_out = None
    if state.weighting.held_out_batches:
        held_out = HeldOutBatches(build_dataset(cfg, "held_out"), int(cfg.data.batch_size) // ranks.world,
                                  int(cfg.seed) * ranks.world + ranks.rank, collate)
    affinity = TaskAffinity.of(cfg, list(state.tasks), ranks.world, run_dir,
                               state.epoch if checkpoint is not None else None)  # trainer.task_affinity
    return Run(state, device, logger, run_dir, train_loader, val_loader, monitor, delta, saves, objectives, ranks=ranks,
               progress=EpochProgress(cfg.trainer.progress if ranks.main else "none"),
               nonfinite=NonFinitePolicy(cfg.trainer.nonfinite, cfg.trainer.nonfinite_patience), held_out=held_out,
               affinity=affinity)


def check_batches_per_step(cfg: DictConfig, state: TrainState, batches: int) -> None:
    """A weighting that reads several independent batches per step (MoDo, SDMGrad) needs an epoch of that many."""
    limit = cfg.trainer.limit_train_batches
    batches = batches if limit is None else min(batches, int(limit))
    needed = state.weighting.batches_per_step
    if batches < needed:
        raise UserError(f"weighting {type(state.weighting).__name__} reads {needed} independent batches per step, "
                        f"but an epoch has {batches} (trainer.limit_train_batches={limit}, data.batch_size="
                        f"{cfg.data.batch_size}): allow at least {needed} batches per epoch")


def open_run_dir(cfg: DictConfig, run_dir: Path, state: TrainState, train_set, device: torch.device) -> Logger:
    """The run dir's resolved config, and the configured logger with the config and the model summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(resolved)
    logger: Logger = call(instantiate(cfg.logger, "logger"), "logger", run_dir=run_dir,
                          config=OmegaConf.to_container(cfg, resolve=True))
    logger.text("config", "```yaml\n" + resolved + "\n```")
    log.info(f"run dir: {run_dir}\ndevice: {device}, tasks: {', '.join(state.tasks)}, weighting: "
             f"{type(state.weighting).__name__}")
    log_summary(state.model, input_size(train_set), cfg, logger)
    return logger


def finished(state: TrainState) -> bool:
    max_steps = state.cfg.trainer.max_steps
    return state.epoch >= int(state.cfg.trainer.max_epochs) or (max_steps is not None and state.step >= max_steps)


def train_epoch(run: Run) -> None:
    """The rest of epoch `state.epoch`, from batch `state.batch` on, in the order of (seed, epoch) alone. last.pt
    is written on the checkpoint schedule and when a scheduler asks the run to stop."""
    state, cfg = run.state, run.state.cfg
    length = len(run.train_loader)
    if cfg.trainer.limit_train_batches is not None:
        length = min(length, int(cfg.trainer.limit_train_batches))
    run.train_loader.batch_sampler.set_epoch(state.epoch)
    run.train_loader.batch_sampler.skip(state.batch)
    state.model.start_epoch(state.epoch, int(cfg.trainer.max_epochs))
    run.progress.start(state.epoch, int(cfg.trainer.max_epochs), length, state.batch)
    train_batches(run, limited(run.train_loader, length - state.batch), length)
    run.progress.stop()


def train_batches(run: Run, batches, length: int) -> None:
    """The steps over `batches`, the rest of an epoch `length` batches long."""
    state, cfg = run.state, run.state.cfg
    state.model.train()
    state.weighting.train()
    for group in steps_of(batches, state.weighting.batches_per_step):
        state.batch += len(group)
        if len(group) == state.weighting.batches_per_step:  # an epoch's last, short group would lack a sample
            train_step(run, *group)
        received = run.ranks.agree(run.stops.received)  # every rank stops after the same step
        if received is not None:
            run.stops.received = received
            run.stop()
        if state.batch < length and run.saves.due(state.step):  # the epoch's end writes its own
            state.save(run.last)
            run.saves.saved(state.step)
        if cfg.trainer.max_steps is not None and state.step >= cfg.trainer.max_steps:
            break


def train_step(run: Run, batch: dict, *samples: dict) -> None:
    """One optimizer step on `batch`: forward through the feature cut, the weighting fills the gradients, the
    optimizer steps unless a loss or gradient is not finite (engine/nonfinite.py). `samples`: the independent
    batches a weighting asks for besides (`batches_per_step`), whose losses it computes when it needs them."""
    state, cfg = run.state, run.state.cfg
    batch = to_device(run.check_targets(batch), run.device)
    ahead = Lookahead(state.model, functools.partial(plain_losses, run, batch),
                      [functools.partial(held_out_losses, run, k) for k in range(state.weighting.held_out_batches)],
                      state.optimizer.param_groups[0]["lr"], run.ranks.world)
    if run.affinity is not None:  # TAG's probe, when due; it leaves no trace (analysis/affinity.py)
        run.affinity.step(state.model, ahead.batch, ahead.lr, state.optimizer, state.step)
    state.weighting.before_step(ahead)
    outputs, losses, cut = forward(run, batch)
    if not losses:  # no sample of this batch has a label of any task: nothing to learn from it
        return
    state.optimizer.zero_grad(set_to_none=True)
    logged = (state.step + 1) % run.logger.log_every == 0
    probes = [functools.partial(sample_losses, run, sample) for sample in samples]
    logs = state.weighting.backward(losses, state.model, state.scaler, cut, log_grads=logged,
                                    measure=logged and bool(cfg.trainer.log_grad_conflicts), samples=probes)
    del outputs, cut  # the step's graph goes now, not after the next forward
    run.ranks.average_grads(p for group in state.optimizer.param_groups for p in group["params"])
    norm = gradient_norm(state, cfg.trainer.grad_clip)  # clipped to trainer.grad_clip if set
    if not run.nonfinite.allows(state, losses, norm, run.last):
        return
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.weighting.after_step(functools.partial(losses_after_step, run, batch))
    state.step += 1
    run.meter.add(logs, losses, len(batch["image"]) * run.ranks.world)
    info = None
    if state.step % run.logger.log_every == 0:
        scalars = {**run.meter.take(), "lr": state.optimizer.param_groups[0]["lr"],
                   "train/skipped_steps": state.skipped_steps}
        run.logger.scalars(scalars, state.step)
        info = {tag.removeprefix("train/loss/"): v for tag, v in scalars.items() if tag.startswith("train/loss/")}
    run.progress.advance(state.step, info)


def forward(run: Run, batch: dict) -> tuple[dict, dict, FeatureCut]:
    """(outputs, the loss of each task with targets in `batch`, the feature cut) on a batch already on the device.
    The model names its tasks' losses (an architecture with intermediate predictions adds their losses)."""
    state = run.state
    with autocast(state.cfg.trainer.precision, run.device):
        outputs, cut = state.model.forward_cut(batch["image"])  # heads read leaf copies: see models/base.py
        losses = state.model.task_losses(state.tasks, outputs, batch)
    return outputs, run.ranks.losses(losses, state.tasks, outputs, batch), cut  # ranks: the global batch's means


def sample_losses(run: Run, sample: dict) -> tuple[dict, FeatureCut]:
    """A weighting's independent sample: its task losses and feature cut, computed when the weighting asks."""
    _, losses, cut = forward(run, to_device(run.check_targets(sample), run.device))
    return losses, cut


def plain_losses(run: Run, batch: dict) -> dict:
    """The task losses on `batch` through the whole model (no feature cut): their graph reaches every parameter."""
    state = run.state
    with autocast(state.cfg.trainer.precision, run.device):
        outputs = state.model(batch["image"])
        losses = state.model.task_losses(state.tasks, outputs, batch)
    return run.ranks.losses(losses, state.tasks, outputs, batch)


def held_out_losses(run: Run, k: int) -> dict:
    """The task losses on the step's k-th held-out batch (data/held_out.py)."""
    batch = run.held_out.batch(run.state.step, k)
    return plain_losses(run, to_device(run.check_targets(batch), run.device))


@torch.no_grad()
def losses_after_step(run: Run, batch: dict) -> dict:
    """The task losses on the step's batch with the updated weights, for a weighting that learns from them."""
    return {name: loss.detach().float() for name, loss in forward(run, batch)[1].items()}


def steps_of(batches, size: int):
    """The batches in groups of `size`: one optimizer step each."""
    iterator = iter(batches)
    while group := list(itertools.islice(iterator, size)):
        yield group


def end_epoch(run: Run) -> None:
    """The epoch is done: step the schedule, validate when due, keep the best and the last checkpoint."""
    state, cfg = run.state, run.state.cfg
    state.epoch, state.batch = state.epoch + 1, 0
    state.scheduler.step()
    state.weighting.epoch_end()
    if run.affinity is not None:
        run.affinity.epoch_end(state.epoch, state.step, run.logger)
    improved = False
    if finished(state) or state.epoch % int(cfg.trainer.val_every) == 0:
        improved = validate(run)
    if improved:
        state.save(run.run_dir / "checkpoints" / "best.pt")
    state.save(run.last)
    run.saves.saved(state.step)


def validate(run: Run) -> bool:
    """Scores the validation split; returns whether the monitored value improved."""
    state = run.state
    batches = limited(run.val_loader, state.cfg.trainer.limit_val_batches)
    try:
        results = evaluate(state.model, state.tasks, batches, run.device, state.cfg.trainer.precision,
                           run.logger.num_images, run.delta, run.ranks)
    except UserError as e:  # bad validation data (a label, a file): the epoch's training is kept first
        if not state.writes:  # another rank's: rank 0 is waiting for this one, which cannot save
            raise
        state.save(run.last)
        raise UserError(f"{e}. Epoch {state.epoch}'s training is saved: once fixed, go on with "
                        f"mtl train resume={run.last}") from None
    run.logger.validation(state.tasks, results, state.step)
    state.results = {key: results[key] for key in ("loss", "metrics", "delta_m") if key in results}
    state.results["epoch"] = state.epoch
    log.info(f"epoch {state.epoch}/{state.cfg.trainer.max_epochs} " + "  ".join(
        f"{k.removeprefix('val/')} {v:.4g}" for k, v in flatten(results).items()))
    if not run.monitor.improved(results, state.best):
        return False
    state.best, state.best_results = run.monitor.value(results), state.results
    return True
