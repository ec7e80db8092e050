"""COCO from a fixture in the official layout ({root}/val2017/*.jpg, {root}/annotations/instances_val2017.json):
COCO's 80 real category ids (1..90 with gaps), polygon instances, an uncompressed-RLE crowd region, overlaps of two
categories and of one category, an image without annotations; checked sample by sample against what was written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from mtl_cli.build import build_dataset
from mtl_cli.data.files import BadSample
from mtl_cli.errors import UserError
from test_cli import ok, run_dirs
from test_configs import compose_cfg

H, W = 32, 48
NATIVE = [f"data.image_size=[{H},{W}]"]  # the Resize keeps the fixture's own size: pixels compare exactly
CATEGORY_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
                *range(84, 91)]
PERSON, DOG, CAT, TOOTHBRUSH, CAR, AIRPLANE = 1, 18, 17, 90, 3, 5
LABEL = {category_id: label for label, category_id in enumerate(CATEGORY_IDS)}  # person 0, ..., toothbrush 79


def rect(x1: int, y1: int, x2: int, y2: int) -> list[list[float]]:
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as in crowd annotations): run lengths over the column-major pixels, 0s first."""
    flat = mask.flatten(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": list(mask.shape)}


def crowd_region() -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[2:30, 37:45] = True
    mask[10:14, 30:37] = True
    return mask


# image file -> its instances: (category id, polygon or crowd mask, bbox xywh). Both splits hold the same scenes.
SCENES = {
    "000000000139.jpg": [(PERSON, rect(2, 4, 20, 24), [2, 4, 18, 20]),
                         (TOOTHBRUSH, rect(14, 10, 30, 28), [14, 10, 16, 18]),  # overlaps the person: 255
                         (PERSON, rect(6, 20, 12, 30), [6, 20, 6, 10]),        # overlaps a person: still person
                         (DOG, crowd_region(), [30, 2, 15, 28])],             # a crowd: 255, no box
    "000000000285.jpg": [],                                                   # no annotations: no objects
    "000000000632.jpg": [(CAT, [[4, 28, 24, 4, 44, 28]], [4, 4, 40, 24]),     # a triangle
                         (CAR, rect(0, 0, 6, 6), [0, 0, 6, 6])],
}


def write_coco(root: Path, split: str = "val2017") -> None:
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (name, instances) in enumerate(SCENES.items(), start=1):
        pixels = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name, quality=90)
        images.append({"id": image_id * 7, "file_name": name, "height": H, "width": W})
        for category_id, shape, bbox in instances:
            crowd = isinstance(shape, np.ndarray)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id * 7, "category_id": category_id,
                "segmentation": rle(shape) if crowd else shape, "area": float(bbox[2] * bbox[3]), "bbox": bbox,
                "iscrowd": int(crowd)})
    names = [f"category {i}" for i in CATEGORY_IDS]
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(CATEGORY_IDS, names)]
    rng.shuffle(categories)  # the map must sort by id, not trust the order of the file
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
        "info": {"description": "fixture"}, "licenses": [], "images": images, "annotations": annotations,
        "categories": categories}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, "train2017")
    write_coco(root, "val2017")
    return root


def dataset(root: Path, split: str = "val", *overrides: str):
    return build_dataset(compose_cfg(["data=coco", f"data.root={root}", *overrides]), split)


def test_samples_hold_the_written_boxes_labels_masks_and_categories(coco):
    data = dataset(coco, "val", *NATIVE)
    assert len(data) == len(SCENES)
    assert [category_id for category_id, _ in data.categories] == CATEGORY_IDS
    for i, (name, instances) in enumerate(SCENES.items()):  # the ids were written in this order
        sample = data[i]
        assert set(sample) == {"image", "boxes", "labels", "segmentation", "multilabel"}
        image = sample["image"]
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (3, H, W)
        decoded = np.array(Image.open(coco / "val2017" / name).convert("RGB"))  # decoded independently, by Pillow
        assert torch.equal(image, torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)

        solid = [(c, bbox) for c, shape, bbox in instances if not isinstance(shape, np.ndarray)]
        boxes = sample["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
        assert boxes.dtype == torch.float32 and tuple(boxes.canvas_size) == (H, W)
        expected = [[x, y, x + w, y + h] for _, (x, y, w, h) in solid]
        assert boxes.as_subclass(torch.Tensor).reshape(-1, 4).tolist() == expected
        assert sample["labels"].dtype == torch.int64 and sample["labels"].tolist() == [LABEL[c] for c, _ in solid]

        multilabel = torch.zeros(80)
        multilabel[[LABEL[c] for c, _, _ in instances]] = 1
        assert sample["multilabel"].dtype == torch.float32 and torch.equal(sample["multilabel"], multilabel)
        assert sample["segmentation"].dtype == torch.int64 and sample["segmentation"].shape == (H, W)


def test_the_semantic_mask_inside_polygons_on_overlaps_and_crowds(coco):
    data = dataset(coco, "val", *NATIVE)
    person, toothbrush, dog, cat = (LABEL[c] + 1 for c in (PERSON, TOOTHBRUSH, DOG, CAT))
    assert (person, toothbrush, dog) == (1, 80, 17)
    seg = data[0]["segmentation"]
    # away from polygon edges (pycocotools rasterises edges its own way): well inside or well outside
    assert (seg[5:10, 3:19] == person).all() and (seg[21:24, 7:11] == person).all()  # two persons overlap: person
    assert (seg[11:23, 15:19] == 255).all()                                            # person and toothbrush
    assert (seg[25:27, 15:29] == toothbrush).all() and (seg[11:23, 21:29] == toothbrush).all()
    crowd = torch.from_numpy(crowd_region())
    assert (seg[crowd] == 255).all() and dog not in seg.unique().tolist()
    assert (seg[0:2, :] == 0).all() and (seg[:, 46:] == 0).all()
    assert data[0]["labels"].tolist() == [LABEL[PERSON], LABEL[TOOTHBRUSH], LABEL[PERSON]]  # the crowd has no box
    assert data[0]["multilabel"][LABEL[DOG]] == 1                                          # ... but is present

    empty = data[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert (empty["segmentation"] == 0).all() and (empty["multilabel"] == 0).all()

    triangle = data[2]["segmentation"]
    assert (triangle[20:26, 20:28] == cat).all() and triangle[6, 6] == 0 and triangle[6, 42] == 0
    assert (triangle[1:4, 1:4] == LABEL[CAR] + 1).all()


def test_the_default_transforms_resize_image_boxes_and_mask_together(coco):
    cfg = compose_cfg(["data=coco", f"data.root={coco}"])
    assert list(cfg.data.image_size) == [256, 256]
    sample = build_dataset(cfg, "val")[0]
    native = dataset(coco, "val", *NATIVE)[0]
    assert sample["image"].shape == (3, 256, 256) and sample["segmentation"].shape == (256, 256)
    scale = torch.tensor([256 / W, 256 / H, 256 / W, 256 / H])
    torch.testing.assert_close(sample["boxes"].as_subclass(torch.Tensor), native["boxes"].as_subclass(torch.Tensor)
                               * scale)
    assert tuple(sample["boxes"].canvas_size) == (256, 256)
    assert set(sample["segmentation"].unique().tolist()) == set(native["segmentation"].unique().tolist())
    train = build_dataset(cfg, "train")[2]  # a random flip may move things, never the sizes or the labels
    assert train["image"].shape == (3, 256, 256) and train["labels"].tolist() == [LABEL[CAT], LABEL[CAR]]


def test_missing_root_names_the_layout_the_url_and_that_download_cannot_help(tmp_path):
    for download in ("false", "true"):
        with pytest.raises(UserError) as error:
            dataset(tmp_path / "nowhere", "val", f"data.download={download}")
        message = str(error.value)
        assert "val2017/*.jpg" in message and "annotations/instances_val2017.json" in message
        assert "cocodataset.org" in message and "cannot download COCO" in message
    with pytest.raises(UserError, match="valid splits are train, val"):
        dataset(tmp_path, "test")


def test_a_corrupt_jpg_names_the_file_and_skip_bad_warns(coco, tmp_path, caplog):
    shutil.copytree(coco, tmp_path / "coco")
    bad = tmp_path / "coco" / "val2017" / "000000000285.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadSample) as error:
        dataset(tmp_path / "coco", "val", *NATIVE)[1]
    assert str(bad) in str(error.value)
    skipping = dataset(tmp_path / "coco", "val", *NATIVE, "data.skip_bad=true")
    with caplog.at_level(logging.WARNING, logger="mtl"):
        assert skipping[1] is None and skipping[0] is not None
    assert str(bad) in caplog.text


def test_a_bad_annotation_file_names_itself(coco, tmp_path):
    shutil.copytree(coco, tmp_path / "coco")
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(UserError, match="instances_val2017.json"):
        dataset(tmp_path / "coco", "val")


def test_mtl_train_detection_segmentation_and_multilabel(coco, mtl_main, tmp_path):
    ok(mtl_main("train", "data=coco", f"data.root={coco}", "data.image_size=[32,32]",
                "tasks=[detection,segmentation,multilabel]", "backbone=small_cnn", "trainer.max_epochs=1",
                "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "data.batch_size=2",
                "trainer.progress=plain", "logger=console"))  # in tmp_path
    (run_dir,) = run_dirs(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]
    assert set(metrics) == {"detection", "segmentation", "multilabel"}
    assert {"map", "map_50"} <= set(metrics["detection"]) and "miou" in metrics["segmentation"]
