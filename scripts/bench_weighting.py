"""Benchmark: the training-step time of every weighting method relative to `ew`, in the same run, through the
real training loop (`mtl_cli.train.train_epoch`) on pre-collated batches of the embedded data.

    python scripts/bench_weighting.py [--tasks 2 3 5] [--steps 6] [--rounds 3] [--methods ew pcgrad ...]
                                      [overrides as for mtl train, e.g. backbone=resnet18]

For each number of tasks T, every option of configs/weighting/ runs with grad_target=params and, where the
method allows it, grad_target=representation. Also printed: the budget of an exact parameter-gradient method,
one ew step plus (T - 1) extra backward passes through the trunk (measured here too), and each method's time
against it. Medians over interleaved rounds; every method trains its own copy of the same initial model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtl_cli.build import build_dataset, build_loader, build_model, build_optimizer, build_tasks, build_weighting
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.progress import EpochProgress
from mtl_cli.paths import config_dir
from mtl_cli.engine.state import TrainState
from mtl_cli.engine.run import Run
from mtl_cli.train import train_batches
from mtl_cli.weighting.base import GradientWeighting

TASK_SETS = {2: ["segmentation", "depth"], 3: ["segmentation", "depth", "normals"],
             4: ["segmentation", "depth", "normals", "count"],
             5: ["segmentation", "depth", "normals", "count", "multilabel"]}


def trunk_backward_seconds(model, batches, repeats: int = 3) -> float:
    """One backward pass through the shared trunk alone (from random feature gradients), median seconds."""
    times = []
    for _ in range(repeats):
        for batch in batches:
            features = model.encode(batch["image"])
            grads = [torch.randn_like(f) for f in features]
            start = time.perf_counter()
            torch.autograd.backward(features, grads)
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 5], choices=sorted(TASK_SETS))
    parser.add_argument("--steps", type=int, default=6, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="*", help="weighting options (default: every one in configs/weighting)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    methods = args.methods or sorted(p.stem for p in (config_dir() / "weighting").glob("*.yaml"))
    methods = ["ew"] + [m for m in methods if m != "ew"]
    device, scaler = torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False)

    print(f"torch threads {torch.get_num_threads()}; median ms per training step over {args.rounds} rounds x "
          f"{args.steps} steps; ratios against ew at the same T")
    for count in args.tasks:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            base = compose("train", overrides=[f"tasks=[{','.join(TASK_SETS[count])}]", *args.overrides])
        torch.manual_seed(0)
        tasks = build_tasks(base)
        loader = build_loader(base, build_dataset(base, "train"), train=True)
        loader.batch_sampler.set_epoch(0)
        batches = [b for _, b in zip(range(args.steps), loader)]
        model0 = build_model(base, tasks)
        runs = {}
        for method in methods:
            with initialize_config_dir(str(config_dir()), version_base="1.3"):
                cfg = compose("train", overrides=[f"tasks=[{','.join(TASK_SETS[count])}]", f"weighting={method}",
                                                  "logger.log_every=1000000", *args.overrides])
            probe = build_weighting(cfg, tasks)
            targets = (None,)
            if isinstance(probe, GradientWeighting):
                targets = probe.grad_targets if "grad_target" in cfg.weighting else (probe.grad_target,)
            for target in targets:
                run_cfg = cfg if target is None or "grad_target" not in cfg.weighting else OmegaConf.merge(
                    cfg, {"weighting": {"grad_target": target}})
                model = copy.deepcopy(model0)
                weighting = build_weighting(run_cfg, tasks)
                runs[(method, target)] = (run_cfg, model, weighting, build_optimizer(run_cfg, model, weighting))

        timings = {key: [] for key in runs}
        with tempfile.TemporaryDirectory() as tmp:
            logger = Logger(Path(tmp), tensorboard=False, log_every=1000000, images=0)
            progress = EpochProgress("none")
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for key, (cfg, model, weighting, optimizer) in runs.items():
                    start = time.perf_counter()
                    run = Run(TrainState(cfg, model, tasks, weighting, optimizer, None, scaler), device, logger,
                              Path(tmp), progress=progress)
                    train_batches(run, batches, len(batches))
                    if round_:
                        timings[key].append((time.perf_counter() - start) / len(batches))
        trunk = trunk_backward_seconds(copy.deepcopy(model0).train(), batches[:2])
        ew = statistics.median(timings[("ew", None)])
        budget = ew + (count - 1) * trunk
        print(f"\nT={count} ({', '.join(tasks)}): ew {1000 * ew:.1f} ms/step, one trunk backward "
              f"{1000 * trunk:.1f} ms, budget for exact parameter gradients (ew + {count - 1} trunk backward) "
              f"{1000 * budget:.1f} ms = {budget / ew:.2f}x ew")
        print(f"{'method':14s} {'grad_target':15s} {'ms/step':>8s} {'x ew':>6s} {'x budget':>9s}")
        for (method, target), values in timings.items():
            value = statistics.median(values)
            print(f"{method:14s} {target or '-':15s} {1000 * value:8.1f} {value / ew:6.2f} {value / budget:9.2f}")


if __name__ == "__main__":
    main()
