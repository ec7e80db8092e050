"""k-fold cross-validation (`data.folds=k data.fold=i`, mtl_cli/data/folds.py): the held-out folds are disjoint and
cover the train split (embedded data, a folder dataset in the manifest format, each member of data=multi), read
with val's transforms; the facts (class maps) are the train split's for every fold; the test split is untouched;
bad values are one line; a tiny run trains on a fold and `mtl eval data.split=val` scores its held-out fold.

Samples are told apart by their image bytes, not by the fold's indices, so that coverage is checked on what the
loader would read."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from conftest import TINY_RUN
from test_bad_inputs import one_error
from test_cli import ok, run_dirs
from test_configs import compose_cfg
from test_multi import TINY_MULTI

from mtl_cli.build import adopt_facts, build_dataset, resolve_data
from mtl_cli.errors import UserError
from mtl_cli.schema import check_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["data.dataset.scenes={train:10,val:4,test:4}", "data.dataset.image_size=16"]
FLIP = "data.transforms.train=[{_target_:torchvision.transforms.v2.RandomHorizontalFlip,p:1.0}]"


def key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def images(dataset, flip: bool = False) -> list[str]:
    """The image of every sample, as a key; `flip` mirrors each back first."""
    return [key(s["image"].flip(-1) if flip else s["image"]) for s in map(dataset.__getitem__, range(len(dataset)))]


def check_partition(held_out: list[list[str]], trained: list[list[str]], whole: list[str]) -> None:
    """The held-out folds are disjoint and cover `whole`; each fold's training part is the rest."""
    assert all(held_out) and Counter(sum(held_out, [])) == Counter(whole)
    for val, train in zip(held_out, trained):
        assert Counter(val + train) == Counter(whole)
    assert max(map(len, held_out)) - min(map(len, held_out)) <= 1


def test_the_folds_of_the_embedded_data_partition_its_train_split_with_val_transforms_and_test_untouched():
    cfg = compose_cfg([*TINY, FLIP])
    whole, test = images(build_dataset(cfg, "train"), flip=True), images(build_dataset(cfg, "test"))
    held_out, trained = [], []
    cfg.data.folds = 3
    for fold in range(3):
        cfg.data.fold = fold
        held_out.append(images(build_dataset(cfg, "val")))  # val's transforms: as stored
        trained.append(images(build_dataset(cfg, "train"), flip=True))  # train's: every image mirrored
    check_partition(held_out, trained, whole)
    assert [len(v) for v in held_out] == [4, 3, 3]
    assert images(build_dataset(cfg, "test")) == test


def test_the_partition_is_drawn_from_fold_seed_not_from_the_run_seed():
    cfg = compose_cfg([*TINY, "data.folds=3"])

    def held_out(seed=0, fold_seed=0):
        cfg.seed, cfg.data.fold_seed = seed, fold_seed
        return build_dataset(cfg, "val").dataset.indices

    assert held_out(seed=7) == held_out() != held_out(fold_seed=1)


# ------------------------------------------------------------------------------------------------- data=folder

LABELS = ["cat", "dog", "cat", "dog", "bird", "cat", "dog"]  # bird: in one fold only


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder in the README's layout: images/ and a train.csv; no val.csv, which the folds never read."""
    root = tmp_path_factory.mktemp("folds") / "pets"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for i, label in enumerate(LABELS):
        Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_the_folds_of_a_folder_partition_its_train_manifest_and_every_fold_has_its_class_maps(folder):
    plain = compose_cfg(["data=folder", f"data.root={folder}", "data.image_size=[8,12]", "tasks=[classification]",
                         FLIP])
    train_split = build_dataset(plain, "train")
    whole = images(train_split, flip=True)
    assert train_split.facts["dataset"]["classes"] == {"classification": ["bird", "cat", "dog"]}
    held_out, trained, birds = [], [], 0
    for fold in range(3):
        cfg = copy.deepcopy(plain)
        cfg.data.folds, cfg.data.fold = 3, fold
        train = build_dataset(cfg, "train")
        cfg = adopt_facts(cfg, train)  # as mtl train does: the facts join the config the val fold is built with
        val = build_dataset(cfg, "val")
        assert train.facts == val.facts == train_split.facts  # the whole train split's: bird in every fold
        assert cfg.data.targets.classification.num_classes == 3
        held_out.append(images(val))
        trained.append(images(train, flip=True))
        birds += sum(int(val[i]["classification"]) == 0 for i in range(len(val)))
    check_partition(held_out, trained, whole)
    assert birds == 1  # one fold holds out the only bird: its training part has none, its class map has it
    with pytest.raises(UserError, match="no manifest for split 'val'"):  # without folds, val is val.csv
        build_dataset(plain, "val")


# -------------------------------------------------------------------------------------------------- data=multi


def test_data_multi_folds_each_member_on_its_own():
    def split_by_member(dataset) -> dict[str, list[str]]:
        keys = images(dataset)
        return {name: keys[dataset.offsets[m]:dataset.offsets[m + 1]] for m, name in enumerate(dataset.names)}

    cfg = resolve_data(compose_cfg(["experiment=digits_multi", *TINY_MULTI]))
    whole = split_by_member(build_dataset(cfg, "train"))
    held_out, trained = [], []
    cfg.data.folds = 3
    for fold in range(3):
        cfg.data.fold = fold
        held_out.append(split_by_member(build_dataset(cfg, "val")))
        trained.append(split_by_member(build_dataset(cfg, "train")))
    for member, keys in whole.items():
        check_partition([v[member] for v in held_out], [t[member] for t in trained], keys)
    assert [len(v["scenes"]) for v in held_out] == [8, 8, 8] and [len(v["counts"]) for v in held_out] == [6, 5, 5]
    cfg.data.members.scenes.folds = 3
    with pytest.raises(UserError, match=r"data.members.scenes.folds=3: with data=multi, data.folds folds every"):
        build_dataset(cfg, "val")


# ---------------------------------------------------------------------------------------- errors, a whole run


@pytest.mark.parametrize("overrides, expected", [
    (["data.folds=5", "data.fold=5"], "data.fold=5 is out of range for data.folds=5: use 0..4"),  # checked first
    (["data.folds=17"], "data.folds=17 leaves a fold empty: the train split has 16 sample(s)"),  # when it is read
])
def test_bad_fold_values_stop_the_run_with_one_clear_line(mtl_main, overrides, expected):
    assert expected in one_error(mtl_main("train", *TINY_RUN, *overrides), "train")


@pytest.mark.parametrize("folds, fold, expected", [
    (1, 0, "data.folds=1 is not valid: expected an integer of at least 2 or null"),
    ("3", 0, "data.folds='3' is not valid: expected an integer of at least 2 or null"),
    (3, -1, "data.fold=-1 is not valid: expected an integer of at least 0"),
    (None, 2, "data.fold=2 picks a fold of k-fold cross-validation, which data.folds=null turns off: give the "
              "number of folds too, e.g. data.folds=5"),
])
def test_the_schema_names_bad_fold_values(folds, fold, expected):
    cfg = OmegaConf.create({"data": {"folds": folds, "fold": fold, "fold_seed": 0}})
    with pytest.raises(UserError) as error:
        check_config(cfg)
    assert str(error.value) == expected


def test_a_run_on_a_fold_trains_and_eval_of_val_scores_its_held_out_fold(mtl_main, tmp_path):
    ok(mtl_main("train", *TINY_RUN, "data.folds=3", "data.fold=1"))
    (run_dir,) = run_dirs(tmp_path / "outputs")
    final = json.loads((run_dir / "metrics.json").read_text())["final"]["metrics"]
    assert OmegaConf.load(run_dir / "config.yaml").data.fold == 1
    ok(mtl_main("eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", "data.split=val"))
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("eval.json")]
    for task, values in final.items():
        for metric, value in values.items():
            assert record["metrics"][task][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, metric)
