"""The training state: everything a run owns and a checkpoint holds, written and read in one place; and `load_run`,
the one way a checkpoint plus this command line's overrides becomes a config (resume, mtl eval, and later predict
and export)."""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtl_cli.build import build_model, build_optimizer, build_scheduler, build_tasks, build_weighting
from mtl_cli.engine.checkpoint import load_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from mtl_cli.engine.distributed import Alone
from mtl_cli.errors import RunFailed, UserError
from mtl_cli.models.base import compile_parts
from mtl_cli.runtime import config_from_checkpoint
from mtl_cli.schema import check_config
from mtl_cli.tasks import Task
from mtl_cli.weighting.base import GradientWeighting, Weighting

log = logging.getLogger("mtl")

COUNTERS = ("epoch", "step", "batch", "best", "best_results", "results", "skipped_steps")


@dataclass
class TrainState:
    """The parts of a run and where it stands. `epoch` counts finished epochs, `step` optimizer steps, `batch` the
    batches drawn so far in the epoch under way (a checkpoint written inside an epoch resumes after them)."""

    cfg: DictConfig
    model: nn.Module
    tasks: dict[str, Task]
    weighting: Weighting
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    epoch: int = 0
    step: int = 0
    batch: int = 0
    best: float | None = None
    best_results: dict | None = None
    results: dict | None = None
    skipped_steps: int = 0
    input_size: list[int] | None = None  # [H, W] of the images trained on: what mtl predict resizes its inputs to
    writes: bool = True  # False on the ranks other than 0 of several processes: their `save` writes nothing

    @functools.cached_property
    def config_text(self) -> str:
        """The config as every checkpoint of the run stores it (it does not change during a run: written once)."""
        return OmegaConf.to_yaml(self.cfg)

    def checkpoint(self) -> dict[str, Any]:
        """Everything an exact resume needs, in types that torch.load(weights_only=True) reads. The config is kept
        unresolved, so that an override on resume (trainer.max_epochs=...) reaches what interpolates it."""
        return {"config": self.config_text, "model": self.model.state_dict(),
                "weighting": self.weighting.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "input_size": self.input_size, **{key: getattr(self, key) for key in COUNTERS}}

    def save(self, path: Path) -> None:
        """Writes the checkpoint atomically; a model holding NaN or infinite weights is never written (the file
        there keeps the last finite ones)."""
        if not self.writes:
            return
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]  # buffers too (BN stats)
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            kept = f"{path} keeps the last finite weights" if path.exists() else f"{path.name} is not written"
            raise NonFinite(f"the model's weights are no longer finite at step {self.step}: {kept}")
        save_checkpoint(self.checkpoint(), path)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Every part, counter and random generator as they were when `checkpoint` was written.

        Settings changed on the resuming command line take effect from the saved point on: new optimizer
        hyperparameters (optimizer.lr=...) replace the saved ones, and a changed schedule (scheduler.*, or
        trainer.max_epochs for the cosine schedule) is rebuilt and replayed up to the saved epoch."""
        load_state(self.model, checkpoint["model"], "model")
        load_state(self.weighting, checkpoint["weighting"], "weighting")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        saved = OmegaConf.create(checkpoint["config"])
        new_optimizer = resolved(saved.optimizer) != resolved(self.cfg.optimizer)
        if new_optimizer:
            for group in self.optimizer.param_groups:
                group.update(self.optimizer.defaults, initial_lr=self.optimizer.defaults["lr"])
        if not new_optimizer and resolved(saved.scheduler) == resolved(self.cfg.scheduler):
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        else:
            self.scheduler = replayed_scheduler(self.cfg, self.optimizer, checkpoint["epoch"])
        self.input_size = checkpoint.get("input_size")
        for key in COUNTERS:  # checkpoints of earlier versions lack `batch` and `skipped_steps`
            setattr(self, key, checkpoint.get(key, 0 if key in ("batch", "skipped_steps") else None))
        set_rng_state(checkpoint["rng"], str(self.cfg.get("resume") or "the checkpoint"))


class NonFinite(RunFailed):
    """The run met a NaN or infinite loss, gradient or weight (trainer.nonfinite)."""


def build_state(cfg: DictConfig, device: torch.device, ranks: Alone | None = None) -> TrainState:
    """Tasks, model, weighting, optimizer, schedule and gradient scaler of `cfg`, on `device`; on several
    processes (`ranks`), the weighting combines the ranks' task gradients and only rank 0's state writes."""
    ranks = ranks or Alone()
    tasks = {name: task.to(device) for name, task in build_tasks(cfg).items()}
    model = build_model(cfg, tasks)
    if cfg.trainer.get("sync_batchnorm"):
        model = sync_batchnorm(model, device, ranks)
    model = model.to(device)
    if cfg.trainer.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        model.memory_format = torch.channels_last
    weighting = build_weighting(cfg, tasks, model).to(device)
    if cfg.trainer.get("compile"):
        compile_parts(model, trunk=compiles_trunk(cfg, weighting))
    weighting.ranks = ranks
    optimizer = build_optimizer(cfg, model, weighting)
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16")
    return TrainState(cfg, model, tasks, weighting, optimizer, build_scheduler(cfg, optimizer), scaler,
                      writes=ranks.main)


def compiles_trunk(cfg: DictConfig, weighting: Weighting) -> bool:
    """Whether torch.compile may take the trunk: not where a step runs T backward passes through it (a gradient
    method on grad_target=params, or trainer.log_grad_conflicts), which through one compiled graph gave wrong
    gradients after the first (torch 2.14; tests/test_compile.py checks it): the heads are compiled, the trunk
    stays eager, and the run says so."""
    repeated = (isinstance(weighting, GradientWeighting) and weighting.grad_target == "params") or bool(
        cfg.trainer.get("log_grad_conflicts"))
    if repeated:
        log.warning(f"trainer.compile: the trunk stays eager ({type(weighting).__name__} on grad_target=params, or "
                    "trainer.log_grad_conflicts, runs one trunk backward per task, which torch.compile gets wrong "
                    "after the first); the heads are compiled. grad_target=representation compiles both")
    return not repeated


def sync_batchnorm(model: nn.Module, device: torch.device, ranks: Alone) -> nn.Module:
    """trainer.sync_batchnorm: batch statistics over the global batch of every rank (torch's SyncBatchNorm)."""
    if device.type != "cuda":
        raise UserError("trainer.sync_batchnorm=true: torch's SyncBatchNorm runs on CUDA GPUs only; on the CPU each "
                        "process normalises its own shard (set it false, or use backbone.norm=group_norm)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if ranks.world > 1 else model


def replayed_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """A schedule built anew from `cfg` and stepped `epochs` times from the optimizer's initial learning rates."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    scheduler = build_scheduler(cfg, optimizer)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": this is a replay
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            scheduler.step()
    return scheduler


def resolved(node) -> object:
    return OmegaConf.to_container(node, resolve=True)


@dataclass(frozen=True)
class HydraValues:
    """What Hydra recorded of this command line, passed in rather than read from Hydra's global: the overrides as
    typed, the group choices, and the config folders searched."""
    typed: list[str]
    groups: Any
    config_sources: Any

    @classmethod
    def of(cls, hydra_cfg) -> HydraValues:
        return cls(list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices, hydra_cfg.runtime.config_sources)


def load_run(path: str | Path, composed: DictConfig, purpose: str, hydra: HydraValues
             ) -> tuple[DictConfig, dict[str, Any]]:
    """The checkpoint at `path` (checked for `purpose`: "eval" or "resume") and the config it was trained with,
    with the overrides typed on this command line applied on top and checked. Resume, mtl eval, and later predict
    and export all start here."""
    checkpoint = load_checkpoint(path, purpose)
    cfg = config_from_checkpoint(checkpoint, composed, typed=hydra.typed, groups=hydra.groups,
                                 config_sources=hydra.config_sources)
    check_config(cfg)
    return cfg, checkpoint


def trained_model(cfg: DictConfig, checkpoint: dict[str, Any], device: torch.device
                  ) -> tuple[dict[str, Task], nn.Module]:
    """The tasks and the model of `cfg` with the checkpoint's weights, on `device`, in eval mode."""
    tasks = {name: task.to(device) for name, task in build_tasks(cfg).items()}
    model = build_model(cfg, tasks)
    load_state(model, checkpoint["model"], "model")
    return tasks, model.to(device).eval()
