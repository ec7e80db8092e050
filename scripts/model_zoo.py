"""The README's model-zoo tables: every backbone and every architecture, with parameters and MACs per image.

    python scripts/model_zoo.py [--size 64] [--backbone small_cnn] [overrides as for mtl train]

Backbones: hard sharing with the default tasks; the backbone's own parameters and MACs (the `shared` row of the
start-up summary), its channels and strides. Architectures: each on `--backbone`, the shared and total counts.
Nothing is trained; MACs come from torch's FlopCounterMode (see mtl_cli/models/summary.py).
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir

from mtl_cli.build import build_model, build_tasks
from mtl_cli.models.summary import human, summarize
from mtl_cli.paths import config_dir


def built(overrides: list[str], size: int):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"data.dataset.image_size={size}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, build_tasks(cfg))
    return model, {row["part"]: row for row in summarize(model, (size, size))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="small_cnn")
    args, overrides = parser.parse_known_args()
    torch.set_grad_enabled(False)

    print(f"backbones (hard sharing, {args.size}x{args.size} input)\n")
    print("| backbone | parameters | MACs / image | channels | strides |\n|---|---:|---:|---|---|")
    for option in sorted(p.stem for p in (config_dir() / "backbone").glob("*.yaml")):
        model, rows = built([f"backbone={option}", *overrides], args.size)
        b = model.backbone
        print(f"| `{option}` | {rows['shared']['parameters'] / 1e6:.2f}M | {human(rows['shared']['macs'])} | "
              f"{b.channels} | {b.strides} |")

    print(f"\narchitectures ({args.backbone}, default tasks, {args.size}x{args.size} input)\n")
    print("| architecture | shared parameters | total parameters | MACs / image |\n|---|---:|---:|---:|")
    for option in ("hps", "stl", "mtan", "cross_stitch", "mmoe"):
        _, rows = built([f"architecture={option}", f"backbone={args.backbone}", *overrides], args.size)
        print(f"| `{option}` | {rows['shared']['parameters']:,} | {rows['total']['parameters']:,} | "
              f"{human(rows['total']['macs'])} |")


if __name__ == "__main__":
    main()
