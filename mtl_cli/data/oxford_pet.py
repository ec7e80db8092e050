"""Oxford-IIIT Pet (Parkhi et al., CVPR 2012) through torchvision: 7,349 photos of 37 breeds of cats and dogs,
each with its breed, its species and a trimap of the pet.

Targets of a sample:
- ``classification``: the breed, int64 0..36 (CLASS-ID - 1 of the list files; torchvision's order);
- ``species``: int64, 0 cat, 1 dog (SPECIES - 1);
- ``segmentation``: int64 [H, W] from the trimap (1 pet, 2 background, 3 boundary): 0 background, 1 pet, and
  255 (ignored) on the boundary band, which the annotators left undecided.

Splits: torchvision reads annotations/trainval.txt (3,680 images) and test.txt (3,669). The release has no
validation split, so val is every `val_every`-th line of trainval.txt (the 10th, 20th, ...; the file is sorted
by breed, so each breed gives about 1/val_every of its images) and train is the rest; test is test.txt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtl_cli.data.files import BadSample, guarded, read_image
from mtl_cli.data.transforms import plain
from mtl_cli.errors import UserError

SPLITS = ("train", "val", "test")
URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
LAYOUT = ("{root}/oxford-iiit-pet/{images/<Breed>_<n>.jpg ..., annotations/{trainval.txt, test.txt, "
          "trimaps/<Breed>_<n>.png ...}}")
IGNORE = 255
TRIMAP = torch.full((256,), IGNORE, dtype=torch.int64)  # trimap value -> label: 1 pet, 2 background, others ignored
TRIMAP[1], TRIMAP[2] = 1, 0


def read_trimap(path: Path) -> torch.Tensor:
    """A trimap's values, int64 [H, W]: PIL reads them as stored whether the PNG is grayscale or palette-indexed
    (torchvision.io would turn a palette into colours)."""
    if not path.is_file():
        raise BadSample(path, "no such file")

    def read() -> np.ndarray:
        with Image.open(path) as trimap:
            return np.array(trimap)

    values = guarded(read, path)
    return torch.from_numpy(values if values.ndim == 2 else values[..., 0]).long()


class OxfordPet(Dataset):
    """The Oxford-IIIT Pet split `split` (train, val, test) under `root` (which holds oxford-iiit-pet/)."""

    def __init__(self, split: str, root: str, transforms: Callable | None = None, download: bool = False,
                 val_every: int = 10):
        if split not in SPLITS:
            raise UserError(f"oxford_pet: unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        if not isinstance(val_every, int) or val_every < 2:
            raise UserError(f"oxford_pet: val_every must be an integer >= 2 (every n-th line of trainval.txt is "
                            f"val), got {val_every!r}")
        self.transforms = transforms
        index = self._index(root, "test" if split == "test" else "trainval", download)
        # torchvision keeps the list file's entries in these attributes (stable since torchvision 0.12).
        rows = range(len(index))
        if split != "test":
            rows = [i for i in rows if ((i + 1) % val_every == 0) == (split == "val")]
            if not rows:
                raise UserError(f"oxford_pet: the {split} split is empty: trainval.txt has {len(index)} lines and "
                                f"every {val_every}th is val; lower data.dataset.val_every")
        self.images = [index._images[i] for i in rows]
        self.trimaps = [index._segs[i] for i in rows]
        self.breeds = torch.tensor([index._labels[i] for i in rows], dtype=torch.int64)
        self.species = torch.tensor([index._bin_labels[i] for i in rows], dtype=torch.int64)
        self.breed_names, self.species_names = index.classes, index.bin_classes

    @staticmethod
    def _index(root: str, list_file: str, download: bool) -> torchvision.datasets.OxfordIIITPet:
        folder = Path(root) / "oxford-iiit-pet"
        if download:
            try:
                torchvision.datasets.OxfordIIITPet(root, split=list_file, download=True)
            except (OSError, RuntimeError, ValueError) as e:
                raise UserError(f"oxford_pet: the download failed ({type(e).__name__}: {e}); get images.tar.gz and "
                                f"annotations.tar.gz by hand from {URL} and unpack them into {LAYOUT}") from None
        needed = ["images/", "annotations/trimaps/", f"annotations/{list_file}.txt"]
        missing = [name for name in needed if not (folder / name.rstrip("/")).exists()]
        if missing:
            raise UserError(f"oxford_pet: {folder} lacks {', '.join(missing)}. Expected layout: {LAYOUT} "
                            f"(images.tar.gz and annotations.tar.gz of {URL}, unpacked); set data.root to the folder "
                            "that holds oxford-iiit-pet/, or data.download=true to let torchvision download it")
        try:
            return torchvision.datasets.OxfordIIITPet(root, split=list_file, target_types=[])
        except ValueError as e:
            raise UserError(f"oxford_pet: cannot parse {folder / 'annotations' / (list_file + '.txt')} ({e}); each "
                            "line must be 'Image CLASS-ID SPECIES BREED-ID', e.g. 'Abyssinian_100 1 1 1', with no "
                            "header (list.txt's '#' lines are not read)") from None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = read_image(self.images[index])
        trimap = read_trimap(self.trimaps[index])
        if trimap.shape != image.shape[-2:]:
            raise BadSample(self.trimaps[index], f"the trimap is {tuple(trimap.shape)} (H, W) but its image "
                                                 f"{tuple(image.shape[-2:])}")
        sample = {"image": image, "classification": self.breeds[index].clone(),
                  "species": self.species[index].clone(), "segmentation": tv_tensors.Mask(TRIMAP[trimap])}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(sample)
