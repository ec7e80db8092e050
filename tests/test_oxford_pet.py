"""Oxford-IIIT Pet through torchvision, on a tiny fixture in the release's format: breed, species and the trimap
checked sample by sample through the data config, the trimap moving with the image, the val split held out of
trainval.txt, bad files and missing data, the species task, the preset, and one tiny `mtl train` of all three."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import ok, run_dirs
from test_configs import compose_cfg

from mtl_cli.build import build_dataset, build_model, build_tasks
from mtl_cli.data.collate import collate
from mtl_cli.data.files import BadSample
from mtl_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread

PET, BACKGROUND, BOUNDARY = (220, 30, 30), (30, 30, 220), (30, 220, 30)  # the colour of each trimap value 1, 2, 3
# list-file lines "Image CLASS-ID SPECIES BREED-ID" (ids from 1; species 1 cat, 2 dog), sizes (W, H) <= 32x48
TRAINVAL = [("Abyssinian_100 1 1 1", (32, 24)), ("Abyssinian_101 1 1 1", (24, 32)),
            ("american_bulldog_100 2 2 1", (28, 20)), ("american_bulldog_101 2 2 1", (32, 40)),
            ("basset_hound_126 4 2 3", (20, 28)), ("Bengal_1 6 1 2", (30, 30))]
TEST = [("Abyssinian_201 1 1 1", (26, 22)), ("beagle_1 5 2 4", (32, 48)), ("Birman_1 7 1 3", (22, 26))]
VAL_EVERY = 3  # val: the 3rd and 6th lines of trainval.txt; train: the other four
SPLITS = {"train": [TRAINVAL[i] for i in (0, 1, 3, 4)], "val": [TRAINVAL[2], TRAINVAL[5]], "test": TEST}
TINY_RUN = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
            "data.batch_size=2", "backbone=small_cnn", "trainer.progress=plain"]


def trimap_of(size: tuple[int, int], k: int) -> np.ndarray:
    """A trimap [H, W] as released: 2 background, 1 the pet (a box off the centre), 3 a one-pixel band around it."""
    w, h = size
    trimap = np.full((h, w), 2, np.uint8)
    top, left = 3 + k % 3, 2 + k % 4
    trimap[top - 1:h - 5 + 1, left - 1:w // 2 + 3 + 1] = 3
    trimap[top:h - 5, left:w // 2 + 3] = 1
    return trimap


def pet_fixture(root: Path) -> dict[str, np.ndarray]:
    """{root}/oxford-iiit-pet as released: images/*.jpg, annotations/{list.txt (with its '#' header),
    trainval.txt, test.txt (without one, as torchvision reads them), trimaps/*.png}; returns the trimaps."""
    folder = root / "oxford-iiit-pet"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations" / "trimaps").mkdir(parents=True)
    trimaps = {}
    for k, (line, size) in enumerate(TRAINVAL + TEST):
        name = line.split()[0]
        trimaps[name] = trimap_of(size, k)
        colours = np.array([(0, 0, 0), PET, BACKGROUND, BOUNDARY], np.uint8)
        Image.fromarray(colours[trimaps[name]]).save(folder / "images" / f"{name}.jpg", quality=95)
        Image.fromarray(trimaps[name], mode="L").save(folder / "annotations" / "trimaps" / f"{name}.png")
    header = ("#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n#BREED ID: 1-25:Cat "
              "1:12:Dog\n#All images with 1st letter as captial are cat images\n#images with small first letter are "
              "dog images\n")
    lines = sorted(line for line, _ in TRAINVAL + TEST)
    (folder / "annotations" / "list.txt").write_text(header + "".join(f"{line}\n" for line in lines))
    (folder / "annotations" / "trainval.txt").write_text("".join(f"{line}\n" for line, _ in TRAINVAL))
    (folder / "annotations" / "test.txt").write_text("".join(f"{line}\n" for line, _ in TEST))
    return trimaps


@pytest.fixture(scope="module")
def pet(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pet_root")
    return root, pet_fixture(root)


def pet_cfg(root: Path, *overrides: str):
    return compose_cfg(["data=oxford_pet", f"data.root={root}", "tasks=[classification,species,segmentation]",
                        f"data.dataset.val_every={VAL_EVERY}", *overrides])


def colour_agrees(image: torch.Tensor, mask: torch.Tensor) -> float:
    """The fraction of pet and background pixels whose dominant colour is their class's (red pet, blue
    background): the mask moved with the image."""
    dominant = image.argmax(0)
    pet, background = mask == 1, mask == 0
    return float(((dominant == 0) & pet).sum() + ((dominant == 2) & background).sum()) / float((pet | background).sum())


def test_pet_samples_hold_breed_species_and_trimap_as_written(pet):
    root, trimaps = pet
    cfg = pet_cfg(root, "data.transforms=null")  # the files as they are, before any resize
    for split, rows in SPLITS.items():
        dataset = build_dataset(cfg, split)
        assert len(dataset) == len(rows)
        for k, (line, (w, h)) in enumerate(rows):
            name, class_id, species, _ = line.split()
            sample = dataset[k]
            assert set(sample) == {"image", "classification", "species", "segmentation"}
            assert sample["classification"].dtype == sample["species"].dtype == torch.int64
            assert (int(sample["classification"]), int(sample["species"])) == (int(class_id) - 1, int(species) - 1)
            assert sample["image"].shape == (3, h, w) and sample["image"].dtype == torch.float32
            expected = np.select([trimaps[name] == 1, trimaps[name] == 2], [1, 0], 255)  # boundary -> ignored
            assert sample["segmentation"].dtype == torch.int64 and type(sample["segmentation"]) is torch.Tensor
            assert sample["segmentation"].tolist() == expected.tolist()
            assert colour_agrees(sample["image"], sample["segmentation"]) > 0.95
    names = build_dataset(cfg, "test")
    assert names.breed_names[0] == "Abyssinian" and names.species_names == ["Cat", "Dog"]


def test_pet_default_transforms_resize_and_flip_the_trimap_with_the_image(pet):
    root, _ = pet
    cfg = pet_cfg(root)
    for split in ("train", "val"):
        for sample in build_dataset(cfg, split):
            assert sample["image"].shape == (3, 224, 224) and sample["segmentation"].shape == (224, 224)
            assert set(sample["segmentation"].unique().tolist()) == {0, 1, 255}  # nearest: no new labels
            assert colour_agrees(sample["image"], sample["segmentation"]) > 0.95
    kept = build_dataset(pet_cfg(root, "data.transforms.train.1.p=0.0"), "train")[0]
    flipped = build_dataset(pet_cfg(root, "data.transforms.train.1.p=1.0"), "train")[0]
    assert torch.equal(flipped["segmentation"], kept["segmentation"].flip(-1))  # the pet box is off the centre
    assert not torch.equal(kept["segmentation"], kept["segmentation"].flip(-1))
    torch.testing.assert_close(flipped["image"], kept["image"].flip(-1))


def test_pet_val_is_held_out_of_trainval_and_must_not_be_empty(pet):
    root, _ = pet
    train, val = (build_dataset(pet_cfg(root, "data.dataset.val_every=2"), split) for split in ("train", "val"))
    assert [p.stem for p in val.images] == ["Abyssinian_101", "american_bulldog_101", "Bengal_1"]
    assert sorted(p.stem for p in train.images + val.images) == sorted(line.split()[0] for line, _ in TRAINVAL)
    with pytest.raises(UserError, match="val_every"):
        build_dataset(pet_cfg(root, "data.dataset.val_every=10"), "val")  # 6 lines: no 10th
    with pytest.raises(UserError, match="val_every"):
        build_dataset(pet_cfg(root, "data.dataset.val_every=1"), "train")


def test_pet_missing_or_malformed_files_are_explained(tmp_path):
    with pytest.raises(UserError) as error:
        build_dataset(pet_cfg(tmp_path), "train")
    for part in ("images/", "annotations/trimaps/", "annotations/trainval.txt", "robots.ox.ac.uk/~vgg/data/pets",
                 "data.download=true", "{root}/oxford-iiit-pet/"):
        assert part in str(error.value), part
    pet_fixture(tmp_path)
    listed = tmp_path / "oxford-iiit-pet" / "annotations" / "trainval.txt"
    listed.write_text("#Image CLASS-ID SPECIES BREED ID\n" + listed.read_text())
    with pytest.raises(UserError, match="Image CLASS-ID SPECIES BREED-ID"):
        build_dataset(pet_cfg(tmp_path), "train")


def test_a_corrupt_pet_file_names_itself_or_is_skipped_with_a_warning(tmp_path, caplog):
    pet_fixture(tmp_path)
    folder = tmp_path / "oxford-iiit-pet"
    (folder / "images" / "Abyssinian_101.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "annotations" / "trimaps" / "basset_hound_126.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    train = build_dataset(pet_cfg(tmp_path), "train")
    with pytest.raises(BadSample, match="Abyssinian_101.jpg"):
        train[1]
    with pytest.raises(BadSample, match="basset_hound_126.png"):
        train[3]
    skipping = build_dataset(pet_cfg(tmp_path, "data.skip_bad=true"), "train")
    with caplog.at_level(logging.WARNING, logger="mtl"):
        assert skipping[1] is None and skipping[3] is None and skipping[0] is not None
    assert "Abyssinian_101.jpg" in caplog.text and "basset_hound_126.png" in caplog.text


def test_species_is_a_second_classification_task_on_its_own_target(pet):
    root, _ = pet
    tasks = build_tasks(pet_cfg(root))
    assert (tasks["species"].target, tasks["species"].num_classes) == ("species", 2)
    assert (tasks["classification"].target, tasks["classification"].num_classes) == ("classification", 37)
    assert (tasks["segmentation"].num_classes, tasks["segmentation"].ignore_index) == (2, 255)
    assert type(tasks["species"].loss) is type(tasks["classification"].loss)


def test_the_oxford_pet_preset_composes_and_runs_a_step(pet):
    root, _ = pet
    cfg = compose_cfg(["experiment=oxford_pet_mtl", f"data.root={root}", f"data.dataset.val_every={VAL_EVERY}"],
                      hydra=True)
    assert cfg.hydra.runtime.choices["data"] == "oxford_pet" and cfg.name == "oxford_pet_mtl"
    assert list(cfg.tasks) == ["classification", "species", "segmentation"]
    assert cfg.backbone.name == "resnet34" and cfg.backbone.weights == "IMAGENET1K_V1"
    assert cfg.scheduler.T_max == cfg.trainer.max_epochs
    cfg = compose_cfg(["experiment=oxford_pet_mtl", f"data.root={root}", f"data.dataset.val_every={VAL_EVERY}",
                       "backbone.weights=null", "data.image_size=[64,64]"])  # no download in tests
    tasks = build_tasks(cfg)
    dataset = build_dataset(cfg, "train")
    batch = collate([dataset[i] for i in range(2)])
    outputs = build_model(cfg, tasks)(batch["image"])
    losses = {name: task.loss(outputs[name], task.target_of(batch)) for name, task in tasks.items()}
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values())


def test_mtl_train_on_oxford_pet_learns_breed_species_and_segmentation(mtl_main, tmp_path, pet):
    root, _ = pet
    ok(mtl_main("train", "data=oxford_pet", f"data.root={root}", "tasks=[classification,species,segmentation]",
                f"data.dataset.val_every={VAL_EVERY}", "data.image_size=[64,64]", *TINY_RUN))  # in tmp_path
    (run_dir,) = run_dirs(tmp_path / "outputs")
    final = json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]
    assert set(final) == {"classification", "species", "segmentation"}
    assert all(math.isfinite(v) for values in final.values() for v in values.values())
