"""Benchmark: training steps per second on 1 and N processes (torch.distributed, the trainer's own step), the
same global batch, per weighting method.

    python scripts/bench_ddp.py [--processes 2] [--steps 20] [--methods ew,pcgrad,cagrad,nash_mtl] [overrides]

One process runs the plain single-process step (no group); N processes are started by torch's launcher API
(as `mtl train trainer.devices=N` does), each on its shard of every global batch, gloo on the CPU and NCCL on
GPUs. "N vs 1" = (steps/s on N) / (steps/s on 1); with a device per process the scaling efficiency is that over N.
On the CPU the N processes share the machine's cores (each gets cores / N threads): there the ideal is 1.0x, and
the shortfall is what the ranks' combining and the smaller per-process batches cost.
On a GPU machine run it with the GPU recipe, e.g.

    python scripts/bench_ddp.py --processes 2 backbone=resnet50 data.dataset.image_size=[288,384] \\
        data.batch_size=16 trainer.precision=bf16 trainer.channels_last=true trainer.compile=true
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mtl_cli.build import build_dataset, build_loader
from mtl_cli.engine import distributed
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.run import Run
from mtl_cli.engine.state import build_state
from mtl_cli.launch import on_this_machine
from mtl_cli.paths import config_dir
from mtl_cli.runtime import pick_device, seed_everything
from mtl_cli.train import train_step


def steps_per_second(config: str, steps: int, warmup: int = 3) -> float:
    """The trainer's steps on this process's shard (a group when one is initialised): steps per second."""
    cfg = OmegaConf.create(config)
    ranks = distributed.ranks()
    device = pick_device(cfg.trainer.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(cfg.seed)
    state = build_state(cfg, device, ranks)
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True, shard=(ranks.rank, ranks.world))
    loader.batch_sampler.set_epoch(0)
    batches = [b for _, b in zip(range(warmup + steps), loader)]
    with tempfile.TemporaryDirectory() as folder:
        run = Run(state, device, Logger(folder, tensorboard=False, log_every=10**9), Path(folder), ranks=ranks)
        state.model.train()
        for k, batch in enumerate(batches):
            if k == warmup:
                sync(device)
                started = time.perf_counter()
            train_step(run, batch)
        sync(device)
    return steps / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank(config: str, steps: int, threads: int) -> float:
    from mtl_cli.launch import join, leave

    join()
    torch.set_num_threads(threads)
    try:
        return steps_per_second(config, steps)
    finally:
        leave()


def on_processes(count: int, config: str, steps: int, threads: int) -> float:
    from torch.distributed.launcher.api import elastic_launch

    launch = on_this_machine(count, "bench")
    return elastic_launch(launch, rank)(config, steps, threads)[0]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=["logger=console", "trainer.progress=none", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default="ew,pcgrad,cagrad,nash_mtl")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    gpu = torch.cuda.is_available()
    print(f"{args.processes} processes vs 1, same global batch; {'CUDA: ' + torch.cuda.get_device_name() if gpu else f'CPU, {cores} cores'}")
    print(f"{'method':<10} {'1 process':>12} {f'{args.processes} processes':>14} {f'{args.processes} vs 1':>8}"
          f" {'efficiency':>11}")
    baseline = {}
    for method in args.methods.split(","):
        config = OmegaConf.to_yaml(compose_cfg([f"weighting={method}", *args.overrides]))
        torch.set_num_threads(cores)
        one = steps_per_second(config, args.steps)
        many = on_processes(args.processes, config, args.steps, max(1, cores // args.processes))
        baseline.setdefault("ew", many)
        print(f"{method:<10} {one:>9.2f}/s {many:>11.2f}/s {many / one:>7.2f}x {many / (args.processes * one):>10.0%}"
              f"   step time vs ew on {args.processes}: {baseline['ew'] / many:.2f}x")


if __name__ == "__main__":
    main()
