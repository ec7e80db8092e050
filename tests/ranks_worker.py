"""What one rank does in tests/test_distributed.py (a module of its own, so that the processes torch's launcher
spawns can import it): the trainer's own steps and scoring on this rank's shard of the global batches."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mtl_cli.build import build_dataset, build_loader, build_model, build_optimizer, build_scheduler, build_tasks, \
    build_weighting
from mtl_cli.engine import distributed
from mtl_cli.engine.batches import evaluate
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.run import Run
from mtl_cli.engine.state import TrainState
from mtl_cli.models.norms import replace_norms
from mtl_cli.runtime import seed_everything
from mtl_cli.train import train_step

STEPS = 5


class Recorder(Logger):
    """Every scalar the step logs, per step."""

    def __init__(self, run_dir):
        super().__init__(run_dir, tensorboard=False, log_every=1)
        self.steps: list[dict] = []

    def scalars(self, values, step):
        self.steps.append({tag: float(v) for tag, v in values.items() if not tag.startswith("perf/")})


def state_without_batch_norm(cfg, ranks) -> TrainState:
    """build_state with group norm in place of every batch norm (the heads' too): batch statistics of a shard are
    not those of the global batch, which is what trainer.sync_batchnorm is for on GPUs."""
    seed_everything(cfg.seed)
    tasks = build_tasks(cfg)
    model = build_model(cfg, tasks)
    replace_norms(model, "group_norm", "test model", groups=4)
    weighting = build_weighting(cfg, tasks)
    weighting.ranks = ranks
    optimizer = build_optimizer(cfg, model, weighting)
    return TrainState(cfg, model, tasks, weighting, optimizer, build_scheduler(cfg, optimizer),
                      torch.amp.GradScaler("cpu", enabled=False), writes=ranks.main)


def train_steps(config: str) -> dict:
    """STEPS training steps on this rank's shard of the global batches: the logged scalars (losses, weights) of
    each step and the final parameters and weighting state."""
    cfg = OmegaConf.create(config)
    ranks = distributed.ranks()
    state = state_without_batch_norm(cfg, ranks)
    initial = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True, shard=(ranks.rank, ranks.world))
    loader.batch_sampler.set_epoch(0)
    with tempfile.TemporaryDirectory() as folder:
        run = Run(state, torch.device("cpu"), Recorder(folder), Path(folder), ranks=ranks)
        state.model.train()
        for batch, _ in zip(loader, range(STEPS)):
            train_step(run, batch)
    params = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    moved = max(float((v - initial[k]).abs().max()) for k, v in params.items() if v.is_floating_point())
    return {"scalars": run.logger.steps, "params": params, "moved": moved,
            "weighting": {k: v.clone() for k, v in state.weighting.state_dict().items()}}


def steps_from(config: str, checkpoint: bytes | None, first: int, last: int) -> dict:
    """Batches first..last of epoch 0 on this rank's shard, from `checkpoint` (the bytes of a file written after
    batch `first`, by any number of processes) if given: the checkpoint's bytes and the parameters after them.
    (Bytes, as in a file: tensors handed to another process share its memory, and every rank would then step one
    optimizer state.)"""
    if checkpoint is not None:
        checkpoint = torch.load(io.BytesIO(checkpoint), weights_only=True)
    cfg = OmegaConf.create(config)
    ranks = distributed.ranks()
    state = state_without_batch_norm(cfg, ranks)
    if checkpoint is not None:
        state.restore(checkpoint)
        assert state.batch == first
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True, shard=(ranks.rank, ranks.world))
    loader.batch_sampler.set_epoch(0)
    loader.batch_sampler.skip(first)
    with tempfile.TemporaryDirectory() as folder:
        run = Run(state, torch.device("cpu"), Recorder(folder), Path(folder), ranks=ranks)
        state.model.train()
        for batch, _ in zip(loader, range(last - first)):
            state.batch += 1
            train_step(run, batch)
    saved = io.BytesIO()
    torch.save(state.checkpoint(), saved)
    return {"checkpoint": saved.getvalue(), "params": {k: v.detach().clone() for k, v in state.model.state_dict().items()}}


def scores(config: str) -> dict:
    """The validation scores of a freshly built model, each rank scoring its shard."""
    cfg = OmegaConf.create(config)
    ranks = distributed.ranks()
    state = state_without_batch_norm(cfg, ranks)
    loader = build_loader(cfg, build_dataset(cfg, "val"), shard=(ranks.rank, ranks.world))
    results = evaluate(state.model, state.tasks, loader, torch.device("cpu"), ranks=ranks)
    return {"loss": results["loss"], "metrics": results["metrics"], "samples": sum(len(b["image"]) for b in loader)}


def rank_main(jobs: list[tuple]) -> list[dict]:
    """Runs each (function name, *arguments) in this process's group, in order."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        torch.set_num_threads(1)
        return [globals()[name](*arguments) for name, *arguments in jobs]
    finally:
        dist.destroy_process_group()
