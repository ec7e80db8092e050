"""LFW (Labeled Faces in the Wild, Huang et al. 2007) through torchvision's LFWPeople: 13,233 face images
(250x250) of 5,749 people, for the identity task (identification and verification).

Splits: train = View 1's peopleDevTrain.txt, val and test = peopleDevTest.txt (the same images: LFW's
development view has no third part; View 2, the 10-fold protocol, is for reporting final results and is not
offered). The people of DevTrain and DevTest are disjoint, so val/test identities are unseen in training.

Target of a sample: ``identity``, int64, by :func:`mtl_cli.data.celeba.identity_labels`: DevTrain's people
0..N-1 (N from the files, see `facts`), every other person N, N+1, ...

With ``pairs=True`` (the default) val and test are LFW's pairs instead, through torchvision's LFWPairs: the two
images of each of pairsDevTest.txt's 500 same-person and 500 different-person pairs, one after the other, so
that VerificationMetrics(pairs="consecutive") scores exactly those pairs (LFW's development protocol).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

from mtl_cli.data.celeba import identity_labels
from mtl_cli.data.files import read_image
from mtl_cli.data.transforms import plain
from mtl_cli.errors import UserError

VIEW1 = {"train": "train", "val": "test", "test": "test"}  # our split -> torchvision's (DevTrain / DevTest)
FOLDERS = {name: folder for name, (folder, _, _) in torchvision.datasets.LFWPeople.file_dict.items()}
URLS = "http://vis-www.cs.umass.edu/lfw/ (or the mirror https://www.kaggle.com/datasets/jessicali9530/lfw-dataset)"


def layout(image_set: str) -> str:
    return (f"{{root}}/lfw-py/{{{FOLDERS[image_set]}/<Name>/<Name>_0001.jpg ..., peopleDevTrain.txt, "
            "peopleDevTest.txt, lfw-names.txt}")


class _LFWPeopleIndex(torchvision.datasets.LFWPeople):
    """torchvision's reader of LFW's people lists, checking that the files are present instead of md5 sums.

    Why: torchvision checks the md5 of the .tgz archive, which a user who unpacked it (or took the images from
    a mirror) no longer has, and of each text file, which any re-saved copy or test fixture fails; the missing
    files get their own message (below), and a malformed list still fails when it is parsed."""

    def _check_integrity(self) -> bool:
        return True  # LFW.__init__ checked the presence of every file it reads


class _LFWPairsIndex(torchvision.datasets.LFWPairs):
    """torchvision's reader of LFW's pair lists, checking presence instead of md5 sums (see _LFWPeopleIndex)."""

    def _check_integrity(self) -> bool:
        return True


FORMATS = {"_LFWPeopleIndex": "peopleDev*.txt a count line then 'Name<TAB>images' lines, lfw-names.txt "
                              "'Name<TAB>images' lines of every person",
           "_LFWPairsIndex": "pairsDev*.txt a count line n, then n 'Name<TAB>i<TAB>j' lines and n "
                             "'Name1<TAB>i<TAB>Name2<TAB>j' lines"}


def read_list(reader: type, root: str, split: str, image_set: str):
    """One of LFW's lists through torchvision's reader; a malformed file gets one message saying the format."""
    try:
        return reader(root, split=split, image_set=image_set)
    except (ValueError, IndexError, KeyError) as e:
        raise UserError(f"lfw: cannot parse the lists under {Path(root) / 'lfw-py'} ({type(e).__name__}: {e}); "
                        f"they must be LFW's own: {FORMATS[reader.__name__]}") from None


class LFW(Dataset):
    """The LFW split `split` (train, val, test) under `root` (which holds lfw-py/); see the module docstring."""

    def __init__(self, split: str, root: str, transforms: Callable | None = None, download: bool = False,
                 image_set: str = "deepfunneled", pairs: bool = True):
        if split not in VIEW1:
            raise UserError(f"lfw: unknown split {split!r}; valid splits are {', '.join(VIEW1)}")
        if image_set not in FOLDERS:
            raise UserError(f"lfw: unknown image_set {image_set!r}; valid ones are {', '.join(FOLDERS)}")
        if download:
            raise UserError(f"lfw: torchvision no longer downloads LFW; get it by hand from {URLS} into "
                            f"{layout(image_set)} and set data.download=false")
        folder = Path(root) / "lfw-py"
        by_pairs = bool(pairs) and split != "train"
        needed = [f"{FOLDERS[image_set]}/", "peopleDevTrain.txt", "peopleDevTest.txt", "lfw-names.txt"]
        needed += ["pairsDevTest.txt"] if by_pairs else []
        missing = [name for name in needed if not (folder / name.rstrip("/")).exists()]
        if missing:
            raise UserError(f"lfw: {folder} lacks {', '.join(missing)}. Expected layout: {layout(image_set)} (the "
                            f"{image_set} images and View 1's people lists of {URLS}); set data.root to the folder "
                            "that holds lfw-py/")
        self.transforms = transforms
        train = read_list(_LFWPeopleIndex, root, "train", image_set)
        labels = identity_labels(train.class_to_idx.values(), train.targets)
        self.num_identities = len(set(train.targets))
        if by_pairs:
            listed = read_list(_LFWPairsIndex, root, VIEW1[split], image_set)
            names = train.class_to_idx  # every person of lfw-names.txt, whom `labels` maps
            self.files = [path for pair in listed.data for path in pair]
            self.identities = torch.tensor([labels[names[name]] for pair in listed.pair_names for name in pair],
                                           dtype=torch.int64)
        else:
            people = train if VIEW1[split] == "train" else read_list(_LFWPeopleIndex, root, VIEW1[split], image_set)
            self.files = list(people.data)
            self.identities = torch.tensor([labels[target] for target in people.targets], dtype=torch.int64)

    @property
    def facts(self) -> dict:
        """The identity class count, from the files (DevTrain's people): joins cfg.data when training."""
        return {"targets": {"identity": {"num_classes": self.num_identities}}}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = {"image": read_image(self.files[index]), "identity": self.identities[index].clone()}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(sample)
