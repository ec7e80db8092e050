"""What loading and augmenting the dense benchmarks costs, per sample, on this machine's CPU.

    python scripts/bench_data.py [--samples 48] [--height 288 --width 384] [--repeats 3]

Writes a synthetic folder in the NYUv2 layout of the MTAN release (image, label, depth, normal .npy files at
the given size) to a temporary directory, then times, in the same run, the best of `repeats` passes over it:
  raw np.load      the four np.load calls per sample, nothing else (the baseline: what any loader must pay)
  data=nyuv2 val   the dataset without transforms (the .npy files to tv_tensors)
  data=nyuv2 train the dataset with the train transforms (RandomScaleCrop in {1, 1.2, 1.5} + horizontal flip)
  collate          batching 8 samples of the train split
and prints samples per second and each as a ratio to the raw loads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from mtl_cli.build import build_dataset
from mtl_cli.data.collate import collate
from mtl_cli.paths import config_dir

FOLDERS = ("image", "label", "depth", "normal")


def write_folder(root: Path, samples: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder in FOLDERS:
            (root / split / folder).mkdir(parents=True)
        for i in range(samples):
            normal = rng.normal(size=(height, width, 3)).astype(np.float32)
            arrays = {"image": rng.random((height, width, 3), dtype=np.float32),
                      "label": rng.integers(-1, 13, (height, width)).astype(np.float32),
                      "depth": rng.uniform(0.5, 10, (height, width, 1)).astype(np.float32),
                      "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True)}
            for folder, array in arrays.items():
                np.save(root / split / folder / f"{i}.npy", array)


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_folder(root, args.samples, args.height, args.width)
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=["data=nyuv2", f"data.root={root}", "tasks=[segmentation,depth,normals]",
                                              f"data.dataset.size=[{args.height},{args.width}]"])
        val, train = build_dataset(cfg, "val"), build_dataset(cfg, "train")
        n = args.samples

        def raw():
            for i in range(n):
                for folder in FOLDERS:
                    np.load(root / "train" / folder / f"{i}.npy")

        def batches():
            for start in range(0, n - 7, 8):
                collate([train[i] for i in range(start, start + 8)])

        timings = {"raw np.load": best_of(args.repeats, raw),
                   "data=nyuv2 val (no transforms)": best_of(args.repeats, lambda: [val[i] for i in range(n)]),
                   "data=nyuv2 train (scale-crop + flip)": best_of(args.repeats, lambda: [train[i] for i in range(n)]),
                   "train samples + collate by 8": best_of(args.repeats, batches)}
    base = timings["raw np.load"]
    print(f"{n} samples of {args.height}x{args.width}, best of {args.repeats}, one process")
    for name, seconds in timings.items():
        count = n if "collate" not in name else (n // 8) * 8
        print(f"{name:40s} {count / seconds:8.1f} samples/s   {seconds / base * n / count:5.2f}x raw")


if __name__ == "__main__":
    main()
