"""Metrics of trivial predictors on the embedded data's validation split: the bar a trained model must clear.

    python scripts/baselines.py [data.dataset.image_size=64 ...]   (overrides as for mtl train)

Each trivial predictor ignores the image: segmentation says "background" everywhere; depth predicts the mean
training depth of each pixel position; normals predict the mean training normal of each pixel position;
classification predicts the most frequent training class; multilabel the per-label training majority; count the
median training count. Scored with the same metric code as mtl train.
"""

import sys

import torch
from hydra import compose, initialize_config_dir

from mtl_cli.engine.batches import Scores
from mtl_cli.build import build_dataset, build_tasks
from mtl_cli.data.collate import collate
from mtl_cli.paths import config_dir


def main(overrides: list[str]) -> None:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["tasks=[segmentation,depth,normals,classification,multilabel,count]",
                                          *overrides])
    tasks = build_tasks(cfg)
    train = collate([s for s in build_dataset(cfg, "train")])
    val = collate([s for s in build_dataset(cfg, cfg.data.split)])
    n = len(val["image"])

    depth_valid = (train["depth"] > 0).float()
    mean_depth = (train["depth"] * depth_valid).sum(0) / depth_valid.sum(0).clamp(min=1)
    mean_normal = torch.nn.functional.normalize(train["normals"].sum(0, keepdim=True), dim=1)
    classes = torch.bincount(train["classification"], minlength=10)
    background = torch.zeros(n, 11, *val["segmentation"].shape[-2:])
    background[:, 0] = 1
    predictions = {
        "segmentation": background,
        "depth": mean_depth.expand(n, -1, -1, -1),
        "normals": mean_normal.expand(n, -1, -1, -1),
        "classification": torch.nn.functional.one_hot(classes.argmax().expand(n), 10).float(),
        "multilabel": (train["multilabel"].mean(0) > 0.5).float().logit(eps=1e-6).expand(n, -1),
        "count": train["count"].float().median().expand(n, 1),
    }
    print(f"trivial predictors on {cfg.data.name}/{cfg.data.split} ({n} scenes):")
    scores = Scores(tasks)
    scores.update(predictions, val)
    for name, metrics in scores.compute()["metrics"].items():
        values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"  {name:<15} {values}")


if __name__ == "__main__":
    main(sys.argv[1:])
