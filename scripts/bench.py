"""Benchmark: the mtl trainer's step time against a plain hand-written PyTorch loop, and the data generation rate.

    python scripts/bench.py [--steps 30] [--rounds 5] [overrides as for mtl train, e.g. backbone=resnet18]

Both loops train identical copies of the default model (same initial weights) on the same pre-collated batches
of the embedded data, so the difference is what the framework adds: the task/loss plumbing, the weighting
interface, gradient scaling, loss accumulation, TensorBoard logging (every logger.log_every steps) and progress.
The two run interleaved, `--rounds` times each, and the median per-step time of each is compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from mtl_cli.build import build_dataset, build_loader, build_model, build_optimizer, build_tasks, build_weighting
from mtl_cli.data.digit_scenes import scenes_per_second
from mtl_cli.engine.logger import Logger
from mtl_cli.engine.progress import EpochProgress
from mtl_cli.paths import config_dir
from mtl_cli.engine.state import TrainState
from mtl_cli.engine.run import Run
from mtl_cli.train import train_batches


def plain_losses(outputs: dict, batch: dict) -> torch.Tensor:
    """The default tasks' losses, written out by hand with plain torch (the same math as mtl's losses)."""
    depth_valid = (batch["depth"] > 0).float()
    normal_valid = (batch["normals"].abs().sum(1) > 0).float()
    cosine = (outputs["normals"] * batch["normals"]).sum(1)  # the head's output and the target are unit vectors
    return (F.cross_entropy(outputs["segmentation"], batch["segmentation"], ignore_index=255)
            + ((outputs["depth"] - batch["depth"]).abs() * depth_valid).sum() / depth_valid.sum().clamp(min=1)
            + ((1 - cosine) * normal_valid).sum() / normal_valid.sum().clamp(min=1)
            + (outputs["count"].flatten() - batch["count"].float()).abs().mean())


def plain_epoch(model, optimizer, batches) -> None:
    model.train()
    for batch in batches:
        outputs = model(batch["image"])
        loss = plain_losses(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each loop (interleaved)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["tasks=[segmentation,depth,normals,count]", *args.overrides])
    torch.manual_seed(cfg.seed)
    tasks = build_tasks(cfg)
    dataset = build_dataset(cfg, "train")
    loader = build_loader(cfg, dataset, train=True)
    loader.batch_sampler.set_epoch(0)
    batches = [b for _, b in zip(range(args.steps), loader)]

    model = build_model(cfg, tasks)
    plain_model = copy.deepcopy(model)
    weighting = build_weighting(cfg, tasks)
    optimizer = build_optimizer(cfg, model, weighting)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=cfg.optimizer.lr,
                                        weight_decay=cfg.optimizer.weight_decay)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device = torch.device("cpu")

    with tempfile.TemporaryDirectory() as tmp:
        logger = Logger(Path(tmp), tensorboard=True, log_every=cfg.logger.log_every, images=0)
        progress = EpochProgress("none")

        state = TrainState(cfg, model, tasks, weighting, optimizer, None, scaler)
        trainer = Run(state, device, logger, Path(tmp), progress=progress)

        def mtl_round() -> None:  # the trainer's own steps (train.train_batches) over the same batches
            progress.start(0, 1, len(batches))
            state.batch = 0
            train_batches(trainer, batches, len(batches))
            progress.stop()

        timings: dict[str, list[float]] = {"mtl trainer": [], "plain loop": []}
        mtl_round(), plain_epoch(plain_model, plain_optimizer, batches)  # warm-up
        for _ in range(args.rounds):
            for name, run in (("mtl trainer", mtl_round), ("plain loop", lambda: plain_epoch(
                    plain_model, plain_optimizer, batches))):
                start = time.perf_counter()
                run()
                timings[name].append((time.perf_counter() - start) / len(batches))
        logger.close()

    mtl_step, plain_step = (statistics.median(timings[k]) for k in ("mtl trainer", "plain loop"))
    print(f"model: backbone={cfg.backbone._target_.rsplit('.', 1)[-1]}"
          f"({cfg.backbone.get('name', 'small_cnn')}), batch {cfg.data.batch_size} x "
          f"{cfg.data.dataset.image_size}px, tasks {', '.join(tasks)}; torch threads {torch.get_num_threads()}")
    print(f"plain loop   {1000 * plain_step:8.2f} ms/step  (median of {args.rounds} rounds x {len(batches)} steps)")
    print(f"mtl trainer  {1000 * mtl_step:8.2f} ms/step")
    print(f"ratio        {mtl_step / plain_step:8.3f}x  (mtl trainer / plain loop)")
    print(f"data: digit_scenes generation {scenes_per_second(n=300):.0f} scenes/s on one core "
          f"({cfg.data.dataset.image_size}px)")


if __name__ == "__main__":
    main()
