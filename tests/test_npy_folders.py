"""NYUv2 and Cityscapes in the layout of the MTAN release ({root}/{train,val}/{image,label,...}/{i}.npy), loaded
through configs/data/nyuv2.yaml and cityscapes.yaml, and the presets that train on them.

The fixtures are written here in the release's format (np.save of float arrays, H x W x C; labels as floats with
-1 unlabelled) at tiny sizes, set with data.dataset.size, and every sample is compared with the arrays written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import ok, run_dirs
from test_configs import compose_cfg

from mtl_cli.build import (build_dataset, build_model, build_optimizer, build_scheduler, build_tasks,
                           build_weighting)
from mtl_cli.data.collate import collate
from mtl_cli.data.files import BadSample
from mtl_cli.errors import UserError
from mtl_cli.models.heads import ASPPHead

NYU_SIZE, CITY_SIZE = (24, 32), (16, 32)  # the releases' aspect ratios (288 x 384, 128 x 256), tiny
COUNTS = {"train": 3, "val": 2}
# dataset -> folder -> (channels, or None for a label map; the dtype np.save wrote: float32 and float64 both occur)
LAYOUTS = {
    "nyuv2": {"image": (3, np.float32), "label": (None, np.float64), "depth": (1, np.float32),
              "normal": (3, np.float32)},
    "cityscapes": {"image": (3, np.float64), "label_7": (None, np.float64), "label_19": (None, np.float64),
                   "depth": (1, np.float32)},
}
CLASSES = {"label": 13, "label_7": 7, "label_19": 19}
TINY_RUN = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
            "data.batch_size=2", "backbone=small_cnn", "trainer.progress=plain", "logger=console"]


def write_release(root: Path, dataset: str, size: tuple[int, int], counts=COUNTS) -> dict:
    """Writes {root}/{split}/{folder}/{i}.npy as the release stores them; returns split -> folder -> [arrays]."""
    rng = np.random.default_rng(0)
    h, w = size
    written: dict = {}
    for split, count in counts.items():
        for folder, (channels, dtype) in LAYOUTS[dataset].items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if channels is None:  # class indices stored as floats, -1 where unlabelled
                    array = rng.integers(-1, CLASSES[folder], size=(h, w)).astype(dtype)
                elif folder == "normal":
                    array = rng.normal(size=(h, w, 3))
                    array /= np.linalg.norm(array, axis=-1, keepdims=True)
                    array[0, :4] = 0  # invalid pixels
                elif folder == "depth":
                    array = rng.uniform(0.5, 10.0, size=(h, w, 1))
                    array[-1, :3] = 0
                else:
                    array = rng.uniform(0.0, 1.0, size=(h, w, 3))
                array = array.astype(dtype)
                np.save(root / split / folder / f"{i}.npy", array)
                written.setdefault(split, {}).setdefault(folder, []).append(array)
    return written


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def nyuv2(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("nyuv2")
    return root, write_release(root, "nyuv2", NYU_SIZE)


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cityscapes")
    return root, write_release(root, "cityscapes", CITY_SIZE)


def nyu_cfg(root: Path, *overrides: str):
    return compose_cfg(["data=nyuv2", f"data.root={root}", "data.dataset.size=[24,32]", *overrides])


def city_cfg(root: Path, *overrides: str):
    return compose_cfg(["data=cityscapes", f"data.root={root}", "data.dataset.size=[16,32]", *overrides])


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.moveaxis(array, -1, 0).astype(np.float32))


def check_samples(dataset, written: dict, folders: dict[str, str]) -> None:
    """Every sample equals the arrays written: image [3,H,W] float32, labels int64 [H,W] with -1, depth [1,H,W],
    normals [3,H,W]; plain tensors, and nothing else."""
    assert len(dataset) == len(written["image"])
    for i in range(len(dataset)):
        sample = dataset[i]
        assert set(sample) == {"image", *folders}
        assert all(type(value) is torch.Tensor for value in sample.values())
        assert sample["image"].dtype == torch.float32 and torch.equal(sample["image"], chw(written["image"][i]))
        for key, folder in folders.items():
            array = written[folder][i]
            if key == "segmentation":
                assert sample[key].dtype == torch.int64 and sample[key].shape == array.shape
                assert torch.equal(sample[key], torch.from_numpy(array).long())
                assert (sample[key] == -1).any()
            else:
                assert sample[key].dtype == torch.float32 and torch.equal(sample[key], chw(array)), key


# ------------------------------------------------------------------------------------------ samples


def test_nyuv2_samples_are_the_arrays_of_the_release(nyuv2):
    root, written = nyuv2
    folders = {"segmentation": "label", "depth": "depth", "normals": "normal"}
    check_samples(build_dataset(nyu_cfg(root), "val"), written["val"], folders)
    check_samples(build_dataset(nyu_cfg(root, "data.transforms.train=[]"), "train"), written["train"], folders)
    cfg = nyu_cfg(root)
    assert cfg.data.targets.segmentation.num_classes == 13 and cfg.data.targets.segmentation.ignore_index == -1


def test_cityscapes_samples_read_the_7_class_labels(cityscapes):
    root, written = cityscapes
    check_samples(build_dataset(city_cfg(root), "val"), written["val"], {"segmentation": "label_7", "depth": "depth"})
    cfg = city_cfg(root, "data.dataset.folders.segmentation=label_19", "data.targets.segmentation.num_classes=19")
    check_samples(build_dataset(cfg, "val"), written["val"], {"segmentation": "label_19", "depth": "depth"})
    assert city_cfg(root).data.targets.segmentation.num_classes == 7


def test_the_train_split_is_augmented_and_keeps_its_labels(nyuv2):
    root, written = nyuv2
    dataset = build_dataset(nyu_cfg(root), "train")
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        sample = dataset[0]
        assert sample["image"].shape == (3, *NYU_SIZE) and sample["normals"].shape == (3, *NYU_SIZE)
        assert set(sample["segmentation"].unique().tolist()) <= set(np.unique(written["train"]["label"][0]).tolist())
        changed += not torch.equal(sample["image"], chw(written["train"]["image"][0]))
    assert changed > 0  # a flip or a zoom happened in some draw


def test_samples_batch_with_the_ignore_value_kept(cityscapes):
    root, _ = cityscapes
    dataset = build_dataset(city_cfg(root), "train")
    batch = collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, *CITY_SIZE) and batch["depth"].shape == (2, 1, *CITY_SIZE)
    assert batch["segmentation"].shape == (2, *CITY_SIZE) and batch["segmentation"].min() == -1


def test_a_target_folder_can_be_left_out(nyuv2, tmp_path):
    root, written = nyuv2
    shutil.copytree(root / "val", tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "normal")
    with pytest.raises(UserError, match=r"folder .*normal does not exist.*folders.<target>=null"):
        build_dataset(nyu_cfg(tmp_path), "val")
    dataset = build_dataset(nyu_cfg(tmp_path, "data.dataset.folders.normals=null"), "val")
    check_samples(dataset, written["val"], {"segmentation": "label", "depth": "depth"})


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("download", [False, True])
def test_a_missing_root_names_the_layout_and_where_to_get_the_data(tmp_path, download):
    cfg = nyu_cfg(tmp_path / "nowhere", f"data.download={str(download).lower()}")
    with pytest.raises(UserError) as error:
        build_dataset(cfg, "train")
    message = str(error.value)
    for part in ("nowhere", "does not exist", "{root}/{train,val}/{image,label,depth,normal}/{0,1,...}.npy",
                 "Shikun Liu", "github.com/lorenmt/mtan", "https://www.dropbox.com/s/p2nn02wijg7peiy/nyuv2.zip",
                 "cannot download"):
        assert part in message, part
    assert ("data.download=true was set" in message) == download
    with pytest.raises(UserError, match=r"label_7.*cityscapes2.zip"):
        build_dataset(city_cfg(tmp_path / "nowhere"), "val")


def test_a_test_split_is_refused_with_a_clear_message(nyuv2):
    root, _ = nyuv2
    with pytest.raises(UserError, match=r"train and val only.*data.split=val"):
        build_dataset(nyu_cfg(root), "test")


def test_a_corrupt_npy_names_the_file_and_skip_bad_warns(nyuv2, tmp_path, caplog):
    root, _ = nyuv2
    shutil.copytree(root / "val", tmp_path / "val")
    bad = tmp_path / "val" / "depth" / "1.npy"
    bad.write_bytes(b"\x93NUMPY junk, not an array")
    dataset = build_dataset(nyu_cfg(tmp_path), "val")
    assert dataset[0]["depth"].shape == (1, *NYU_SIZE)
    with pytest.raises(BadSample, match=r"depth/1.npy.*not a readable .npy"):
        dataset[1]
    skipping = build_dataset(nyu_cfg(tmp_path, "data.skip_bad=true"), "val")
    with caplog.at_level(logging.WARNING, logger="mtl"):
        assert skipping[1] is None and skipping[0] is not None
    assert "depth/1.npy" in caplog.text


def test_an_array_of_another_size_names_the_file(nyuv2):
    root, _ = nyuv2
    dataset = build_dataset(compose_cfg(["data=nyuv2", f"data.root={root}"]), "val")  # expects 288 x 384
    with pytest.raises(BadSample, match=r"image/0.npy.*\[24, 32, 3\].*288 x 384 \(data.dataset.size\)"):
        dataset[0]
    assert build_dataset(compose_cfg(["data=nyuv2", f"data.root={root}", "data.dataset.size=null"]), "val")[0]


# ------------------------------------------------------------------------------------------ training runs


def final_metrics(cwd: Path) -> dict:
    (run_dir,) = run_dirs(cwd)
    return json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]


def test_mtl_train_on_nyuv2(nyuv2, mtl_main, tmp_path):
    root, _ = nyuv2
    ok(mtl_main("train", "data=nyuv2", f"data.root={root}", "data.dataset.size=[24,32]",
                "tasks=[segmentation,depth,normals]", *TINY_RUN))  # in tmp_path, on one thread (pytestmark)
    metrics = final_metrics(tmp_path)
    assert set(metrics) == {"segmentation", "depth", "normals"}
    assert set(metrics["normals"]) == {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}
    assert all(np.isfinite(v) for task in metrics.values() for v in task.values())


def test_mtl_train_on_cityscapes(cityscapes, mtl_main, tmp_path):
    root, _ = cityscapes
    ok(mtl_main("train", "data=cityscapes", f"data.root={root}", "data.dataset.size=[16,32]",
                "tasks=[segmentation,depth]", *TINY_RUN))
    metrics = final_metrics(tmp_path)
    assert set(metrics) == {"segmentation", "depth"} and set(metrics["depth"]) == {"abs_err", "rel_err"}


# ------------------------------------------------------------------------------------------ presets


def test_the_nyuv2_preset_is_libmtls_setup():
    cfg = compose_cfg(["experiment=nyuv2_hps_resnet50", "data.root=/data/nyuv2"], hydra=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.data, choices.backbone, choices.architecture) == ("nyuv2", "resnet50", "hps")
    assert list(cfg.tasks) == ["segmentation", "depth", "normals"] and cfg.name == "nyuv2_hps_resnet50"
    assert cfg.backbone.weights == "IMAGENET1K_V1"
    assert list(cfg.backbone.replace_stride_with_dilation) == [False, True, True]
    assert all(cfg.tasks[t].head._target_ == "mtl_cli.models.heads.ASPPHead" for t in cfg.tasks)
    assert cfg.tasks.normals.head.normalize and cfg.tasks.segmentation.head.out_channels == 13
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("torch.optim.Adam", 1e-4, 1e-5)
    assert (cfg.scheduler._target_, cfg.scheduler.step_size, cfg.scheduler.gamma) == (
        "torch.optim.lr_scheduler.StepLR", 100, 0.5)
    assert cfg.trainer.max_epochs == 200 and cfg.data.batch_size == 8
    assert [t["_target_"] for t in cfg.data.transforms.train] == [
        "mtl_cli.data.transforms.RandomScaleCrop", "torchvision.transforms.v2.RandomHorizontalFlip"]
    assert cfg.get("baselines") is None  # the published rows are of other setups: see the preset's comment
    build_tasks(cfg)
    dropped = compose_cfg(["experiment=nyuv2_hps_resnet50", "data.root=/x", "~tasks.normals"])
    assert list(dropped.tasks) == ["segmentation", "depth"]
    with pytest.raises(UserError, match="tasks.normals has settings but no task config"):
        build_tasks(compose_cfg(["experiment=nyuv2_hps_resnet50", "data.root=/x", "tasks=[segmentation,depth]"]))


def test_the_cityscapes_and_mtan_presets_compose():
    city = compose_cfg(["experiment=cityscapes_hps", "data.root=/data/cityscapes2"], hydra=True)
    assert city.hydra.runtime.choices.data == "cityscapes" and list(city.tasks) == ["segmentation", "depth"]
    assert all(city.tasks[t].head._target_ == "mtl_cli.models.heads.ASPPHead" for t in city.tasks)
    assert city.tasks.segmentation.head.out_channels == 7 and city.get("baselines") is None
    assert (city.optimizer.lr, city.scheduler.step_size, city.trainer.max_epochs) == (1e-4, 100, 200)
    mtan = compose_cfg(["experiment=nyuv2_mtan_resnet50", "data.root=/data/nyuv2"], hydra=True)
    assert mtan.hydra.runtime.choices.architecture == "mtan" and mtan.name == "nyuv2_mtan_resnet50"
    assert list(mtan.backbone.out_indices) == [1, 2, 3, 4] and mtan.optimizer.lr == 1e-4
    assert mtan.tasks.depth.head._target_ == "mtl_cli.models.heads.ASPPHead"


def test_the_nyuv2_preset_builds_and_steps_once(tmp_path):
    root = tmp_path / "nyuv2"
    write_release(root, "nyuv2", (32, 32), counts={"train": 2})
    cfg = compose_cfg(["experiment=nyuv2_hps_resnet50", f"data.root={root}", "data.dataset.size=[32,32]",
                       "backbone.weights=null"])
    torch.manual_seed(0)
    tasks = build_tasks(cfg)
    model = build_model(cfg, tasks)
    assert model.backbone.channels == [2048] and model.backbone.strides == [8]  # dilated: output stride 8
    head = model.heads["segmentation"]
    assert isinstance(head, ASPPHead) and [conv[0].dilation for conv in head.aspp.convs[1:4]] == [
        (12, 12), (24, 24), (36, 36)]
    optimizer = build_optimizer(cfg, model, build_weighting(cfg, tasks))
    scheduler = build_scheduler(cfg, optimizer)
    dataset = build_dataset(cfg, "train")
    batch = collate([dataset[0], dataset[1]])
    outputs = model(batch["image"])
    assert outputs["segmentation"].shape == (2, 13, 32, 32) and outputs["depth"].shape == (2, 1, 32, 32)
    norms = outputs["normals"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    loss = sum(task.loss(outputs[name], task.target_of(batch)) for name, task in tasks.items())
    assert torch.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    optimizer.step()
    scheduler.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
