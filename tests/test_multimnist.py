"""MultiMNIST from MNIST idx files written here in the real format (big-endian headers, magic 2051 / 2049), in the
layout torchvision reads ({root}/MNIST/raw/), checked sample by sample against an independent recomputation of the
release's recipe (slices of a 36x36 canvas, scipy's byte scaling, PIL's nearest resize)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_cli.build import build_dataset
from mtl_cli.errors import UserError
from test_cli import ok, run_dirs
from test_configs import compose_cfg

TRAIN_LABELS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
TEST_LABELS = [7, 0, 8, 2, 8, 1]
VAL_SIZE = 4
SMALL = [f"data.dataset.val_size={VAL_SIZE}"]


def digits(count: int, seed: int) -> np.ndarray:
    """Digit-like uint8 [count, 28, 28]: ink in a random block of the middle, black borders, peak 255 (as MNIST)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((count, 28, 28), dtype=np.uint8)
    for k in range(count):
        top, left = rng.integers(3, 9, size=2)
        out[k, top: top + 16, left: left + 14] = rng.integers(0, 256, size=(16, 14)) * (rng.random((16, 14)) < 0.5)
        out[k, top + 8, left + 7] = 255
    return out


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    files = {"train": (digits(len(TRAIN_LABELS), 1), np.array(TRAIN_LABELS)),
             "t10k": (digits(len(TEST_LABELS), 2), np.array(TEST_LABELS))}
    for stem, (images, labels) in files.items():
        write_idx(raw / f"{stem}-images-idx3-ubyte", 2051, images)
        write_idx(raw / f"{stem}-labels-idx1-ubyte", 2049, labels)
    return files


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mnist")
    return root, write_mnist(root)


def dataset(root: Path, split: str, *overrides: str):
    return build_dataset(compose_cfg(["data=multimnist", f"data.root={root}", *SMALL, *overrides]), split)


def recipe(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sener and Koltun's recipe, written independently of the module: the release's slices, then
    scipy.misc.imresize(interp='nearest'): byte scaling by the canvas min/max, PIL's NEAREST resize."""
    canvas = np.zeros((36, 36))
    canvas[0:28, 0:28] = left
    canvas[6:34, 6:34] = right
    canvas[6:28, 6:28] = np.maximum(left[6:28, 6:28], right[0:22, 0:22])
    low, high = canvas.min(), canvas.max()
    scaled = ((canvas - low) * (255.0 / (high - low)) + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(scaled).resize((28, 28), Image.NEAREST))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_sample_is_the_recipe_applied_to_its_two_source_digits(mnist, split):
    root, files = mnist
    images, labels = files["t10k" if split == "test" else "train"]
    data = dataset(root, split)
    assert len(data) == {"train": len(TRAIN_LABELS) - VAL_SIZE, "val": VAL_SIZE, "test": len(TEST_LABELS)}[split]
    for i in range(len(data)):
        sample = data[i]
        left, right = data.sources(i)
        assert set(sample) == {"image", "classification", "right"}
        assert sample["classification"].dtype == sample["right"].dtype == torch.int64
        assert sample["classification"].shape == ()
        assert (int(sample["classification"]), int(sample["right"])) == (labels[left], labels[right])
        image = sample["image"]
        assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (3, 28, 28)
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        expected = recipe(images[left], images[right])
        np.testing.assert_array_equal((image[0].numpy() * 255).round().astype(np.uint8), expected)


def test_splits_are_disjoint_and_partners_come_from_the_same_split(mnist):
    root, _ = mnist
    pools = {split: dataset(root, split) for split in ("train", "val", "test")}
    left = {split: {d.sources(i)[0] for i in range(len(d))} for split, d in pools.items()}
    right = {split: {d.sources(i)[1] for i in range(len(d))} for split, d in pools.items()}
    assert left["train"].isdisjoint(left["val"]) and left["train"] | left["val"] == set(range(len(TRAIN_LABELS)))
    assert left["test"] == set(range(len(TEST_LABELS)))
    assert all(right[split] <= left[split] for split in pools)
    # the held-out digits do not depend on the seed, the pairing does
    other = dataset(root, "val", "data.dataset.seed=7")
    assert {other.sources(i)[0] for i in range(len(other))} == left["val"]


def test_two_builds_are_identical_and_the_seed_changes_the_pairing(mnist):
    root, _ = mnist
    first, second = dataset(root, "train"), dataset(root, "train")
    for i in range(len(first)):
        assert first.sources(i) == second.sources(i)
        assert all(torch.equal(a, b) for a, b in zip(first[i].values(), second[i].values()))
    seeds = [dataset(root, "train", f"data.dataset.seed={seed}") for seed in range(4)]
    assert len({tuple(d.partners.tolist()) for d in seeds}) > 1


def test_jitter_moves_digits_within_the_canvas_deterministically(mnist):
    root, _ = mnist
    plain = dataset(root, "test")
    moved = [dataset(root, "test", "data.dataset.jitter=3") for _ in range(2)]
    assert np.array_equal(moved[0].corners, moved[1].corners)
    assert moved[0].corners.min() >= 0 and moved[0].corners.max() <= 36 - 28
    assert np.array_equal(moved[0].partners, plain.partners)  # the jitter is drawn after the pairing
    assert any(not torch.equal(plain[i]["image"], moved[0][i]["image"]) for i in range(len(plain)))


def test_missing_root_names_the_layout_the_url_and_download(tmp_path):
    with pytest.raises(UserError) as error:
        dataset(tmp_path / "nowhere", "train")
    message = str(error.value)
    assert "MNIST/raw" in message and "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "https://" in message and "data.download=true" in message


def test_gzipped_files_get_a_hint(mnist, tmp_path):
    root, _ = mnist
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (root / "MNIST" / "raw").iterdir():
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(UserError, match="gunzip"):
        dataset(tmp_path, "train")


def test_a_corrupt_idx_file_names_itself(mnist, tmp_path):
    root, _ = mnist
    shutil.copytree(root / "MNIST", tmp_path / "MNIST")
    bad = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        dataset(tmp_path, "test")
    bad.write_bytes(b"\x00\x00\x08\x01" + bad.read_bytes()[4:])  # a labels header on an images file
    with pytest.raises(UserError, match="not an MNIST idx file"):
        dataset(tmp_path, "test")


def test_val_size_must_leave_training_digits(mnist):
    root, _ = mnist
    with pytest.raises(UserError, match="val_size"):
        dataset(root, "train", f"data.dataset.val_size={len(TRAIN_LABELS)}")


def test_mtl_train_learns_both_digits(mnist, mtl_main, tmp_path):
    root, _ = mnist
    ok(mtl_main("train", "data=multimnist", f"data.root={root}", *SMALL, "tasks=[classification,right]",
                "backbone=small_cnn", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                "trainer.limit_val_batches=2", "data.batch_size=2", "trainer.progress=plain", "logger=console"))
    (run_dir,) = run_dirs(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]
    assert set(metrics) == {"classification", "right"}
    assert all(0.0 <= metrics[task]["accuracy"] <= 1.0 for task in metrics)
