"""Reading the files of a dataset, with one clear error naming a file that is missing or cannot be decoded.

`data.skip_bad=true` turns those errors into a counted warning: the bad sample is dropped from its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from PIL import Image

from mtl_cli.errors import UserError

log = logging.getLogger("mtl")


class BadSample(UserError):
    """A file of one sample is missing or corrupt."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"cannot read {self.path}: {reason}. Fix or remove the file, or set data.skip_bad=true "
                         "to skip bad samples with a warning")


def read_image(path: str | Path) -> tv_tensors.Image:
    """An image file (any format Pillow reads) as a float RGB tv_tensors.Image [3, H, W] in [0, 1]."""
    return tv_tensors.Image(read_raw(path, "RGB").float() / 255)


def read_raw(path: str | Path, mode: str | None = None) -> torch.Tensor:
    """An image file as stored (uint8, or uint16 for a 16-bit PNG such as depth in millimetres), [C, H, W];
    `mode` converts it first (Pillow's modes: "RGB", "L"). Read with Pillow: torchvision's own decoders are
    deprecated (since 0.29) in favour of torchcodec."""
    path = Path(path)
    if not path.is_file():
        raise BadSample(path, "no such file")
    try:
        with Image.open(path) as image:
            image = image.convert(mode) if mode else image
            array = np.array(image)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for junk or truncated files
        raise BadSample(path, f"not a readable image ({str(e).splitlines()[0]})") from None
    if array.dtype == np.int32 and array.max(initial=0) < 2**16:  # Pillow opens 16-bit PNGs as 32-bit "I"
        array = array.astype(np.uint16)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def read_npy(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise BadSample(path, "no such file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BadSample(path, f"not a readable .npy array ({e})") from None


def guarded(read: Callable, path: str | Path, *args, **kwargs):
    """Calls a reader of someone else's (PIL through a torchvision dataset): its failures name `path`."""
    try:
        return read(*args, **kwargs)
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for truncated or junk files
        raise BadSample(path, f"{type(e).__name__}: {e}") from None


class SkipBad(Dataset):
    """Wraps a dataset so that a sample whose file is bad becomes None (dropped by the collate) with a warning."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except BadSample as e:
            self.skipped += 1
            log.warning(f"skipped bad sample {index} ({self.skipped} skipped so far in this process): {e.path}")
            return None

    def __getattr__(self, name: str):  # the wrapped dataset's facts (classes, ...) stay visible
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
