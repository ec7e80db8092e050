"""Benchmark: the cost of measuring task affinity during training (`trainer.task_affinity.every=N`), as a fraction
of a training step, at N = 1, 10, 100 (TAG: Fifty et al., "Efficiently Identifying Task Groupings in Multi-Task
Learning", NeurIPS 2021; mtl_cli/analysis/affinity.py).

    python scripts/bench_affinity.py [--steps 100] [--rounds 3] [--threads 1] [--every 1 10 100] [overrides]

Copies of the default model with the same initial weights train on the same pre-collated batches of the embedded
data through the real loop (`mtl_cli.train.train_batches`), one with affinity off and one per N, taking turns at
every step in this one process (so that a change in the machine's load hits them all alike); each one's mean time
per step is divided by that of the run without over the same steps. The run with N takes part in the first
max(2N, 20) steps (all `--steps` at most): N = 100 measures once in 100 steps. The last column is the cost of one
measurement in training steps (the fraction at N is about it / N). That the probe leaves training bit-identical is
checked by tests/test_affinity.py. CPU, one thread by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mtl_cli.analysis.affinity import TaskAffinity
from mtl_cli.build import build_dataset, build_loader
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.run import Run
from mtl_cli.engine.state import build_state
from mtl_cli.paths import config_dir
from mtl_cli.runtime import seed_everything
from mtl_cli.train import train_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed round (>= the largest N)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10, 100], help="the N to measure")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.device=cpu", *args.overrides])
    loader = build_loader(cfg, build_dataset(cfg, "train"), train=True)
    batches = []
    while len(batches) < args.steps:
        loader.batch_sampler.set_epoch(len(batches))
        batches += [b for _, b in zip(range(args.steps - len(batches)), loader)]
    device = torch.device("cpu")
    keys = ["off", *args.every]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for key in keys:
            seed_everything(cfg.seed)  # the same initial weights in every copy
            state = build_state(cfg, device)
            run = Run(state, device, Logger(Path(tmp), log_every=cfg.logger.log_every), Path(tmp))
            run.affinity = None if key == "off" else TaskAffinity(list(state.tasks), key)
            runs[key] = run
        for run in runs.values():  # warm-up, not counted
            train_batches(run, batches[:2], 2)
            run.state.step = 0
            if run.affinity is not None:
                run.affinity.start_epoch()
        seconds: dict = {key: [] for key in keys}
        for position, batch in enumerate(batches):
            for key, run in runs.items():
                if key == "off" or position < max(2 * key, 20):
                    start = time.perf_counter()
                    train_batches(run, [batch], len(batches))
                    seconds[key].append(time.perf_counter() - start)
    off = statistics.mean(seconds["off"])
    print(f"model: backbone={cfg.backbone._target_.rsplit('.', 1)[-1]}, architecture="
          f"{cfg.architecture._target_.rsplit('.', 1)[-1]}, batch {cfg.data.batch_size} x "
          f"{cfg.data.dataset.image_size}px, tasks {', '.join(runs['off'].state.tasks)}, optimizer "
          f"{cfg.optimizer._target_.rsplit('.', 1)[-1]}; CPU, torch threads {torch.get_num_threads()}; {args.steps} "
          "steps, taking turns\n")
    print("| every N | ms / step | ratio to off | cost per step | ms / measurement | measurement / step |")
    print("|---|---|---|---|---|---|")
    print(f"| off | {1e3 * off:.1f} | 1.000 | 0 | - | - |")  # the ratios use the steps each run took part in
    for key in args.every:
        steps = len(seconds[key])
        step, same_off = statistics.mean(seconds[key]), statistics.mean(seconds["off"][:steps])
        affinity = runs[key].affinity
        per_measure = affinity.measure_seconds / max(affinity.measured, 1)
        print(f"| {key} | {1e3 * step:.1f} | {step / same_off:.3f} | {step / same_off - 1:+.1%} | "
              f"{1e3 * per_measure:.0f} ({affinity.measured} in {steps} steps) | {per_measure / same_off:.2f} |")
    full = [key for key in args.every if len(seconds[key]) == len(seconds["off"])]
    same = all(torch.equal(a, b) for key in full for a, b in zip(runs["off"].state.model.state_dict().values(),
                                                                runs[key].state.model.state_dict().values()))
    print(f"\nweights after {len(batches) + 2} steps with every={full} identical to the run without: {same}")


if __name__ == "__main__":
    main()
