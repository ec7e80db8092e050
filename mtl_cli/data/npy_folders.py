"""Datasets stored as one .npy file per sample and target, in the layout of the MTAN release (NYUv2, Cityscapes).

Shikun Liu's preprocessed NYUv2 and Cityscapes (github.com/lorenmt/mtan), which most multi-task papers since
(LibMTL, CAGrad, Nash-MTL, FAMO, ...) train and score on, are laid out as

    {root}/{train,val}/{image,label,depth,normal,...}/{i}.npy      i = 0 .. N-1

with, per sample, `image` H x W x 3 float RGB in [0, 1]; a label map H x W of class indices stored as floats, -1
where unlabelled; `depth` H x W x 1 (0 = invalid); `normal` H x W x 3 unit vectors (all-zero = invalid). One class
serves both datasets: which folder feeds which target, the expected size and where to get the data are options
(configs/data/nyuv2.yaml, configs/data/cityscapes.yaml). Only the splits `train` and `val` exist: the papers report
on `val`. The data cannot be downloaded for the user (the release is a Dropbox archive, not a torchvision dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtl_cli.data.files import BadSample, read_npy
from mtl_cli.data.transforms import Depth, Normals, plain
from mtl_cli.errors import UserError

SPLITS = ("train", "val")
# sample key -> (the channels C of its H x W x C file, None for an H x W label map; the tv_tensor it becomes)
KINDS = {"image": (3, tv_tensors.Image), "segmentation": (None, tv_tensors.Mask), "depth": (1, Depth),
         "normals": (3, Normals)}


def _natural(stem: str) -> tuple:
    """Sorts "2" before "10" (the release numbers its files 0..N-1); other names after, alphabetically."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


class NpyFolders(Dataset):
    """One sample per `image/{i}.npy` of `{root}/{split}`, with each target read from `{folder}/{i}.npy`.

    `folders` maps a sample key (image, segmentation, depth, normals) to its folder; a key set to null is not
    loaded. `size` [H, W] is the size every array must have (null: any size, but one size per batch). `name` and
    `url` go into the messages that say where the data is missing and where to get it; `download` only changes
    those messages, since nothing can be downloaded.
    """

    def __init__(self, split: str, root: str | Path, transforms: Callable | None = None, download: bool = False,
                 name: str = "npy_folders", url: str = "", folders: Mapping[str, str | None] | None = None,
                 size: Sequence[int] | None = None):
        self.name, self.url, self.transforms = name, url, transforms
        self.folders = {key: str(folder) for key, folder in (folders or {"image": "image"}).items() if folder}
        unknown = sorted(set(self.folders) - set(KINDS))
        if unknown or "image" not in self.folders:
            raise UserError(f"{name}: data.dataset.folders={dict(self.folders)} must map `image` and any of "
                            f"{', '.join(k for k in KINDS if k != 'image')} to folders (unknown: {unknown or 'none'})")
        self.folders = {"image": self.folders["image"], **self.folders}  # the image first: targets are checked against it
        self.size = None if size is None else (int(size[0]), int(size[1]))
        if split not in SPLITS:
            raise UserError(f"{name} has the splits train and val only (the MTAN release has no test split; papers "
                            f"report on val): use data.split=val instead of {split!r}")
        self.split, self.root = split, Path(root).expanduser()
        self.dir = self.root / split
        self._check_layout(download)
        stems = {p.stem for p in (self.dir / self.folders["image"]).glob("*.npy")}
        self.ids = sorted(stems, key=_natural)
        if not self.ids:
            raise self._missing(f"{self.dir / self.folders['image']} holds no .npy file", download)

    def _layout(self) -> str:
        folders = ",".join(self.folders.values())
        return f"{{root}}/{{train,val}}/{{{folders}}}/{{0,1,...}}.npy"

    def _missing(self, what: str, download: bool) -> UserError:
        asked = "data.download=true was set, but " if download else ""
        source = self.url or "the links of the MTAN README"
        return UserError(
            f"{self.name}: {what}. Expected the layout of the MTAN release (preprocessed by Shikun Liu, "
            f"github.com/lorenmt/mtan): {self._layout()}. Download and unzip it yourself from {source}, then pass "
            f"data.root=<the folder holding train/ and val/>; {asked}mtl cannot download it (the release is an "
            "archive on Dropbox, not a torchvision dataset). A target you lack can be left out with "
            "data.dataset.folders.<target>=null")

    def _check_layout(self, download: bool) -> None:
        if not self.root.is_dir():
            raise self._missing(f"data.root={str(self.root)!r} does not exist", download)
        if not self.dir.is_dir():
            raise self._missing(f"{self.dir} does not exist", download)
        for folder in self.folders.values():
            if not (self.dir / folder).is_dir():
                raise self._missing(f"the folder {self.dir / folder} does not exist", download)

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, index: int, key: str | None = None) -> str:
        """The file of entry `key` (the image's if None) of sample `index`, for messages."""
        return str(self.dir / self.folders.get(key or "image", self.folders["image"]) / f"{self.ids[index]}.npy")

    def _read(self, key: str, index: int) -> np.ndarray:
        """The array of target `key` of sample `index`, as [C, H, W] (or [H, W] for a label map), shape-checked."""
        path = self.dir / self.folders[key] / f"{self.ids[index]}.npy"
        array = read_npy(path)
        channels = KINDS[key][0]
        if channels is None and array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]  # a label map saved as H x W x 1
        elif channels == 1 and array.ndim == 2:
            array = array[..., None]  # a depth map saved as H x W
        expected = "H x W" if channels is None else f"H x W x {channels}"
        shape_ok = array.ndim == 2 if channels is None else (array.ndim == 3 and array.shape[-1] == channels)
        if not shape_ok or (self.size is not None and tuple(array.shape[:2]) != self.size):
            size = "" if self.size is None else f" with H x W = {self.size[0]} x {self.size[1]} (data.dataset.size)"
            raise BadSample(path, f"holds an array of shape {list(array.shape)}, expected {expected}{size}")
        if not np.issubdtype(array.dtype, np.number):
            raise BadSample(path, f"holds {array.dtype} values, expected numbers")
        return array if channels is None else np.moveaxis(array, -1, 0)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample: dict[str, torch.Tensor] = {}
        for key in self.folders:
            array = self._read(key, index)
            if sample and tuple(array.shape[-2:]) != tuple(sample["image"].shape[-2:]):
                raise BadSample(self.dir / self.folders[key] / f"{self.ids[index]}.npy",
                                f"is {array.shape[-2]} x {array.shape[-1]} pixels, but its image is "
                                f"{sample['image'].shape[-2]} x {sample['image'].shape[-1]}")
            channels, kind = KINDS[key]
            dtype = np.int64 if channels is None else np.float32  # labels are stored as floats (-1.0: unlabelled)
            sample[key] = kind(torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)))
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(sample)
