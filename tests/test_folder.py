"""`data=folder`: the folder the README's section describes, written here by hand (CSV and JSONL manifests, JPG and
PNG images, mask PNGs, 16-bit depth PNGs and a .npy, empty cells), loaded through the data config and checked
sample by sample; one `mtl train` with the README's command and an `mtl eval` of its checkpoint; missing labels
leave the loss as it is on the labelled samples alone; the errors a user meets with a hand-made folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_cli import ok, run_dirs
from test_configs import compose_cfg

from mtl_cli.build import adopt_facts, build_dataset, build_model, build_tasks
from mtl_cli.data.collate import collate
from mtl_cli.data.files import BadSample
from mtl_cli.errors import UserError

# The README's manifests, verbatim: train.csv, the same rows as train.jsonl, and val.csv.
TRAIN_CSV = """\
image,label,tags,mask,depth,boxes
images/0001.jpg,dog,sofa;indoor,masks/0001.png,depth/0001.png,"[[4, 6, 20, 18, 'dog'], [20, 2, 30, 12, 'cat']]"
images/0002.png,cat,,masks/0002.png,,"[[6, 8, 30, 24, 'cat']]"
images/0003.png,,outdoor,,depth/0003.npy,[]
"""
TRAIN_JSONL = """\
{"image": "images/0001.jpg", "label": "dog", "tags": ["sofa", "indoor"], "mask": "masks/0001.png", "depth": "depth/0001.png", "boxes": [[4, 6, 20, 18, "dog"], [20, 2, 30, 12, "cat"]]}
{"image": "images/0002.png", "label": "cat", "mask": "masks/0002.png", "boxes": [[6, 8, 30, 24, "cat"]]}
{"image": "images/0003.png", "label": null, "tags": ["outdoor"], "depth": "depth/0003.npy", "boxes": []}
"""
VAL_CSV = """\
image,label,tags,mask,depth,boxes
images/0004.jpg,cat,indoor,masks/0004.png,depth/0004.png,
images/0005.png,dog,,,,[]
"""
OWN_CONFIG = """\
# ~/my_configs/data/pets.yaml
defaults: [folder, _self_]
name: pets
root: /data/pets
image_size: [256, 256]
targets:
  classification: {column: label}
  segmentation: {num_classes: 3}
"""
README_COMMAND = ["data=folder", "tasks=[classification,segmentation]", "data.targets.segmentation.num_classes=3"]
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "data.batch_size=2",
        "backbone=small_cnn", "trainer.progress=plain", "data.image_size=[24,32]"]
ALL_TASKS = "tasks=[classification,multilabel,segmentation,depth,detection]"
H, W = 24, 32  # the size of 0001, 0003, 0004 and 0005 (and data.image_size here); 0002 is 32x48 (H x W)
SIZES = {"0001": (H, W), "0002": (32, 48), "0003": (H, W), "0004": (H, W), "0005": (H, W)}


def mask_of(name: str) -> np.ndarray:
    """0 background, 1 cat, 2 dog, 255 ignored (the top row)."""
    h, w = SIZES[name]
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:, : w // 2] = 2 if name == "0001" else 1
    mask[0] = 255
    return mask


def depth_mm(name: str) -> np.ndarray:
    """Millimetres as a 16-bit PNG holds them: 1500 (1.5 m) on the left half, 0 (invalid) on the right."""
    h, w = SIZES[name]
    depth = np.zeros((h, w), np.uint16)
    depth[:, : w // 2] = 1500 + int(name)
    return depth


def write_folder(root: Path, manifest: str = "csv") -> Path:
    """The README's layout: images/, masks/, depth/, train.csv (or train.jsonl) and val.csv."""
    for sub in ("images", "masks", "depth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.{'jpg' if name in ('0001', '0004') else 'png'}")
        Image.fromarray(mask_of(name)).save(root / "masks" / f"{name}.png")
        Image.fromarray(depth_mm(name)).save(root / "depth" / f"{name}.png")
    npy = np.full((H, W), 2.25, np.float32)
    npy[:, :4] = np.nan  # invalid
    np.save(root / "depth" / "0003.npy", npy)
    if manifest == "csv":
        (root / "train.csv").write_text(TRAIN_CSV)
    else:
        (root / "train.jsonl").write_text(TRAIN_JSONL)
    (root / "val.csv").write_text(VAL_CSV)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("pets") / "pets")


def cfg_for(root: Path, *overrides: str):
    """The README's data config, with no flip (the train split takes val's transforms) so samples are exact."""
    return compose_cfg(["data=folder", f"data.root={root}", "data.image_size=[24,32]", "~data.transforms.train",
                        "data.targets.segmentation.num_classes=3", *overrides])


def png(root: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(root / "images" / f"{name}.png"))).permute(2, 0, 1).float() / 255


# ------------------------------------------------------------------------------------------- sample by sample


def test_the_readme_folder_loads_sample_by_sample(folder):
    dataset = build_dataset(cfg_for(folder, ALL_TASKS), "train")
    assert len(dataset) == 3
    assert dataset.facts == {
        "dataset": {"classes": {"classification": ["cat", "dog"], "multilabel": ["indoor", "outdoor", "sofa"],
                                "detection": ["cat", "dog"]}},
        "targets": {"classification": {"num_classes": 2}, "multilabel": {"num_classes": 3},
                    "detection": {"num_classes": 2}}}
    first, second, third = (dataset[i] for i in range(3))
    assert set(first) == {"image", "classification", "multilabel", "segmentation", "depth", "boxes", "labels"}
    assert set(second) == {"image", "classification", "segmentation", "boxes", "labels"}  # empty tags, depth
    assert set(third) == {"image", "multilabel", "depth", "boxes", "labels"}  # empty label, mask
    for sample in (first, second, third):
        assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
        assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert torch.equal(third["image"], png(folder, "0003"))  # a PNG at the target size: exact
    # class indices in the sorted maps: dog = 1, cat = 0; tags "sofa;indoor" -> indoor, sofa
    assert first["classification"].dtype == torch.int64 and int(first["classification"]) == 1
    assert int(second["classification"]) == 0
    assert first["multilabel"].tolist() == [1.0, 0.0, 1.0] and third["multilabel"].tolist() == [0.0, 1.0, 0.0]
    # the mask: class indices as written, the ignore value kept; 0002 (32x48) resized with nearest neighbours
    assert first["segmentation"].dtype == torch.int64
    assert torch.equal(first["segmentation"], torch.from_numpy(mask_of("0001")).long())
    assert set(second["segmentation"].unique().tolist()) == {0, 1, 255}
    # depth: the 16-bit PNG divided by 1000, 0 stays invalid; the .npy as stored, NaN -> 0
    expected = torch.from_numpy(depth_mm("0001").astype(np.float32) / 1000)[None]
    assert first["depth"].shape == (1, H, W) and torch.allclose(first["depth"], expected)
    assert first["depth"][0, 0, 0] == pytest.approx(1.501) and first["depth"][0, 0, -1] == 0
    assert third["depth"][0, :, :4].eq(0).all() and third["depth"][0, :, 4:].eq(2.25).all()
    # boxes: XYXY pixels of the resized image (0002: 48x32 -> 32x24 scales x by 2/3, y by 3/4), labels mapped
    assert first["boxes"].tolist() == [[4, 6, 20, 18], [20, 2, 30, 12]] and first["labels"].tolist() == [1, 0]
    assert torch.allclose(second["boxes"], torch.tensor([[4.0, 6.0, 20.0, 18.0]])) and second["labels"].tolist() == [0]
    assert third["boxes"].shape == (0, 4) and third["labels"].shape == (0,)  # `[]`: labelled, no objects


def test_the_jsonl_manifest_gives_the_same_samples(folder, tmp_path):
    jsonl = write_folder(tmp_path / "pets", manifest="jsonl")
    from_csv, from_jsonl = (build_dataset(cfg_for(root, ALL_TASKS), "train") for root in (folder, jsonl))
    assert from_jsonl.facts == from_csv.facts
    for a, b in zip(from_csv, from_jsonl):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_the_train_flip_moves_masks_and_boxes_with_the_image(folder):
    cfg = cfg_for(folder, ALL_TASKS, "+data.transforms.train=[{_target_: torchvision.transforms.v2.Resize, size: "
                                     "[24, 32]}, {_target_: torchvision.transforms.v2.RandomHorizontalFlip, p: 1.0}]")
    flipped = build_dataset(cfg, "train")[0]
    assert torch.equal(flipped["segmentation"], torch.from_numpy(mask_of("0001")).long().flip(-1))
    assert flipped["boxes"].tolist() == [[W - 20, 6, W - 4, 18], [W - 30, 2, W - 20, 12]]


def test_val_takes_the_class_maps_of_train_and_a_label_outside_them_is_named(folder, tmp_path, caplog):
    val = build_dataset(cfg_for(folder, ALL_TASKS), "val")
    assert val.classes["classification"] == ["cat", "dog"] and [int(s["classification"]) for s in val] == [0, 1]
    assert "boxes" not in val[0] and val[1]["boxes"].shape == (0, 4)  # empty cell: no label; []: no objects
    root = tmp_path / "pets"
    shutil.copytree(folder, root)
    (root / "val.csv").write_text(VAL_CSV.replace("images/0005.png,dog", "images/0005.png,fox"))
    with pytest.raises(UserError, match=r"val.csv line 3, column 'label': label\(s\) \['fox'\] are not in the class "
                                        r"map of task 'classification' \(known: \['cat', 'dog'\]\)"):
        build_dataset(cfg_for(root, "tasks=[classification]"), "val")
    with caplog.at_level(logging.WARNING, logger="mtl"):
        skipped = build_dataset(cfg_for(root, "tasks=[classification]", "data.dataset.unknown_labels=skip"), "val")
    assert "classification" not in skipped[1] and "'fox'" in caplog.text
    # classes given (by the user, or by a checkpoint's config) are used as given, in their order
    given = build_dataset(cfg_for(folder, "tasks=[classification]", "data.dataset.classes={classification:"
                                                                     "[dog,cat,fox]}"), "train")
    assert [int(s["classification"]) for s in given if "classification" in s] == [0, 1]
    assert given.facts["targets"]["classification"]["num_classes"] == 3


def test_the_readme_own_config_gives_the_command_line_config(folder, tmp_path):
    (tmp_path / "my_configs" / "data").mkdir(parents=True)
    (tmp_path / "my_configs" / "data" / "pets.yaml").write_text(OWN_CONFIG.replace("/data/pets", str(folder)))
    own = compose_cfg([f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]", "data=pets",
                       "tasks=[classification,segmentation]"])
    typed = compose_cfg([*README_COMMAND, f"data.root={folder}", "data.image_size=[256,256]"])
    assert own.data.name == "pets" and OmegaConf.to_container(own.data.targets, resolve=True) == \
        OmegaConf.to_container(typed.data.targets, resolve=True)
    a, b = build_dataset(own, "val"), build_dataset(typed, "val")
    assert a.facts == b.facts and a[0]["image"].shape == (3, 256, 256)
    assert all(torch.equal(a[0][key], b[0][key]) for key in a[0])


# ------------------------------------------------------------------------------------- missing labels, losses


def test_a_batch_with_missing_labels_has_the_loss_of_its_labelled_samples(folder):
    torch.manual_seed(0)
    cfg = cfg_for(folder, "tasks=[classification,segmentation]")
    dataset = build_dataset(cfg, "train")
    cfg = adopt_facts(cfg, dataset)
    tasks = build_tasks(cfg)
    model = build_model(cfg, tasks).eval()  # eval: batch norm uses its running statistics, samples independent
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collate(samples)
    assert batch["present/classification"].tolist() == [True, True, False]
    assert batch["present/segmentation"].tolist() == [True, True, False]
    with torch.no_grad():
        outputs = model(batch["image"])
        for name, task in tasks.items():
            labelled = collate([s for s in samples if task.target in s])
            assert "present/" + task.target not in labelled
            alone = task.loss(model(labelled["image"])[name], labelled[task.target])
            assert torch.allclose(task.loss(*task.select(outputs[name], batch)), alone, atol=1e-6), name


# ---------------------------------------------------------------------------------- mtl train, then mtl eval


def test_train_with_the_readme_command_then_eval_with_the_saved_class_maps(folder, mtl_main, tmp_path, monkeypatch):
    root = tmp_path / "pets"
    shutil.copytree(folder, root)
    ok(mtl_main("train", *README_COMMAND, f"data.root={root}", *TINY))  # in tmp_path
    (run_dir,) = run_dirs(tmp_path / "outputs")
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    saved = OmegaConf.create(checkpoint["config"])
    assert OmegaConf.to_container(saved.data.dataset.classes) == {"classification": ["cat", "dog"]}
    assert saved.data.targets.classification.num_classes == 2
    assert "- cat\n" in (run_dir / "config.yaml").read_text()
    final = json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]
    assert set(final) == {"classification", "segmentation"}

    (root / "train.csv").unlink()  # eval needs no train manifest: the class maps come from the checkpoint
    (tmp_path / "eval").mkdir()
    monkeypatch.chdir(tmp_path / "eval")
    ok(mtl_main("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}"))
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "eval").rglob("eval.json")]
    for task, values in final.items():
        for metric, value in values.items():
            assert report["metrics"][task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, metric)
    # the checkpoint's config builds val with its own maps: a label the run never saw is named as such
    (root / "val.csv").write_text(VAL_CSV.replace("images/0004.jpg,cat", "images/0004.jpg,ant"))
    with pytest.raises(UserError, match=r"\['ant'\] are not in the class map .* \(known: \['cat', 'dog'\]\)"):
        build_dataset(saved, "val")


# --------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change, overrides, expected", [
    (lambda r: shutil.rmtree(r), [], ["no folder at", "train.csv", "README section"]),
    (lambda r: (r / "train.csv").unlink(), [], ["no manifest for split 'train'", "train.jsonl",
                                                "data.dataset.manifest.train"]),
    (lambda r: (r / "train.csv").write_text("image,label\n"), [], ["train.csv has no rows"]),
    (None, ["data.targets.classification.column=breed"], ["has no column 'breed'",
                                                          "its columns: image, label, tags, mask, depth, boxes"]),
    (None, ["data.dataset.image_column=path"], ["has no column 'path'"]),
    (lambda r: (r / "train.csv").write_text(TRAIN_CSV.replace("[[6, 8, 30, 24, 'cat']]", "[[6, 8, 3, 24, 'cat']]")),
     ["tasks=[detection]"], ["train.csv line 3, column 'boxes'", "x1 < x2"]),
    (lambda r: (r / "train.csv").write_text(TRAIN_CSV.replace('"[[6, 8, 30, 24, \'cat\']]"', "[[6, 8, 30, 24, 1]]")),
     [], ["train.csv line 3 has more cells than the header", "double quotes"]),
    (lambda r: (r / "train.csv").write_text(TRAIN_CSV + "images/0005.png,cat,,,,nope\n"), ["tasks=[detection]"],
     ["train.csv line 5, column 'boxes'", "'nope'"]),
    (None, ["tasks=[segmentation]", "data.targets.segmentation.num_classes=null"],
     ["data.targets.segmentation.num_classes must be given"]),
    (lambda r: (r / "train.csv").write_text(TRAIN_CSV.replace(",cat,", ",dog,")), [],
     ["column 'label' (task 'classification') holds one class only ('dog')"]),
])
def test_manifest_and_column_errors_name_what_is_wrong(folder, tmp_path, change, overrides, expected):
    root = tmp_path / "pets"
    shutil.copytree(folder, root)
    if change is not None:
        change(root)
    with pytest.raises(UserError) as error:
        build_dataset(cfg_for(root, "tasks=[classification]", *overrides), "train")
    for text in expected:
        assert text in str(error.value), (text, str(error.value))


def test_bad_files_are_named_and_skip_bad_skips_them(folder, tmp_path, caplog):
    root = tmp_path / "pets"
    shutil.copytree(folder, root)
    (root / "images" / "0002.png").write_bytes(b"not a png at all")
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(root / "masks" / "0001.png")  # class 7 of 3
    dataset = build_dataset(cfg_for(root, "tasks=[classification,segmentation]"), "train")
    with pytest.raises(BadSample, match="0002.png: not a readable image"):
        dataset[1]
    with pytest.raises(BadSample, match=r"0001.png: mask values \[7\] are neither class indices 0..2"):
        dataset[0]
    (root / "images" / "0003.png").unlink()
    with pytest.raises(BadSample, match="0003.png: no such file"):
        dataset[2]
    skipping = build_dataset(cfg_for(root, "tasks=[classification,segmentation]", "data.skip_bad=true"), "train")
    with caplog.at_level(logging.WARNING, logger="mtl"):
        assert [skipping[i] for i in range(3)] == [None, None, None]
    assert str(root / "images" / "0002.png") in caplog.text and "(3 skipped so far" in caplog.text
    assert skipping.facts["dataset"]["classes"]["classification"] == ["cat", "dog"]
    (root / "train.csv").write_text(TRAIN_CSV.replace("[20, 2, 30, 12, 'cat']", "[20, 2, 40, 12, 'cat']"))
    with pytest.raises(BadSample, match=r"0001.jpg: boxes \[\[20.0, 2.0, 40.0, 12.0\]\] .* outside the image"):
        build_dataset(cfg_for(root, "tasks=[detection]"), "train")[0]


def test_absolute_paths_value_cells_and_a_named_manifest(folder, tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "all.csv").write_text(f"image,value\n{folder / 'images' / '0003.png'},2.5\n"
                                                 f"images/0005.png,\n")
    cfg = cfg_for(folder, "tasks=[count]", f"data.dataset.manifest={{test: {tmp_path / 'labels' / 'all.csv'}}}")
    test = build_dataset(cfg, "test")
    assert torch.equal(test[0]["image"], png(folder, "0003")) and "count" not in test[1]
    assert test[0]["count"].dtype == torch.float32 and float(test[0]["count"]) == 2.5
