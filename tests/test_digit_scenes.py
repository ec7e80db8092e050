"""The embedded `digit_scenes` dataset: determinism, split separation, sample format, and the geometry of its
targets checked against a pinhole camera computed here by hand (rays through pixel centres, 60 degree field of
view, camera-frame x right / y up / z backwards, depth along the optical axis)."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torchvision import tv_tensors

from mtl_cli.data import digit_scenes
from mtl_cli.data.digit_scenes import DigitScenes, digit_indices, generate_scene, scenes_per_second
from mtl_cli.errors import UserError

KEYS = {"image", "segmentation", "depth", "normals", "classification", "landmarks", "multilabel", "count", "boxes",
        "labels"}
N_DIGITS = 1797
FLOOR_FAR = 15.0


@pytest.fixture(scope="module")
def scenes():
    """(dataset, index, raw scene) over splits, sizes and digit counts."""
    out = []
    for split, size, lo, hi, seed in [("train", 64, 1, 4, 0), ("val", 48, 3, 6, 5), ("test", 32, 1, 2, 9)]:
        ds = DigitScenes(split, image_size=size, scenes={split: 15}, min_digits=lo, max_digits=hi, seed=seed)
        out += [(ds, i, ds.scene(i)) for i in range(len(ds))]
    return out


def _assert_samples_equal(a, b):
    assert a.keys() == b.keys() == KEYS
    for k in KEYS:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _camera_rays(size):
    """Camera-frame ray (x, y, -1) through each pixel centre, [H, W] each, for a 60 degree field of view."""
    f = size / 2 / math.tan(math.radians(30))
    c = (np.arange(size) + 0.5 - size / 2) / f
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(-c[:, None], (size, size)), f


# --- determinism and caching ---------------------------------------------------------------------------------


def test_same_seed_same_samples_in_any_order_and_with_or_without_cache():
    kw = dict(image_size=40, scenes={"train": 6, "val": 2, "test": 2}, max_digits=5, seed=3)
    a, b, c = DigitScenes("train", **kw), DigitScenes("train", **kw), DigitScenes("train", cache=False, **kw)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    uncached = {i: c[i] for i in (4, 1, 5, 0, 3, 2)}
    for i, x in enumerate(forward):
        _assert_samples_equal(x, backward[i])
        _assert_samples_equal(x, uncached[i])
        _assert_samples_equal(x, a[i])  # from the cache
    assert a[-1]["image"].equal(forward[5]["image"])


def test_different_seed_scene_or_split_gives_different_scenes():
    kw = dict(image_size=32, scenes={"train": 3, "val": 3, "test": 3})
    base = DigitScenes("train", seed=0, **kw)
    other_seed = DigitScenes("train", seed=1, **kw)
    other_split = DigitScenes("val", seed=0, **kw)
    for i in range(3):
        assert not torch.equal(base[i]["image"], other_seed[i]["image"])
        assert not torch.equal(base[i]["image"], other_split[i]["image"])
        assert not torch.equal(base[i]["depth"], other_seed[i]["depth"])
    assert not torch.equal(base[0]["image"], base[1]["image"])


def test_cache_memoises_and_no_cache_regenerates(monkeypatch):
    calls = []
    real = digit_scenes.generate_scene

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(digit_scenes, "generate_scene", counting)
    cached = DigitScenes("test", image_size=32, scenes={"test": 4})
    cached[1], cached[1], cached[2], cached[1]
    assert len(calls) == 2
    calls.clear()
    uncached = DigitScenes("test", image_size=32, scenes={"test": 4}, cache=False)
    uncached[1], uncached[1]
    assert len(calls) == 2
    # A caller modifying a sample in place does not corrupt the cache.
    sample = cached[1]
    for key in ("image", "depth", "normals", "segmentation", "labels"):
        sample[key].zero_()
    assert cached[1]["image"].abs().sum() > 0 and cached[1]["normals"].abs().sum() > 0
    assert cached[1]["segmentation"].max() > 0 and cached[1]["depth"].max() > 0


def test_length_and_index_bounds():
    ds = DigitScenes("val", image_size=16, scenes={"val": 3})
    assert len(ds) == 3
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]
    assert len(DigitScenes("train")) == 2000 and len(DigitScenes("test")) == 500


# --- source digit splits -------------------------------------------------------------------------------------


def test_digit_indices_are_disjoint_cover_all_digits_and_are_stratified():
    parts = {s: digit_indices(s) for s in ("train", "val", "test")}
    target = load_digits().target
    sets = {s: set(p.tolist()) for s, p in parts.items()}
    assert all(len(sets[s]) == len(parts[s]) for s in parts)  # no duplicates
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(range(N_DIGITS))
    for s, frac in [("train", 0.6), ("val", 0.2), ("test", 0.2)]:
        assert abs(len(parts[s]) - frac * N_DIGITS) <= 10
        assert set(target[parts[s]].tolist()) == set(range(10))
    parts["train"][:] = 0  # a copy: the module's split is unchanged
    assert np.array_equal(digit_indices("train"), np.sort(digit_indices("train")))
    assert len(set(digit_indices("train").tolist())) == len(sets["train"])


def test_scenes_only_use_digits_of_their_split(scenes):
    target = load_digits().target
    used = {}
    for ds, _, s in scenes:
        allowed = set(digit_indices(ds.split).tolist())
        assert set(s["sources"].tolist()) <= allowed
        assert np.array_equal(target[s["sources"]], s["labels"])
        used.setdefault(ds.split, set()).update(s["sources"].tolist())
    assert not (used["train"] & used["val"]) and not (used["val"] & used["test"])


# --- sample format -------------------------------------------------------------------------------------------


def test_sample_dtypes_shapes_and_ranges(scenes):
    for ds, i, s in scenes:
        size = ds.image_size
        x = ds[i]
        assert set(x) == KEYS
        assert x["image"].dtype == torch.float32 and x["image"].shape == (3, size, size)
        assert 0 <= x["image"].min() and x["image"].max() <= 1 and x["image"].std() > 0.02
        assert x["segmentation"].dtype == torch.int64 and x["segmentation"].shape == (size, size)
        assert 0 <= x["segmentation"].min() and x["segmentation"].max() <= 10
        assert x["depth"].dtype == torch.float32 and x["depth"].shape == (1, size, size)
        assert torch.isfinite(x["depth"]).all() and x["depth"].min() == 0 and x["depth"].max() < 17
        assert x["normals"].dtype == torch.float32 and x["normals"].shape == (3, size, size)
        assert x["classification"].dtype == torch.int64 and x["classification"].shape == ()
        assert 0 <= x["classification"] <= 9
        assert x["landmarks"].dtype == torch.float32 and x["landmarks"].shape == (4, 2)
        assert 0 <= x["landmarks"].min() and x["landmarks"].max() <= 1
        assert x["multilabel"].dtype == torch.float32 and x["multilabel"].shape == (10,)
        assert set(x["multilabel"].unique().tolist()) <= {0.0, 1.0}
        assert x["count"].dtype == torch.int64 and x["count"].shape == ()
        assert ds.min_digits <= ds.max_digits and 1 <= x["count"] <= ds.max_digits
        boxes = x["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
        assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (size, size)
        assert boxes.shape == (int(x["count"]), 4)
        assert x["labels"].dtype == torch.int64 and x["labels"].shape == (int(x["count"]),)
        # The sample is the raw scene, widened to tensors.
        assert np.array_equal(x["image"].numpy(), s["image"]) and np.array_equal(x["labels"].numpy(), s["labels"])
        assert np.array_equal(x["segmentation"].numpy(), s["segmentation"])
        assert np.array_equal(x["normals"].numpy(), s["normals"])
        assert np.array_equal(x["landmarks"].numpy(), s["landmarks"])


def test_omegaconf_scenes_mapping_is_accepted():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"train": 5, "val": 2, "test": 2})
    ds = DigitScenes("val", image_size=16, scenes=cfg)
    assert len(ds) == 2 and ds[1]["image"].shape == (3, 16, 16)


# --- targets agree with each other ---------------------------------------------------------------------------


def test_segmentation_depth_normals_and_instances_agree(scenes):
    for _, _, s in scenes:
        seg, depth, normals, inst = s["segmentation"], s["depth"][0], s["normals"], s["instances"]
        valid = depth > 0
        nonzero = np.any(normals != 0, axis=0)
        assert np.array_equal(valid, nonzero)
        assert np.allclose(np.linalg.norm(normals[:, valid], axis=0), 1, atol=1e-5)
        assert np.array_equal(seg > 0, inst >= 0)  # a digit exactly where one is visible
        assert np.all(valid[seg > 0])
        assert valid.sum() < valid.size  # some sky
        assert (valid & (seg == 0)).any()  # some floor
        for k, label in enumerate(s["labels"]):
            assert np.all(seg[inst == k] == label + 1)


def test_boxes_tightly_contain_each_digits_visible_pixels(scenes):
    n_unique = 0
    for _, _, s in scenes:
        inst, seg, boxes, labels = s["instances"], s["segmentation"], s["boxes"], s["labels"]
        assert inst.max() == len(boxes) - 1
        for k, box in enumerate(boxes):
            rows, cols = np.nonzero(inst == k)
            assert rows.size >= 1
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        if len(set(labels.tolist())) == len(labels):  # classes unique: the segmentation alone gives the boxes
            n_unique += 1
            for box, label in zip(boxes, labels):
                rows, cols = np.nonzero(seg == label + 1)
                assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert n_unique >= 10


def test_classification_multilabel_and_count_agree_with_segmentation_and_depth(scenes):
    for ds, _, s in scenes:
        seg, depth = s["segmentation"], s["depth"][0]
        present = np.unique(seg[seg > 0]) - 1
        expected = np.zeros(10, np.float32)
        expected[present] = 1
        assert np.array_equal(s["multilabel"], expected)
        assert s["count"] == len(s["labels"]) == len(np.unique(s["instances"][s["instances"] >= 0]))
        assert s["count"] >= len(present)
        on_digit = np.flatnonzero(seg > 0)
        nearest = on_digit[np.argmin(depth.ravel()[on_digit])]
        assert s["classification"] == seg.ravel()[nearest] - 1


def test_landmarks_are_the_normalised_box_corners_of_the_nearest_digit(scenes):
    for ds, _, s in scenes:
        size, inst, depth = ds.image_size, s["instances"], s["depth"][0]
        on_digit = np.flatnonzero(inst >= 0)
        k = inst.ravel()[on_digit[np.argmin(depth.ravel()[on_digit])]]  # the digit of the nearest visible pixel
        assert s["labels"][k] == s["classification"]
        rows, cols = np.nonzero(inst == k)
        left, right = cols.min() / size, (cols.max() + 1) / size
        top, bottom = rows.min() / size, (rows.max() + 1) / size
        expected = [[left, top], [right, top], [right, bottom], [left, bottom]]  # TL, TR, BR, BL as (x, y)
        assert np.allclose(s["landmarks"], expected, atol=1e-6)


def test_digits_are_rarely_hidden_and_every_scene_has_one():
    images, labels = load_digits().images / 16.0, load_digits().target
    rng = np.random.default_rng(0)
    counts = [generate_scene(rng, 64, 4, images, labels)["count"] for _ in range(40)]
    assert min(counts) >= 1 and max(counts) <= 4
    assert np.mean(counts) >= 3.5
    ones = DigitScenes("train", image_size=16, scenes={"train": 20}, min_digits=1, max_digits=1)
    assert all(ones[i]["count"] == 1 for i in range(len(ones)))


# --- geometry against a hand computation ---------------------------------------------------------------------


def test_floor_normals_and_depth_match_the_pinhole_camera(scenes):
    for ds, _, s in scenes:
        size = ds.image_size
        x, y, f = _camera_rays(size)
        h, p = float(s["camera_height"]), float(s["camera_pitch"])
        assert s["focal_length"] == pytest.approx(f)
        assert 0.7 < h < 1.3 and math.radians(1) < p < math.radians(25)
        seg, depth, normals = s["segmentation"], s["depth"][0], s["normals"]
        floor = (seg == 0) & (depth > 0)
        # The floor is the plane n . X = -h with n = (0, cos p, sin p); a ray t * (x, y, -1) meets it at depth t.
        n_dot_ray = math.cos(p) * y - math.sin(p)
        with np.errstate(divide="ignore"):
            t_floor = np.where(n_dot_ray < 0, -h / n_dot_ray, np.inf)
        ahead = t_floor * (math.cos(p) + math.sin(p) * y)  # horizontal distance ahead of the camera
        assert np.allclose(normals[:, floor].T, [0, math.cos(p), math.sin(p)], atol=1e-6)
        assert np.allclose(depth[floor], t_floor[floor], rtol=1e-5)
        assert np.all(ahead[floor] <= FLOOR_FAR + 1e-6)
        sky = depth == 0
        assert np.all(~np.isfinite(t_floor[sky]) | (ahead[sky] > FLOOR_FAR - 1e-6))
        assert np.all(normals[:, sky] == 0) and np.all(seg[sky] == 0)
        # Digits stand in front of the floor: where a digit covers the floor it is nearer.
        digit = seg > 0
        assert np.all(depth[digit & np.isfinite(t_floor)] < t_floor[digit & np.isfinite(t_floor)])


def test_digits_are_upright_planar_cards_facing_the_camera(scenes):
    tilted = 0
    for ds, _, s in scenes:
        x, y, _ = _camera_rays(ds.image_size)
        h, p = float(s["camera_height"]), float(s["camera_pitch"])
        depth, normals, inst = s["depth"][0], s["normals"], s["instances"]
        points = np.stack([x * depth, y * depth, -depth])  # camera frame
        for k in range(len(s["labels"])):
            mask = inst == k
            n = normals[:, mask]
            assert np.allclose(n, n[:, :1], atol=1e-6)  # one plane per card
            n = n[:, 0].astype(np.float64)
            # Upright: no world-vertical component (world up is (0, cos p, sin p) in the camera frame).
            assert abs(n[1] * math.cos(p) + n[2] * math.sin(p)) < 1e-5
            offsets = n @ points[:, mask]
            assert np.allclose(offsets, offsets.mean(), atol=1e-4 * max(1.0, abs(offsets.mean())))
            assert offsets.mean() < 0  # the camera (the origin) is on the side the normal points to
            # Standing on the floor, between the floor and 1.2 m above it.
            height = h + points[1, mask] * math.cos(p) + points[2, mask] * math.sin(p)
            assert height.min() > -1e-4 and height.max() < 1.2 + 1e-4
            assert digit_scenes.NEAR - 0.6 < depth[mask].min() and depth[mask].max() < digit_scenes.FAR + 1  # half a card turned 40 deg
            tilted += abs(n[0]) > 0.1  # yawed cards: depth varies across them
    assert tilted >= 10


def test_digit_pixels_lie_on_the_cards_the_generator_reports(scenes):
    """Back-project every digit pixel to the world (floor Y = 0, camera at (0, h, 0) pitched down by p) and
    check it lies on its card: the square of side `height` standing at (x, 0, -distance), turned by yaw."""
    for ds, _, s in scenes:
        x, y, _ = _camera_rays(ds.image_size)
        h, p = float(s["camera_height"]), float(s["camera_pitch"])
        depth, inst = s["depth"][0], s["instances"]
        cx, cy, cz = x * depth, y * depth, -depth
        wx, wy, wz = cx, h + cy * math.cos(p) + cz * math.sin(p), -cy * math.sin(p) + cz * math.cos(p)
        assert s["cards"].shape == (len(s["labels"]), 4)
        for k, (x0, dist, height, yaw) in enumerate(s["cards"]):
            assert digit_scenes.NEAR <= dist <= digit_scenes.FAR and 0.5 <= height <= 1.2 and abs(yaw) <= math.radians(40) + 1e-9
            m = inst == k
            off_plane = (wx[m] - x0) * math.sin(yaw) + (wz[m] + dist) * math.cos(yaw)
            across = (wx[m] - x0) * math.cos(yaw) - (wz[m] + dist) * math.sin(yaw)
            assert np.abs(off_plane).max() < 1e-4 * dist
            assert np.abs(across).max() <= height / 2 + 1e-4 and wy[m].max() <= height + 1e-4
            assert wy[m].min() >= -1e-4


def test_scene_i_comes_from_its_own_rng_alone():
    ds = DigitScenes("val", image_size=32, scenes={"val": 5}, min_digits=2, max_digits=5, seed=7)
    images, labels = load_digits().images / 16.0, load_digits().target
    pool = digit_indices("val")
    for i in (0, 4):
        rng = np.random.default_rng([7, 1, i])  # split ids: train 0, val 1, test 2
        n_digits = int(rng.integers(2, 6))
        expected = generate_scene(rng, 32, n_digits, images[pool], labels[pool])
        got = ds.scene(i)
        assert np.array_equal(pool[expected["sources"]], got["sources"])
        for key in ("image", "depth", "normals", "segmentation", "boxes", "labels", "landmarks"):
            assert np.array_equal(expected[key], got[key]), key


def _one_digit_scenes(bitmap, seeds):
    images, labels = bitmap[None].astype(np.float64), np.array([3])
    return [generate_scene(np.random.default_rng(seed), 96, 1, images, labels) for seed in seeds]


def test_cards_are_transparent_off_the_ink_and_show_the_bitmap_upright_and_unmirrored():
    full, top, left = np.ones((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))
    top[:4] = 1
    left[:, :4] = 1
    seeds = range(10)
    compared = 0
    for a, b, c in zip(_one_digit_scenes(full, seeds), _one_digit_scenes(top, seeds), _one_digit_scenes(left, seeds)):
        if not (np.array_equal(a["cards"], b["cards"]) and np.array_equal(a["cards"], c["cards"])):
            continue  # a retried placement: different geometry
        compared += 1
        ma, mb, mc = (s["instances"] == 0 for s in (a, b, c))
        assert np.all(ma[mb]) and np.all(ma[mc])  # the inked part of the same card
        assert 0.3 < mb.sum() / ma.sum() < 0.7 and 0.3 < mc.sum() / ma.sum() < 0.7
        rows, cols = np.nonzero(ma)
        assert np.nonzero(mb)[0].mean() < rows.mean() - 1  # the bitmap's top rows are at the card's top
        assert np.nonzero(mc)[1].mean() < cols.mean() - 1  # its left columns on the left, seen from the front
        box = a["boxes"][0]
        assert ma.sum() / ((box[2] - box[0]) * (box[3] - box[1])) > 0.75  # an opaque card fills its box
    assert compared >= 7
    # Real digits are mostly transparent: their pixels fill much less of their boxes.
    images, labels = load_digits().images / 16.0, load_digits().target
    rng = np.random.default_rng(1)
    fills = []
    for _ in range(20):
        s = generate_scene(rng, 96, 1, images, labels)
        box = s["boxes"][0]
        fills.append((s["instances"] == 0).sum() / ((box[2] - box[0]) * (box[3] - box[1])))
    assert np.mean(fills) < 0.65


def test_scene_image_shows_the_digits():
    """Digits are shaded with their own colour: the image differs between a digit and the floor next to it."""
    ds = DigitScenes("train", image_size=64, scenes={"train": 10})
    for i in range(len(ds)):
        x = ds[i]
        digit = x["segmentation"] > 0
        inner = digit & torch.roll(digit, 1, 0) & torch.roll(digit, -1, 0)
        border = ~digit & (torch.roll(digit, 1, 1) | torch.roll(digit, -1, 1)) & (x["depth"][0] > 0)
        if inner.sum() and border.sum():
            gap = (x["image"][:, inner].mean(1) - x["image"][:, border].mean(1)).abs().max()
            assert gap > 0.03


# --- errors and speed ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(split="training"), ["training", "train", "val", "test"]),
        (dict(split="val", scenes={"train": 3}), ["val", "train"]),
        (dict(split="train", image_size=8), ["image_size", "16"]),
        (dict(split="train", image_size=32.5), ["image_size"]),
        (dict(split="train", min_digits=0), ["min_digits", "1", "6"]),
        (dict(split="train", max_digits=7), ["max_digits", "1", "6"]),
        (dict(split="train", min_digits=4, max_digits=2), ["min_digits", "max_digits"]),
        (dict(split="train", scenes={"train": -1}), ["scenes.train"]),
        (dict(split="train", scenes=[("train", 3)]), ["scenes"]),
    ],
)
def test_bad_arguments_raise_user_error_naming_the_problem(kwargs, words):
    with pytest.raises(UserError) as err:
        DigitScenes(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_split_for_digit_indices_raises_user_error():
    with pytest.raises(UserError, match="train, val, test"):
        digit_indices("validation")


def test_scenes_per_second_is_a_positive_rate():
    rate = scenes_per_second(n=10, image_size=32)
    assert isinstance(rate, float) and 0 < rate < 1e6
