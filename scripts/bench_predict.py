"""Benchmark: the throughput of `mtl predict` (images/s, the in-process predict()) on the default model against a
plain `model(x)` loop over the same images, already read and preprocessed, in the same batches.

    python scripts/bench_predict.py [--images 256] [--size 64 64] [--rounds 3] [--threads 1]

The default model (untrained: the speed does not depend on the weights) is saved as a checkpoint; the images are
scenes of the embedded data resized to --size and written as PNGs. The ratio predict / plain is the tool's overhead:
reading and decoding the files, preprocessing, resizing the outputs back and writing every task's files, plus the
one-off load of the checkpoint. The times of reading and preprocessing alone and of the load are printed too, so
the rest is seen to be the writers'. Each measure runs
`--rounds` times (interleaved); the medians are compared. CPU only.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image

from mtl_cli.build import build_dataset, resolve_data
from mtl_cli.engine.state import HydraValues, build_state
from mtl_cli.inference.inputs import Images
from mtl_cli.inference.loaded import Loaded
from mtl_cli.inference.predict import chunks, predict
from mtl_cli.paths import config_dir


def composed(name: str, overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(name, overrides=overrides)


def default_checkpoint(folder: Path) -> Path:
    """The default model with its initial weights, saved as mtl train saves it."""
    cfg = resolve_data(composed("train", []))
    state = build_state(cfg, torch.device("cpu"))
    state.input_size = [int(cfg.data.dataset.image_size)] * 2
    path = folder / "default.pt"
    state.save(path)
    return path


def write_images(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` val scenes of the embedded data, resized to `size`, as PNGs."""
    cfg = resolve_data(composed("train", [f"data.dataset.scenes={{train:1,val:{count},test:1}}"]))
    dataset = build_dataset(cfg, "val")
    folder.mkdir(parents=True)
    for i in range(count):
        image = F.interpolate(dataset[i]["image"][None], size=size, mode="bilinear", antialias=True)[0]
        rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(rgb)).save(folder / f"scene_{i:05d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("mtl").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt, images = default_checkpoint(tmp), write_images(tmp / "images", args.images, tuple(args.size))
        typed = [f"ckpt={ckpt}", f"input={images}", f"out={tmp / 'out'}", "trainer.progress=none",
                 "trainer.device=cpu"]
        cfg, hydra = composed("predict", typed), HydraValues(typed, {}, [])
        loaded = Loaded.of(cfg, hydra)
        batch_size = int(loaded.cfg.data.batch_size)
        pictures = [image for _, image in Images.of(str(images))]
        batches = [loaded.batch(chunk) for chunk in chunks(pictures, batch_size)]

        def plain() -> None:
            with torch.inference_mode():
                for x in batches:
                    loaded.model(x)

        def read_and_preprocess() -> None:
            for chunk in chunks(Images.of(str(images)), batch_size):
                loaded.batch([image for _, image in chunk])

        def load() -> None:
            Loaded.of(cfg, hydra)

        def tool() -> None:
            predict(cfg, tmp / "run", hydra)

        timings: dict[str, list[float]] = {"plain model(x)": [], "read + preprocess": [], "load (Loaded.of)": [],
                                           "mtl predict": []}
        for _ in range(args.rounds):
            for name, run in zip(timings, (plain, read_and_preprocess, load, tool)):
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)

    n = args.images
    print(f"{n} images of {args.size[0]}x{args.size[1]}, tasks {', '.join(loaded.tasks)}, batch {batch_size}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds")
    print("| measure | s | images/s |")
    print("|---|---:|---:|")
    medians = {name: statistics.median(times) for name, times in timings.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {n / seconds:.1f} |")
    per_image = medians["mtl predict"] - medians["load (Loaded.of)"]
    print(f"| mtl predict less the load | {per_image:.3f} | {n / per_image:.1f} |")
    print(f"mtl predict / plain model(x): {medians['mtl predict'] / medians['plain model(x)']:.2f}x the time "
          f"({per_image / medians['plain model(x)']:.2f}x less the one-off load of the checkpoint)")


if __name__ == "__main__":
    main()
