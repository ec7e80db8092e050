"""How `mtl predict` writes one task's predictions: one class per kind of output. A task's YAML names its writer
(`writer:` in configs/tasks/), so a new task brings its own and nothing here lists the tasks.

A writer takes CPU tensors, the raw head outputs of a batch (whichever model produced them: PyTorch or ONNX) and
the original uint8 images, and writes at each image's original resolution. The model saw the whole image resized to
its input size (inference/loaded.py), so the way back resizes the whole frame: dense outputs bilinearly
(segmentation logits before the argmax, so that class boundaries are interpolated rather than blocky labels
enlarged), boxes and points scaled by the ratio of the sizes. A validation transform that crops would break this
mapping (the model would have seen part of the image): the shipped configs resize only.

Files go to <out>/<task>/<name><suffix>; a writer of image-level predictions (classes, scores, a value) writes no
file and returns a record per image, which predict.py gathers into one predictions.jsonl for the run.

Depth is stored as a 16-bit PNG of round(depth * scale), the convention of the NYUv2 and KITTI toolkits
(millimetres at scale 1000, KITTI's 1/256 m at 256), with the scale in a sidecar JSON; values below 0 or beyond
65535 / scale are clipped and counted there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_keypoints

from mtl_cli.engine.visuals import label_map
from mtl_cli.errors import UserError
from mtl_cli.tasks import BATCH_ENTRIES

# zlib level of every PNG written: level 1 encodes about 4x faster than Pillow's default 6 for files 1.2-1.6x larger
# (measured at 480x640), and encoding was most of the time predict spent per image
PNG = {"compress_level": 1}


class Writer:
    """One task's writer. `name`: the task; `out`: the run's output folder; `classes`: class names, or None for the
    indices as strings; `decode`: the task's decode (the detection writer needs its NMS settings)."""

    def __init__(self, name: str, out: Path, classes: list[str] | None = None, decode: Callable | None = None):
        self.name, self.folder, self.classes, self.decode = name, Path(out) / name, classes, decode

    def write_batch(self, names: list[str], images: list[torch.Tensor], output) -> list[dict | None]:
        """Writes each image's prediction; returns its record for predictions.jsonl (None: files only)."""
        return [self.write(name, image, sample(output, i)) for i, (name, image) in enumerate(zip(names, images))]

    def write(self, name: str, image: torch.Tensor, output) -> dict | None:
        raise NotImplementedError

    def path(self, name: str, suffix: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{name}{suffix}"

    def class_name(self, index: int) -> str:
        return self.classes[index] if self.classes is not None and index < len(self.classes) else str(index)


def sample(output, i: int):
    """Image i's part of a batch output (a tensor [B, ...] or a dict of them; batch-wide entries kept whole)."""
    if isinstance(output, Mapping):
        return {key: value if key in BATCH_ENTRIES else value[i] for key, value in output.items()}
    return output[i]


def resized(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[C, h, w] -> [C, H, W], bilinear (no resampling when the sizes agree)."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values.float()
    return F.interpolate(values[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def save_rgb(rgb: torch.Tensor, path: Path) -> None:
    """uint8 [3, H, W] -> an RGB PNG."""
    Image.fromarray(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy())).save(path, **PNG)


def save_json(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record) + "\n")


@functools.cache
def palette(num_classes: int) -> torch.Tensor:
    """uint8 [C, 3]: the colours TensorBoard's label maps use (engine/visuals.py), so both agree."""
    rgb = label_map(torch.arange(num_classes).view(1, 1, num_classes), num_classes)[0, :, 0].T
    return (rgb * 255).round().to(torch.uint8)


def rounded(values: torch.Tensor) -> list:
    return np.round(values.float().numpy().astype(np.float64), 6).tolist()


class SegmentationWriter(Writer):
    """<name>.png: the class of each pixel, a palette PNG (mode "P"; 16-bit grey above 256 classes);
    <name>_overlay.png: the class colours blended over the image with weight `alpha`."""

    def __init__(self, *args, alpha: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def write(self, name, image, output):
        labels = resized(output, tuple(image.shape[-2:])).max(0).indices  # argmax(0): as much, 6x the time on the CPU
        colours = palette(output.shape[0])
        if output.shape[0] <= 256:
            mask = Image.fromarray(labels.to(torch.uint8).numpy(), mode="P")
            mask.putpalette(colours.flatten().tolist())
        else:
            mask = Image.fromarray(labels.to(torch.int32).numpy().astype(np.uint16))
        mask.save(self.path(name, ".png"), **PNG)
        blend = (1 - self.alpha) * image.float() + self.alpha * colours[labels].permute(2, 0, 1).float()
        save_rgb(blend.round().to(torch.uint8), self.path(name, "_overlay.png"))


class DepthWriter(Writer):
    """<name>.png: round(depth * scale) as a 16-bit PNG (depth <= 0, which datasets use for "no depth", stored as
    0); <name>.json: the scale (depth = value / scale), the range and the pixels that did not fit; <name>_preview.png:
    the positive depths in a matplotlib colour map scaled per image (by default near is bright), the others black."""

    def __init__(self, *args, scale: float = 1000.0, colormap: str = "magma_r", **kwargs):
        super().__init__(*args, **kwargs)
        self.scale, self.colormap = float(scale), colormap

    def write(self, name, image, output):
        from matplotlib import colormaps  # only where depth is written

        depth = resized(output, tuple(image.shape[-2:]))[0]
        scaled = (depth * self.scale).round()
        Image.fromarray(scaled.clamp(0, 65535).numpy().astype(np.uint16)).save(self.path(name, ".png"), **PNG)
        save_json({"scale": self.scale, "depth": "png value / scale", "min": float(depth.min()),
                   "max": float(depth.max()), "below_zero": int((scaled < 0).sum()),
                   "above_range": int((scaled > 65535).sum())}, self.path(name, ".json"))
        valid = depth > 0
        low, high = (float(depth[valid].min()), float(depth[valid].max())) if valid.any() else (0.0, 1.0)
        unit = ((depth - low) / max(high - low, 1e-12)).clamp(0, 1).numpy()
        rgb = colormaps[self.colormap](unit, bytes=True)[..., :3] * valid.numpy()[..., None].astype(np.uint8)
        Image.fromarray(np.ascontiguousarray(rgb)).save(self.path(name, "_preview.png"), **PNG)


class NormalsWriter(Writer):
    """<name>.png: unit normals as RGB = (n + 1) / 2 * 255, renormalised after the resize."""

    def write(self, name, image, output):
        normals = F.normalize(resized(output, tuple(image.shape[-2:])), dim=0)
        save_rgb(((normals + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), self.path(name, ".png"))


class ClassWriter(Writer):
    """One class per image from logits: the record holds the best class, its probability and every class's
    (softmax)."""

    def write(self, name, image, output):
        scores = output.float().softmax(0)
        best = int(scores.argmax())
        return {"label": self.class_name(best), "index": best, "score": rounded(scores[best]),
                "scores": dict(zip(map(self.class_name, range(len(scores))), rounded(scores)))}


class MultilabelWriter(Writer):
    """Several labels per image from logits: the labels whose probability (sigmoid) reaches `threshold`, and every
    label's probability."""

    def __init__(self, *args, threshold: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.threshold = threshold

    def write(self, name, image, output):
        scores = output.float().sigmoid()
        names = [self.class_name(i) for i in range(len(scores))]
        return {"labels": [n for n, s in zip(names, scores.tolist()) if s >= self.threshold],
                "scores": dict(zip(names, rounded(scores)))}


class ValueWriter(Writer):
    """One number per image (a regression such as count): the record holds it."""

    def write(self, name, image, output):
        return {"value": rounded(output.flatten()[0])}


class DetectionWriter(Writer):
    """<name>.json: the boxes (XYXY, original pixels), scores and class names the task's decode keeps (its score
    threshold and NMS); <name>.png: the boxes scoring at least `overlay_score` drawn on the image."""

    def __init__(self, *args, overlay_score: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        self.overlay_score = overlay_score

    def write_batch(self, names, images, output):
        if self.decode is None:
            raise UserError(f"task {self.name!r}: the detection writer needs the task's decode (boxes from the head)")
        height, width = (int(v) for v in output["image_size"])
        for name, image, found in zip(names, images, self.decode(output)):
            ratio = torch.tensor([image.shape[-1] / width, image.shape[-2] / height]).repeat(2)
            boxes, scores, labels = found["boxes"].float() * ratio, found["scores"].float(), found["labels"].tolist()
            label_names = [self.class_name(i) for i in labels]
            save_json({"boxes": rounded(boxes), "scores": rounded(scores), "labels": label_names},
                      self.path(name, ".json"))
            shown = (scores >= self.overlay_score).nonzero().flatten().tolist()
            colours = [tuple(c) for c in palette(max(labels, default=0) + 2)[1:].tolist()]
            drawn = draw_bounding_boxes(image, boxes[shown], [f"{label_names[i]} {scores[i]:.2f}" for i in shown],
                                        colors=[colours[labels[i]] for i in shown],
                                        width=max(1, min(image.shape[-2:]) // 100))
            save_rgb(drawn, self.path(name, ".png"))
        return [None] * len(names)


class LandmarksWriter(Writer):
    """<name>.json: the K points as (x, y) in original pixels (the head predicts them in 0..1 of the width and
    height); <name>.png: the points drawn on the image."""

    def write(self, name, image, output):
        points = output.float() * torch.tensor([image.shape[-1], image.shape[-2]])
        save_json({"points": rounded(points)}, self.path(name, ".json"))
        drawn = draw_keypoints(image, points[None], colors="red", radius=max(1, min(image.shape[-2:]) // 64))
        save_rgb(drawn, self.path(name, ".png"))


class EmbeddingWriter(Writer):
    """<name>.npy: the identity embedding, a float32 unit vector (the head's `embedding`; cosines between two
    images' embeddings compare identities, as verification does)."""

    def write(self, name, image, output):
        np.save(self.path(name, ".npy"), output["embedding"].float().numpy())
