"""COCO instances (Common Objects in Context): detection, semantic segmentation and multi-label tagging of one image.

Read by torchvision's CocoDetection through `wrap_dataset_for_transforms_v2` (boxes XYXY, labels, per-instance
masks decoded from polygons and RLE by pycocotools, iscrowd), from the layout of the official release:

    {root}/train2017/*.jpg    {root}/annotations/instances_train2017.json    (split train)
    {root}/val2017/*.jpg      {root}/annotations/instances_val2017.json      (split val; the year is an option)

Targets of one image, derived from its annotations:
- detection: `boxes` (XYXY pixels) and `labels` of the non-crowd instances of positive width and height. COCO's
  80 category ids (1..90, with gaps) become contiguous labels 0..79 in sorted id order, the map built from the
  json's `categories`. Crowd annotations (iscrowd=1: one region over many objects) are no object to find (COCO's
  evaluation only ignores detections inside them); they are left out, as are boxes of no width or height, as
  DETR's loader does (facebookresearch/detr, datasets/coco.py, ConvertCocoPolysToMask).
- segmentation: a semantic mask, 0 background and 1..80 the categories (label + 1). Crowd regions get the ignore
  value 255. Where instances of two different categories overlap the pixel is ambiguous and gets 255 too;
  overlapping instances of one category keep it. (torchvision's segmentation reference, references/segmentation/
  coco_utils.py ConvertCocoPolysToMask, sets every pixel covered twice to 255; we keep the unambiguous case.)
- multilabel: float [80], 1 for each category with an annotation in the image, crowd ones included (a crowd of
  people still means people are present).

An image without annotations is a valid sample: no boxes, an all-background mask, no category present. Images
keep their own sizes here; the default transforms (configs/data/coco.yaml) resize each to data.image_size (256x256,
aspect not kept) and move boxes and mask with it. A COCO-format json of other categories works alike: set the
class counts of data.targets to its category count.
torchvision cannot download COCO: a missing folder is a UserError naming the layout and cocodataset.org.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

from mtl_cli.data.files import read_image
from mtl_cli.data.transforms import plain
from mtl_cli.errors import UserError

log = logging.getLogger("mtl")

SPLITS = ("train", "val")  # the test images of COCO come without public annotations
IGNORE = 255
DOWNLOAD = "https://cocodataset.org/#download"
TARGET_KEYS = {"boxes", "labels", "masks", "iscrowd"}


def layout_error(root: Path, split: str, year: int, missing: Path) -> UserError:
    return UserError(
        f"coco: {missing} does not exist. Expected the official layout: {root}/{split}{year}/*.jpg and "
        f"{root}/annotations/instances_{split}{year}.json (from {DOWNLOAD}: the images {split}{year}.zip and the "
        f"annotations annotations_trainval{year}.zip, unzipped into {root}). torchvision cannot download COCO, so "
        "data.download=true does not fetch it: download and unzip the files, then set data.root to their folder")


class _CocoFiles(CocoDetection):
    """CocoDetection reading its images with mtl_cli.data.files: a missing or corrupt jpg names itself, and the
    image is already the float tv_tensors.Image the rest of the pipeline takes."""

    def _load_image(self, id: int) -> tv_tensors.Image:
        return read_image(Path(self.root) / self.coco.loadImgs(id)[0]["file_name"])


def semantic_mask(masks: torch.Tensor, classes: torch.Tensor, crowd: torch.Tensor) -> tv_tensors.Mask:
    """int64 [H, W]: 0 background, `classes` (1..80) where instances lie, 255 on crowd regions and where two
    different classes overlap. masks: bool [N, H, W]; classes: int64 [N]; crowd: bool [N]."""
    semantic = torch.zeros(masks.shape[-2:], dtype=torch.int64)
    for mask, cls in zip(masks[~crowd], classes[~crowd]):
        clash = mask & (semantic != 0) & (semantic != cls)
        semantic[mask & (semantic == 0)] = cls
        semantic[clash] = IGNORE
    if crowd.any():
        semantic[masks[crowd].any(0)] = IGNORE
    return tv_tensors.Mask(semantic)


def coco_sample(image: tv_tensors.Image, target: Mapping, label_of: Mapping[int, int]) -> dict:
    """The sample dict of one image from the v2 wrapper's target (an empty target: no objects)."""
    height, width = image.shape[-2:]
    labels = torch.tensor([label_of[int(c)] for c in target.get("labels", [])], dtype=torch.int64)
    crowd = torch.tensor(target.get("iscrowd", []), dtype=torch.bool).reshape(-1)
    boxes = target.get("boxes")
    if boxes is None:
        boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
    masks = target.get("masks", torch.zeros(0, height, width)).as_subclass(torch.Tensor).bool()
    keep = ~crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    multilabel = torch.zeros(len(label_of))
    multilabel[labels] = 1.0
    return {
        "image": image,
        "boxes": tv_tensors.wrap(boxes.as_subclass(torch.Tensor)[keep].float(), like=boxes),  # json ints too
        "labels": labels[keep],
        "segmentation": semantic_mask(masks, labels + 1, crowd),
        "multilabel": multilabel,
    }


class Coco(Dataset):
    """COCO instances of one split; see the module docstring for the layout and the targets.

    Each sample: `image` float [3,H,W] in [0,1] (before the transforms, the file's own size), `boxes` BoundingBoxes
    [N,4] XYXY and `labels` int64 [N] (0..79), `segmentation` int64 [H,W] (0 background, 1..80, 255 ignore),
    `multilabel` float [80]. `categories` lists the (id, name) of each label in order.
    """

    def __init__(self, split: str, root: str, transforms: Callable | None = None, download: bool = False,
                 year: int = 2017):
        if split not in SPLITS:
            raise UserError(f"coco: unknown split {split!r}; valid splits are {', '.join(SPLITS)} (COCO's test "
                            "images have no public annotations)")
        root_path = Path(root).expanduser()
        images = root_path / f"{split}{year}"
        annotations = root_path / "annotations" / f"instances_{split}{year}.json"
        for path in (root_path, images, annotations):
            if not path.exists():
                raise layout_error(root_path, split, year, path)
        if download:
            log.warning("coco: data.download=true has no effect: torchvision cannot download COCO (%s)", DOWNLOAD)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                source = _CocoFiles(str(images), str(annotations))
            categories = sorted((int(c["id"]), str(c["name"])) for c in source.coco.dataset["categories"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(f"coco: cannot read {annotations}: {type(e).__name__}: {e}. Is it the instances json "
                            f"of the official release ({DOWNLOAD})?") from None
        self.annotations = annotations
        self.categories = categories
        self.label_of = {category_id: label for label, (category_id, _) in enumerate(categories)}
        self.source = wrap_dataset_for_transforms_v2(source, target_keys=TARGET_KEYS)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, target = self.source[index]
        try:
            sample = coco_sample(image, target, self.label_of)
        except KeyError as e:
            raise UserError(f"coco: an annotation of image id {self.source.ids[index]} in {self.annotations} names "
                            f"the category id {e}, which its `categories` lack") from None
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(sample)
