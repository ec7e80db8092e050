"""Every sample of every split is checked as it is read (mtl_cli/data/checks.py): a label beyond its task's classes
or a non-finite image anywhere is one message naming the split, the sample's file and the valid range, exit 2, also
from a worker process; ignore values pass; a bad validation label does not lose the epoch's training.

The fixtures are NYUv2 in the MTAN release's format (tests/test_npy_folders.py writes it) and the README's
data=folder (tests/test_folder.py), copied and spoilt one array at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_configs import compose_cfg
from test_folder import cfg_for, write_folder
from test_npy_folders import NYU_SIZE, write_release

from mtl_cli.build import build_dataset, resolve_data
from mtl_cli.data.checks import LabelRange, SampleError, fits

COUNTS = {"train": 6, "val": 4}
RUN = ["data=nyuv2", "data.dataset.size=[24,32]", "tasks=[segmentation,depth]", "data.transforms.train=[]",
       "backbone=small_cnn", "data.batch_size=2", "trainer.max_epochs=1", "trainer.progress=none", "logger=console",
       "hydra.run.dir=run"]
RANGE = "task 'segmentation' predicts 13 classes, labels 0..12 (or -1, ignored)"
REMEDY = "fix the data, or set tasks.segmentation.num_classes to the data's class count (see data.targets)"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyuv2")
    write_release(root, "nyuv2", NYU_SIZE, counts=COUNTS)
    return root


@pytest.fixture
def nyuv2(release, tmp_path) -> Path:
    """A copy of the release to spoil."""
    return Path(shutil.copytree(release, tmp_path / "nyuv2"))


def spoil_label(root: Path, split: str, index: int, value: float = 50.0) -> str:
    """Writes `value` into one pixel of a label map; returns the range message the sample then gets."""
    path = root / split / "label" / f"{index}.npy"
    label = np.load(path)
    label[3, 5] = value
    np.save(path, label)
    kept = label[label != -1]
    return f"but the sample holds labels from {int(kept.min())} to {int(kept.max())}"


def error_line(r) -> str:
    """The one line the CLI printed for a user error (nothing else on stderr: no traceback)."""
    assert r.status == 2, r
    assert "Traceback" not in r.err + r.out
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    return lines[0]


def test_a_bad_pixel_in_one_validation_image_is_named_and_the_epoch_is_kept(nyuv2, mtl_main):
    found = spoil_label(nyuv2, "val", 2)
    r = mtl_main("train", *RUN, f"data.root={nyuv2}")
    assert error_line(r) == (f"mtl train: error: split 'val', sample 2 ({nyuv2}/val/label/2.npy): {RANGE}, "
                             f"{found}: {REMEDY}. Epoch 1's training is saved: once fixed, go on with mtl train "
                             f"resume={Path.cwd() / 'run/checkpoints/last.pt'}")
    assert found.endswith("to 50")
    last = torch.load(Path("run/checkpoints/last.pt"), weights_only=True)  # mtl_main runs in tmp_path
    assert last["epoch"] == 1 and last["step"] == 3  # the epoch's training is kept: resume goes on from it


def test_a_bad_pixel_anywhere_in_the_train_split_is_named(nyuv2, mtl_main):
    """Sample 4 comes in the third batch (with seed 0 the batches are [1, 3], [2, 0], [4, 5]): a check of the first
    batch alone would miss it."""
    found = spoil_label(nyuv2, "train", 4, value=-7)
    r = mtl_main("train", *RUN, f"data.root={nyuv2}")
    assert error_line(r) == (f"mtl train: error: split 'train', sample 4 ({nyuv2}/train/label/4.npy): {RANGE}, "
                             f"{found}: {REMEDY}")
    assert "labels from -7 to" in found
    dataset = build_dataset(compose_cfg(["data=nyuv2", f"data.root={nyuv2}", "data.dataset.size=[24,32]",
                                         "data.transforms.train=[]"]), "train")  # no crop: the pixel stays
    for index in range(len(dataset)):  # every sample is checked as it is read, whichever batch it falls in
        if index != 4:
            assert dataset[index]["segmentation"].min() == -1
    with pytest.raises(SampleError, match=r"split 'train', sample 4 .*labels from -7 to"):
        dataset[4]


def test_a_nan_image_is_named(nyuv2, mtl_main):
    path = nyuv2 / "train" / "image" / "1.npy"
    image = np.load(path)
    image[0, 0, 1] = np.nan
    np.save(path, image)
    r = mtl_main("train", *RUN, f"data.root={nyuv2}")
    assert error_line(r) == (f"mtl train: error: split 'train', sample 1 ({path}): the image holds NaN or infinite "
                             "values: fix or remove the file")


def test_with_workers_the_message_is_the_same_one_line(nyuv2, mtl_main):
    found = spoil_label(nyuv2, "val", 1)
    r = mtl_main("train", *RUN, f"data.root={nyuv2}", "data.num_workers=2")
    assert error_line(r) == (f"mtl train: error: split 'val', sample 1 ({nyuv2}/val/label/1.npy): {RANGE}, "
                             f"{found}: {REMEDY}. Epoch 1's training is saved: once fixed, go on with mtl train "
                             f"resume={Path.cwd() / 'run/checkpoints/last.pt'}")


@pytest.mark.slow  # a longer variant; the default run checks the same more cheaply
def test_a_bad_label_in_one_ranks_shard_ends_the_distributed_run_with_its_line(nyuv2, mtl_main):
    """Validation batch [0, 1] gives sample 1 to rank 1 alone: its error ends both processes and the command."""
    found = spoil_label(nyuv2, "val", 1)
    r = mtl_main("train", *RUN, f"data.root={nyuv2}", "trainer.devices=2")
    assert error_line(r) == (f"mtl train: error: rank 1: split 'val', sample 1 ({nyuv2}/val/label/1.npy): {RANGE}, "
                             f"{found}: {REMEDY}")
    assert not Path("run/metrics.json").exists()


def test_with_workers_a_missing_file_is_still_a_user_error(nyuv2, mtl_main):
    """BadSample crosses the worker process as the same one line (torch would rebuild it as a RuntimeError)."""
    (nyuv2 / "train" / "depth" / "3.npy").unlink()
    r = mtl_main("train", *RUN, f"data.root={nyuv2}", "data.num_workers=2")
    assert error_line(r) == (f"mtl train: error: cannot read {nyuv2}/train/depth/3.npy: no such file. Fix or remove "
                             "the file, or set data.skip_bad=true to skip bad samples with a warning")


def test_a_correct_dataset_with_ignored_pixels_trains(release, mtl_main):
    labels = [np.load(p) for p in sorted(release.glob("*/label/*.npy"))]
    assert all((label == -1).any() for label in labels)  # the ignore value is in every label map
    r = mtl_main("train", *RUN, f"data.root={release}", "data.num_workers=2")
    assert r.status == 0, r
    assert Path("run/metrics.json").is_file() and Path("run/checkpoints/best.pt").is_file()


def test_skip_bad_skips_bad_files_and_still_checks_the_labels(nyuv2):
    (nyuv2 / "val" / "depth" / "0.npy").unlink()
    found = spoil_label(nyuv2, "val", 3)
    dataset = build_dataset(compose_cfg(["data=nyuv2", f"data.root={nyuv2}", "data.dataset.size=[24,32]",
                                         "data.skip_bad=true"]), "val")
    assert dataset[0] is None and dataset[1] is not None
    with pytest.raises(SampleError) as error:
        dataset[3]
    assert str(error.value) == f"split 'val', sample 3 ({nyuv2}/val/label/3.npy): {RANGE}, {found}: {REMEDY}"


def test_a_member_of_data_multi_is_named(nyuv2):
    spoil_label(nyuv2, "val", 1)
    cfg = compose_cfg(["data=multi", "+data@data.members.scenes=digit_scenes", "+data@data.members.nyu=nyuv2",
                       f"data.members.nyu.root={nyuv2}", "data.members.nyu.dataset.size=[24,32]",
                       "data.members.scenes.dataset.scenes={train:4,val:3,test:3}",
                       "data.members.scenes.dataset.image_size=32", "tasks=[segmentation,depth]",
                       "+data.tasks={scenes: [depth], nyu: [segmentation]}"])
    dataset = build_dataset(resolve_data(cfg), "val")
    assert all(dataset[i] is not None for i in (0, 1, 2, 3))  # the 3 scenes, then nyu's sample 0
    with pytest.raises(SampleError) as error:
        dataset[4]
    assert str(error.value).startswith(f"split 'val', sample 4 (member 'nyu', sample 1 ({nyuv2}/val/label/1.npy)): "
                                       f"{RANGE}, but the sample holds labels from 0 to 50")


def test_a_folder_sample_is_named_by_its_manifest_line_and_file(tmp_path):
    """The mask holds 0..2 (data.targets.segmentation.num_classes=3), the task is told 2 classes."""
    root = write_folder(tmp_path / "pets")
    dataset = build_dataset(cfg_for(root, "tasks=[segmentation]", "tasks.segmentation.num_classes=2"), "train")
    with pytest.raises(SampleError) as error:
        dataset[0]
    assert str(error.value) == (
        f"split 'train', sample 0 ({root}/train.csv line 2: {root}/masks/0001.png): task 'segmentation' predicts 2 "
        "classes, labels 0..1 (or 255, ignored), but the sample holds labels from 0 to 2: fix the data, or set "
        "tasks.segmentation.num_classes to the data's class count (see data.targets)")


def test_digit_scenes_are_named_by_scene_and_seed_and_unseen_identities_pass_outside_train():
    """Identity labels from num_classes up are people unseen in training: fine in val, an error in train."""
    tiny = ["data.dataset.scenes={train:8,val:8,test:8}", "data.dataset.image_size=32", "tasks=[identity]",
            "tasks.identity.num_classes=3"]
    cfg = compose_cfg(tiny)
    val = build_dataset(cfg, "val")
    assert max(int(val[i]["classification"]) for i in range(len(val))) >= 3
    train = build_dataset(cfg, "train")
    labels = [int(train.dataset[i]["classification"]) for i in range(len(train))]
    bad = next(i for i, label in enumerate(labels) if label >= 3)
    with pytest.raises(SampleError, match=rf"^split 'train', sample {bad} \(scene {bad}, seed 0\): task 'identity' "
                                          r"predicts 3 classes, labels 0..2 \(or -1, ignored\)"):
        train[bad]


def test_the_range_check_by_hand():
    segmentation = LabelRange("segmentation", 13, 255)
    labels = torch.zeros(4, 5, dtype=torch.int64)
    labels[0] = 255
    assert segmentation.problem(labels, "val", "it") is None
    labels[1, 1] = 13
    assert segmentation.problem(labels, "val", "it").startswith(
        "task 'segmentation' predicts 13 classes, labels 0..12 (or 255, ignored), but it holds labels from 0 to 13")
    assert LabelRange("count", 7).problem(torch.tensor(-1), "train", "it").endswith(
        "it holds labels from -1 to -1: fix the data, or set tasks.count.num_classes to the data's class count "
        "(see data.targets)")
    identity = LabelRange("identity", 3, -1, unseen=True)
    assert identity.problem(torch.tensor([0, 7, -1]), "val", "it") is None
    assert "predicts 3 classes" in identity.problem(torch.tensor([0, 7, -1]), "train", "it")
    assert identity.problem(torch.tensor([-2, 7]), "test", "it").startswith(
        "task 'identity' takes labels from 0 up (or -1, ignored) (from 3 up: classes unseen in training), but it "
        "holds labels from -2 to 7")


@pytest.mark.parametrize("ignore", [None, -1, -3, 0, 2, 3, 255])
def test_fits_agrees_with_a_plain_reference(ignore):
    """The one-min/max shortcuts (ignore value next to the range or not) against a per-label test."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        labels = torch.randint(-4, 9, (int(torch.randint(0, 6, (), generator=generator)),), generator=generator)
        for top in (None, 3):
            expected = all((0 <= v and (top is None or v < top)) or v == ignore for v in labels.tolist())
            assert fits(labels, top, ignore) == expected, (labels, top)


def test_the_message_survives_a_worker_process():
    """torch re-raises a worker's exception as type(e)("Caught ... Original Traceback ..."): cut back to the line."""
    wrapped = ("Caught SampleError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nmtl_cli.data.checks.SampleError: split \'val\', sample 2: bad\n')
    assert str(SampleError(wrapped)) == "split 'val', sample 2: bad"
    assert str(SampleError("Caught nothing")) == "Caught nothing"
