"""CelebA (Liu et al., ICCV 2015) through torchvision: 202,599 aligned-and-cropped faces (img_align_celeba,
178x218) of 10,177 people, each with 40 binary attributes, 5 landmarks and an identity.

Targets of a sample:
- ``attributes``: float [40] in {0, 1} (the release's -1/1), in the order of list_attr_celeba.txt's header;
- ``landmarks``: float [5, 2], the (x, y) of the left eye, right eye, nose, left and right mouth corner of
  list_landmarks_align_celeba.txt (aligned-image coordinates), divided by the image's width and height after
  the transforms (they travel through the transforms as tv_tensors.KeyPoints);
- ``identity``: int64, by the convention of :func:`identity_labels` (train's people 0..N-1, unseen ones N, ...).
The boxes of list_bbox_celeba.txt are not offered: they are in the coordinates of the uncropped in-the-wild
images, not of these aligned ones (torchvision reads the file all the same, so it must be present).

Splits: train / val / test are the partitions 0 / 1 / 2 of list_eval_partition.txt (162,770 / 19,867 / 19,962
images); their people are disjoint (8,192 / 985 / 1,000 identities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtl_cli.data.files import read_image
from mtl_cli.data.transforms import plain
from mtl_cli.errors import UserError

PARTITIONS = {"train": 0, "val": 1, "test": 2}  # our split -> list_eval_partition.txt's code
IMAGES = "img_align_celeba"
FILES = ("list_attr_celeba.txt", "identity_CelebA.txt", "list_landmarks_align_celeba.txt",
         "list_eval_partition.txt", "list_bbox_celeba.txt")
URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
LAYOUT = "{root}/celeba/{" + ", ".join([f"{IMAGES}/000001.jpg ...", *FILES]) + "}"


def identity_labels(identities: Iterable[int], train_identities: Iterable[int]) -> dict[int, int]:
    """The labels of the face datasets' identities: the train split's people, in sorted order, are 0..N-1 (the
    classes the identity head learns; N = data.targets.identity.num_classes); every other person, sorted, gets
    N, N+1, ...: someone unseen in training, whom ArcFaceLoss and IdentificationAccuracy skip and
    VerificationMetrics pairs like anyone else. One map for every split, so a person has one label throughout."""
    seen = sorted(set(train_identities))
    unseen = sorted(set(identities) - set(seen))
    return {identity: label for label, identity in enumerate(seen + unseen)}


def normalise_points(sample: dict, key: str) -> dict:
    """The points of `key` (pixel coordinates, moved with the image) divided by the image's width and height."""
    height, width = sample["image"].shape[-2:]
    points = sample[key].as_subclass(torch.Tensor)
    return {**sample, key: points / torch.tensor([width, height], dtype=points.dtype)}


def missing_files(folder: Path) -> list[str]:
    """The files of the layout that `folder` ({root}/celeba) lacks."""
    missing = [] if (folder / IMAGES).is_dir() else [f"{IMAGES}/"]
    return missing + [name for name in FILES if not (folder / name).is_file()]


class _CelebAIndex(torchvision.datasets.CelebA):
    """torchvision's reader of the CelebA text files, checking that they are present instead of their md5 sums.

    Why: the md5 check rejects every copy that differs by a byte (test fixtures, files re-saved with other line
    endings) with one vague message, and hashes 25 MB of text at each start; a missing file is the common
    mistake and gets its own message (below); a malformed file still fails when it is parsed."""

    def _check_integrity(self) -> bool:
        return not missing_files(Path(self.root) / self.base_folder)


class CelebA(Dataset):
    """The CelebA split `split` (train, val, test) under `root` (which holds celeba/); see the module docstring."""

    def __init__(self, split: str, root: str, transforms: Callable | None = None, download: bool = False):
        if split not in PARTITIONS:
            raise UserError(f"celeba: unknown split {split!r}; valid splits are {', '.join(PARTITIONS)}")
        self.folder, self.transforms = Path(root) / "celeba", transforms
        index = self._index(root, download)
        try:
            partition = index._load_csv("list_eval_partition.txt").data[:, 0]
        except (ValueError, IndexError) as e:
            raise UserError(f"celeba: cannot parse {self.folder / 'list_eval_partition.txt'}: {e}") from None
        identities = index.identity[:, 0].tolist()
        train = [identity for identity, part in zip(identities, partition.tolist()) if part == PARTITIONS["train"]]
        labels = identity_labels(identities, train)
        self.num_identities = len(set(train))
        self.rows = torch.nonzero(partition == PARTITIONS[split])[:, 0].tolist()
        self.files = [index.filename[i] for i in self.rows]
        self.attributes = index.attr[self.rows].float()
        self.landmarks = index.landmarks_align[self.rows].view(-1, 5, 2).float()
        self.identities = torch.tensor([labels[identities[i]] for i in self.rows], dtype=torch.int64)
        self.attribute_names = [name for name in index.attr_names if name]  # the header line ends in a space

    def _index(self, root: str, download: bool) -> _CelebAIndex:
        if download:
            try:
                _CelebAIndex(root, split="all", target_type=[], download=True)
            except (OSError, RuntimeError, ImportError, ValueError) as e:
                raise UserError(f"celeba: the download failed ({type(e).__name__}: {e}). torchvision fetches "
                                f"CelebA from Google Drive (needs the gdown package and a network, and Drive often "
                                f"refuses for a quota); else get it by hand from {URL} into {LAYOUT}") from None
        missing = missing_files(self.folder)
        if missing:
            raise UserError(f"celeba: {self.folder} lacks {', '.join(missing)}. Expected layout: {LAYOUT} (the "
                            f"Align&Cropped images and the Anno/ and Eval/ text files of {URL}); set "
                            "data.root to the folder that holds celeba/, or data.download=true to let torchvision "
                            "download it")
        try:
            return _CelebAIndex(root, split="all", target_type=[])
        except (ValueError, IndexError, RuntimeError) as e:
            raise UserError(f"celeba: cannot parse the text files under {self.folder} ({e}); they must be "
                            "CelebA's own, as released") from None

    @property
    def facts(self) -> dict:
        """The identity class count, from the files (the train split's people): joins cfg.data when training."""
        return {"targets": {"identity": {"num_classes": self.num_identities}}}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = read_image(self.folder / IMAGES / self.files[index])
        sample = {"image": image, "attributes": self.attributes[index].clone(),
                  "landmarks": tv_tensors.KeyPoints(self.landmarks[index].clone(), canvas_size=image.shape[-2:]),
                  "identity": self.identities[index].clone()}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(normalise_points(sample, "landmarks"))
