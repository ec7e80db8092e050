"""The images a command names: `input=` an image file, a folder (searched recursively), a glob pattern, or a
manifest (.txt: one path per line; .csv / .jsonl: an `image` column), relative paths in a manifest being relative
to the manifest's folder. An unreadable image is named and skipped, never a crash (`Images.skipped` counts them)."""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtl_cli.data.files import BadSample, read_raw
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
MANIFEST_SUFFIXES = frozenset({".txt", ".csv", ".jsonl"})


def image_paths(spec: str) -> list[Path]:
    """The image files `spec` names, in a stable order (sorted, or the manifest's)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise UserError(f"input={spec}: the folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    if path.is_file():
        return manifest(path) if path.suffix.lower() in MANIFEST_SUFFIXES else [path]
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"input={spec}: the pattern matches no file")
        return found
    raise UserError(f"input={spec}: no such file or folder; give an image, a folder of images, a glob pattern in "
                    "quotes ('photos/*.jpg') or a manifest (.txt, one path per line; .csv or .jsonl with an `image` "
                    "column)")


def manifest(path: Path) -> list[Path]:
    """The paths a manifest lists, relative ones taken from the manifest's folder."""
    suffix = path.suffix.lower()
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if suffix == ".txt":
                names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
            elif suffix == ".csv":
                rows = list(csv.DictReader(f))
                names = [row_image(row, path, line) for line, row in enumerate(rows, start=2)]
            else:
                names = [row_image(json.loads(text), path, line) for line, text in enumerate(f, start=1)
                         if text.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"input={path}: not a readable manifest ({e})") from None
    if not names:
        raise UserError(f"input={path}: the manifest lists no image")
    return [p if p.is_absolute() else path.parent / p for p in map(Path, names)]


def row_image(row: dict, path: Path, line: int) -> str:
    if not isinstance(row, dict) or not row.get("image"):
        raise UserError(f"input={path}, line {line}: no `image` entry; a .csv or .jsonl manifest names each image "
                        "in a column `image`")
    return str(row["image"])


@dataclass
class Images:
    """The named images, read one at a time as uint8 RGB [3, H, W]; a bad one is logged and counted."""

    paths: list[Path]
    skipped: list[Path] = field(default_factory=list)

    @classmethod
    def of(cls, spec: str) -> Images:
        return cls(image_paths(spec))

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[tuple[Path, torch.Tensor]]:
        for path in self.paths:
            try:
                yield path, read_raw(path, "RGB")
            except BadSample as e:
                self.skipped.append(path)
                log.warning(f"skipped {path}: {str(e).split(': ', 1)[1].split('. Fix')[0]}")
