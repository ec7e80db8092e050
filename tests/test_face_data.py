"""CelebA and LFW through torchvision, on tiny fixtures written in the releases' own formats: every sample checked
through the data config against what was written, the identity convention (train's people 0..N-1, unseen people
N, N+1, ...), the missing-data messages, bad files, and one tiny `mtl train` per dataset."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_cli import ok, run_dirs
from test_configs import compose_cfg

from mtl_cli.build import adopt_facts, build_dataset, build_model, build_tasks, resolve_data
from mtl_cli.data.collate import collate
from mtl_cli.data.files import BadSample
from mtl_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread

TINY_RUN = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
            "data.batch_size=2", "backbone=small_cnn", "trainer.progress=plain"]

# ------------------------------------------------------------------------------------------------ CelebA fixture

ATTRIBUTE_NAMES = [  # list_attr_celeba.txt's header line, in its order
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young"]
LANDMARK_NAMES = ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
                  "rightmouth_y")
CELEBA_W, CELEBA_H = 24, 30  # the release's faces are 178x218; the fixture keeps about their aspect
# file -> (partition, identity, colour); train's people 2880 and 2937 become 0 and 1, the unseen 4153 and 8692 2, 3
CELEBA = {"000001.jpg": (0, 2880, (200, 40, 40)), "000002.jpg": (0, 2937, (40, 200, 40)),
          "000003.jpg": (0, 2880, (40, 40, 200)), "000004.jpg": (1, 8692, (200, 200, 40)),
          "000005.jpg": (1, 4153, (40, 200, 200)), "000006.jpg": (2, 8692, (200, 40, 200))}
CELEBA_LABELS = {2880: 0, 2937: 1, 4153: 2, 8692: 3}


def celeba_fixture(root: Path) -> dict[str, dict]:
    """{root}/celeba as released (the text files' header lines and column spacing), with 24x30 faces; returns
    what each file holds."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth, attr, marks, boxes, parts, ids = {}, [], [], [], [], []
    for k, (name, (partition, identity, colour)) in enumerate(CELEBA.items()):
        Image.new("RGB", (CELEBA_W, CELEBA_H), colour).save(folder / "img_align_celeba" / name, quality=95)
        attributes = rng.choice([-1, 1], size=40)
        points = np.array([[8, 12], [16, 12], [12, 17], [9, 23], [15, 23]]) + [k % 3, k % 2]
        truth[name] = {"attributes": (attributes + 1) // 2, "points": points, "identity": identity}
        attr.append(f"{name} " + " ".join(f"{a:2d}" for a in attributes))  # "000001.jpg -1  1  1 -1 ..."
        flat = points.flatten()
        marks.append(f"{name} {flat[0]}" + "".join(f"{v:5d}" for v in flat[1:]))  # "000001.jpg 69  109  106 ..."
        boxes.append(f"{name}{95 + k:6d}{71:4d}{226:4d}{313:4d}")  # "000001.jpg    95  71 226 313"
        parts.append(f"{name} {partition}")
        ids.append(f"{name} {identity}")
    n = len(CELEBA)
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(ATTRIBUTE_NAMES) + " \n" + "\n".join(attr) + "\n")
    (folder / "list_landmarks_align_celeba.txt").write_text(f"{n}\n{LANDMARK_NAMES}\n" + "\n".join(marks) + "\n")
    (folder / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n" + "\n".join(boxes) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    (folder / "identity_CelebA.txt").write_text("\n".join(ids) + "\n")
    return truth


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("celeba_root")
    return root, celeba_fixture(root)


def celeba_cfg(root: Path, *overrides: str):
    return compose_cfg(["data=celeba", f"data.root={root}", "tasks=[attributes,landmarks,identity]", *overrides])


def test_celeba_samples_hold_what_the_files_say(celeba):
    root, truth = celeba
    cfg = celeba_cfg(root)
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        dataset = build_dataset(cfg, split)
        names = [name for name, (partition, _, _) in CELEBA.items() if partition == code]
        assert len(dataset) == len(names)
        for sample, name in zip((dataset[i] for i in range(len(dataset))), names):
            assert set(sample) == {"image", "attributes", "landmarks", "identity"}
            image = sample["image"]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and type(image) is torch.Tensor
            colour = torch.tensor(CELEBA[name][2], dtype=torch.float32) / 255
            torch.testing.assert_close(image.mean((1, 2)), colour, atol=0.03, rtol=0)  # the right file
            assert sample["attributes"].dtype == torch.float32
            assert sample["attributes"].tolist() == truth[name]["attributes"].tolist()
            # pixel (x, y) of the 24x30 face, resized to 64x64, divided by 64: x / 24, y / 30
            expected = torch.tensor(truth[name]["points"] / [CELEBA_W, CELEBA_H], dtype=torch.float32)
            assert sample["landmarks"].shape == (5, 2) and sample["landmarks"].dtype == torch.float32
            torch.testing.assert_close(sample["landmarks"], expected, atol=1e-5, rtol=0)
            assert sample["identity"].dtype == torch.int64 and sample["identity"].shape == ()
            assert int(sample["identity"]) == CELEBA_LABELS[truth[name]["identity"]]
    assert build_dataset(cfg, "train").attribute_names == ATTRIBUTE_NAMES  # the header's trailing space dropped


def test_celeba_identity_count_comes_from_the_files_and_fits_the_first_batch(celeba):
    root, _ = celeba
    cfg = celeba_cfg(root)
    train = build_dataset(cfg, "train")
    assert train.facts == {"targets": {"identity": {"num_classes": 2}}}  # 2880 and 2937
    cfg = adopt_facts(cfg, train)
    assert cfg.tasks.identity.num_classes == 2
    tasks = build_tasks(cfg)
    batch = collate([train[i] for i in range(len(train))])
    for task in tasks.values():
        task.check_targets(batch)


def test_celeba_flip_mirrors_the_image_and_its_points(celeba):
    root, truth = celeba
    sample = build_dataset(celeba_cfg(root, "data.hflip=1.0"), "train")[0]
    points = truth["000001.jpg"]["points"] / [CELEBA_W, CELEBA_H]
    # torchvision flips a point to W - 1 - x (pixels of the 64-wide image); the points keep their order
    expected = np.stack([1 - points[:, 0] - 1 / 64, points[:, 1]], 1)
    torch.testing.assert_close(sample["landmarks"], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)


def test_celeba_missing_files_are_named_with_the_layout_and_the_url(tmp_path, celeba):
    with pytest.raises(UserError) as error:
        build_dataset(celeba_cfg(tmp_path / "nowhere"), "train")
    message = str(error.value)
    for part in ("img_align_celeba/", "list_attr_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt",
                 "list_landmarks_align_celeba.txt", "list_bbox_celeba.txt", "mmlab.ie.cuhk.edu.hk",
                 "data.download=true", "{root}/celeba/"):
        assert part in message, part
    root, _ = celeba
    partial = tmp_path / "partial"
    (partial / "celeba").mkdir(parents=True)
    (partial / "celeba" / "img_align_celeba").symlink_to(root / "celeba" / "img_align_celeba")
    (partial / "celeba" / "identity_CelebA.txt").write_text("000001.jpg 1\n")
    with pytest.raises(UserError, match=r"lacks list_attr_celeba.txt, list_landmarks_align_celeba.txt, "
                                        r"list_eval_partition.txt, list_bbox_celeba.txt\."):
        build_dataset(celeba_cfg(partial), "train")
    with pytest.raises(UserError, match="unknown split 'valid'"):
        build_dataset(celeba_cfg(root), "valid")


def test_a_corrupt_celeba_image_names_its_file_or_is_skipped_with_a_warning(tmp_path, caplog):
    celeba_fixture(tmp_path)
    bad = tmp_path / "celeba" / "img_align_celeba" / "000002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadSample, match="000002.jpg"):
        build_dataset(celeba_cfg(tmp_path), "train")[1]
    skipping = build_dataset(celeba_cfg(tmp_path, "data.skip_bad=true"), "train")
    with caplog.at_level(logging.WARNING, logger="mtl"):
        assert skipping[1] is None and skipping[0] is not None
    assert "000002.jpg" in caplog.text


def test_mtl_train_on_celeba_learns_attributes_landmarks_and_identity(mtl_main, tmp_path, celeba):
    root, _ = celeba
    ok(mtl_main("train", "data=celeba", f"data.root={root}", "tasks=[attributes,landmarks,identity]", *TINY_RUN))
    (run_dir,) = run_dirs(tmp_path / "outputs")
    final = json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]
    assert set(final) == {"attributes", "landmarks", "identity"}
    assert math.isfinite(final["attributes"]["mean_acc"]) and math.isfinite(final["landmarks"]["nme"])
    saved = OmegaConf.load(run_dir / "config.yaml")  # the count of the files, kept for mtl eval and resume
    assert saved.data.targets.identity.num_classes == saved.tasks.identity.num_classes == 2


# --------------------------------------------------------------------------------------------------- LFW fixture

LFW_NAMES = ["Aaron_Peirsol", "Abdullah_Gul", "Ann_Veneman", "Bill_Gates", "Colin_Powell", "Zico"]  # lfw-names order
LFW_TRAIN = {"Aaron_Peirsol": 2, "Abdullah_Gul": 1, "Zico": 1}  # peopleDevTrain.txt: name -> images
LFW_TEST = {"Bill_Gates": 2, "Ann_Veneman": 1}  # peopleDevTest.txt (not in train, as in LFW)
# train's people by lfw-names order 0..2, then the others: Ann_Veneman 3, Bill_Gates 4, Colin_Powell 5
LFW_LABELS = {"Aaron_Peirsol": 0, "Abdullah_Gul": 1, "Zico": 2, "Ann_Veneman": 3, "Bill_Gates": 4}


def lfw_colour(person: int, number: int) -> tuple[int, int, int]:
    """The colour of image `number` of the `person`-th person written: each image has its own."""
    return 40 * person + 20, 10 * number, 200 - 30 * person


def lfw_fixture(root: Path) -> None:
    """{root}/lfw-py as torchvision expects it: deep-funneled folders, View 1's people lists, lfw-names.txt, and
    View 1's pair lists (in their format; not read)."""
    folder = root / "lfw-py"
    for k, (name, count) in enumerate({**LFW_TRAIN, **LFW_TEST}.items()):
        (folder / "lfw-deepfunneled" / name).mkdir(parents=True)
        for number in range(1, count + 1):
            colour = lfw_colour(k, number)
            Image.new("RGB", (32, 32), colour).save(folder / "lfw-deepfunneled" / name / f"{name}_{number:04d}.jpg")
    for file, people in (("peopleDevTrain.txt", LFW_TRAIN), ("peopleDevTest.txt", LFW_TEST)):
        (folder / file).write_text(f"{len(people)}\n" + "".join(f"{name}\t{n}\n" for name, n in people.items()))
    counts = {**LFW_TRAIN, **LFW_TEST, "Colin_Powell": 3}
    (folder / "lfw-names.txt").write_text("".join(f"{name}\t{counts[name]}\n" for name in LFW_NAMES))
    (folder / "pairsDevTrain.txt").write_text("1\nAaron_Peirsol\t1\t2\nAbdullah_Gul\t1\tZico\t1\n")
    (folder / "pairsDevTest.txt").write_text("1\nBill_Gates\t1\t2\nAnn_Veneman\t1\tBill_Gates\t2\n")


@pytest.fixture(scope="module")
def lfw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lfw_root")
    lfw_fixture(root)
    return root


def lfw_cfg(root: Path, *overrides: str):
    return compose_cfg(["data=lfw", f"data.root={root}", "tasks=[identity]", *overrides])


def test_lfw_samples_hold_the_people_of_view_1_with_unseen_people_after_train(lfw):
    cfg = lfw_cfg(lfw, "data.dataset.pairs=false")
    for split, people in (("train", LFW_TRAIN), ("val", LFW_TEST), ("test", LFW_TEST)):
        dataset = build_dataset(cfg, split)
        expected = [LFW_LABELS[name] for name, n in people.items() for _ in range(n)]
        samples = [dataset[i] for i in range(len(dataset))]
        assert [int(s["identity"]) for s in samples] == expected
        for sample in samples:
            assert set(sample) == {"image", "identity"} and sample["identity"].dtype == torch.int64
            assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
            assert 0 <= sample["image"].min() and sample["image"].max() <= 1
    assert build_dataset(cfg, "val").facts == {"targets": {"identity": {"num_classes": 3}}}  # every split says N
    first = build_dataset(lfw_cfg(lfw, "data.crop=32", "data.dataset.pairs=false"), "val")[0]["image"]
    torch.testing.assert_close(first.mean((1, 2)), torch.tensor(lfw_colour(3, 1)) / 255, atol=0.03, rtol=0)


def test_lfw_val_is_the_listed_pairs_image_after_image(lfw):
    """pairsDevTest.txt (written by lfw_fixture): Bill_Gates 1 2 (same person), Ann_Veneman 1 Bill_Gates 2."""
    cfg = lfw_cfg(lfw, "data.crop=32")
    assert cfg.tasks.identity.metrics.verification.pairs == "consecutive"
    for split in ("val", "test"):
        samples = [build_dataset(cfg, split)[i] for i in range(4)]
        assert len(build_dataset(cfg, split)) == 4
        assert [int(s["identity"]) for s in samples] == [LFW_LABELS[n] for n in
                                                         ("Bill_Gates", "Bill_Gates", "Ann_Veneman", "Bill_Gates")]
        colours = [lfw_colour(3, 1), lfw_colour(3, 2), lfw_colour(4, 1), lfw_colour(3, 2)]  # (person k, image n)
        for sample, colour in zip(samples, colours):
            torch.testing.assert_close(sample["image"].mean((1, 2)), torch.tensor(colour) / 255, atol=0.03, rtol=0)
    assert [int(build_dataset(cfg, "train")[i]["identity"]) for i in range(4)] == [0, 0, 1, 2]  # train: people


def test_lfw_missing_files_and_download_are_explained(tmp_path, lfw):
    with pytest.raises(UserError) as error:
        build_dataset(lfw_cfg(tmp_path), "train")
    for part in ("lfw-deepfunneled/", "peopleDevTrain.txt", "peopleDevTest.txt", "lfw-names.txt",
                 "vis-www.cs.umass.edu/lfw", "{root}/lfw-py/"):
        assert part in str(error.value), part
    with pytest.raises(UserError, match="lfw_funneled/"):
        build_dataset(lfw_cfg(lfw, "data.dataset.image_set=funneled"), "train")
    with pytest.raises(UserError, match="no longer downloads"):
        build_dataset(lfw_cfg(lfw, "data.download=true"), "train")


def test_mtl_train_on_lfw_learns_identities_and_verifies_unseen_people(mtl_main, tmp_path, lfw):
    ok(mtl_main("train", "data=lfw", f"data.root={lfw}", "tasks=[identity]", *TINY_RUN))  # in tmp_path
    (run_dir,) = run_dirs(tmp_path / "outputs")
    record = json.loads((run_dir / "metrics.json").read_text())
    final = record["final"]["metrics"]["identity"]
    assert math.isfinite(final["verif_auc"])  # pairs of the val split's unseen people
    assert final["id_acc"] is None  # nobody of val was trained: nothing to identify (NaN, written as null)
    assert "final.metrics.identity.id_acc" in record["nonfinite"]



def test_the_celeba_preset_composes_and_runs_a_step(celeba):
    root, _ = celeba
    cfg = compose_cfg(["experiment=celeba_attributes", f"data.root={root}"], hydra=True)
    assert cfg.hydra.runtime.choices["data"] == "celeba" and cfg.name == "celeba_attributes"
    assert list(cfg.tasks) == ["attributes", "landmarks"]
    assert cfg.backbone.name == "resnet18" and cfg.backbone.weights == "IMAGENET1K_V1"
    assert cfg.scheduler.T_max == cfg.trainer.max_epochs and cfg.trainer.monitor == "val/attributes/mean_acc"
    cfg = compose_cfg(["experiment=celeba_attributes", f"data.root={root}", "backbone.weights=null",  # no download
                       "tasks=[attributes,landmarks,identity]"])
    dataset = build_dataset(cfg, "train")
    tasks = build_tasks(adopt_facts(cfg, dataset))
    batch = collate([dataset[i] for i in range(2)])
    outputs = build_model(cfg, tasks)(batch["image"])
    losses = {name: task.loss(outputs[name], task.target_of(batch)) for name, task in tasks.items()}
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values()), losses


def test_celeba_and_lfw_serve_as_members_of_data_multi(celeba, lfw):
    """The data YAMLs interpolate relatively (${..root}), so that a member reads its own root and sizes."""
    cfg = compose_cfg(["data=multi",  # the README's form
                       "+data@data.members.faces=celeba", f"data.members.faces.root={celeba[0]}",
                       "+data@data.members.people=lfw", f"data.members.people.root={lfw}",
                       "data.members.people.image_size=[32,32]",
                       "+data.tasks={faces: [attributes, landmarks], people: [identity]}",
                       "tasks=[attributes,landmarks,identity]"])
    dataset = build_dataset(resolve_data(cfg), "train")
    assert len(dataset) == 3 + 4
    assert set(dataset[0]) == {"image", "attributes", "landmarks"} and dataset[0]["image"].shape == (3, 64, 64)
    assert set(dataset[3]) == {"image", "identity"} and dataset[3]["image"].shape == (3, 32, 32)
    # the identity count the lfw member counts in its train split reaches the task through data=multi's facts
    count = dataset.members[1].facts["targets"]["identity"]["num_classes"]
    cfg = adopt_facts(cfg, dataset)
    assert cfg.data.members.people.targets.identity.num_classes == cfg.data.targets.identity.num_classes == count


def test_a_mixed_run_of_celeba_and_lfw_trains_every_task_and_reports_delta_m(mtl_main, tmp_path, celeba, lfw):
    """data=multi with two real datasets through mtl train, in the README's form: each task from its own dataset,
    per-task metrics, and delta_m against baselines."""
    result = ok(mtl_main("train", "data=multi", "+data@data.members.faces=celeba",
                         f"data.members.faces.root={celeba[0]}", "+data@data.members.people=lfw",
                         f"data.members.people.root={lfw}", "data.members.people.image_size=[32,32]",
                         "+data.tasks={faces: [attributes, landmarks], people: [identity]}",
                         "tasks=[attributes,landmarks,identity]", "data.sampling=temperature",
                         "baselines={attributes: {mean_acc: 0.5}, landmarks: {nme: 1.0}}",
                         *[arg for arg in TINY_RUN if "limit_val" not in arg]))  # validate every member
    (run_dir,) = run_dirs(tmp_path / "outputs")
    report = json.loads((run_dir / "metrics.json").read_text())
    final = report["final"]["metrics"]
    assert set(final) == {"attributes", "landmarks", "identity"}
    expected = 100 * ((final["attributes"]["mean_acc"] - 0.5) / 0.5 - (final["landmarks"]["nme"] - 1.0)) / 2
    assert report["final"]["delta_m"] == pytest.approx(expected, rel=1e-6)
    assert "delta_m % ↑" in result.out
    saved = OmegaConf.load(run_dir / "config.yaml")  # lfw's own identity count, not the YAML's placeholder
    assert saved.data.targets.identity.num_classes == len(LFW_TRAIN)
