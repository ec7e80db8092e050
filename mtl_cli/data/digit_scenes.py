"""The embedded multi-task dataset ``digit_scenes``: real handwritten digits standing on a floor.

Each scene is ray cast, deterministically from a seed, from the 8x8 handwritten digits that scikit-learn ships
(``sklearn.datasets.load_digits``: 1,797 digits of 10 classes, nothing to download). Every digit is an upright
planar card standing on a floor plane; the card is transparent where the digit has no ink.

Conventions
-----------
Camera frame (OpenGL): x right, y up, z backwards out of the screen toward the viewer; the camera looks
along -z. A surface facing the camera has normal (0, 0, 1).

World frame: the same axes for an unpitched camera; the floor is the plane Y = 0 with normal (0, 1, 0), the
camera sits at (0, h, 0) and is pitched down by p, so the floor normal in the camera frame is (0, cos p, sin p).

Pixels: pixel (row v, column u) samples the single ray through its centre, which in the camera frame is
((u + 0.5 - W/2) / f, -(v + 0.5 - H/2) / f, -1) for focal length f (pixels) and a 60 degree field of view.

Depth: distance along the optical axis (-z of the hit point in the camera frame), in metres; 0 = invalid.
Normals: unit vectors in the camera frame, facing the camera; all-zero = invalid.
Invalid pixels are the sky: rays that hit no card and miss the floor, which ends FLOOR_FAR metres ahead.

Targets: segmentation 0 = background (floor and sky), 1..10 = digits 0..9; boxes are XYXY pixel coordinates,
(x1, y1) the first pixel, (x2, y2) the last pixel + 1, one per visible digit, from its visible pixels.
The nearest digit (smallest visible depth) is the one that ``classification`` names; ``landmarks`` are the four
corners of its box, top-left, top-right, bottom-right, bottom-left, as (x, y) divided by the image width and
height: in [0, 1], (0, 0) the top-left corner of the image and (1, 1) its bottom-right corner.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtl_cli.data.transforms import Depth, Normals, plain
from mtl_cli.errors import UserError

SPLITS = ("train", "val", "test")
NUM_CLASSES = 10
MAX_DIGITS = 6
DEFAULT_SCENES = {"train": 2000, "val": 500, "test": 500}

FOV_DEG = 60.0  # field of view (both axes: images are square)
FLOOR_FAR = 15.0  # the floor ends this far ahead of the camera (metres, horizontally)
INK_THRESHOLD = 0.4  # a card pixel is opaque where the bilinear ink (0..1) exceeds this
LIGHT = np.array([-0.35, 0.8, 0.5]) / np.linalg.norm([-0.35, 0.8, 0.5])  # toward the light, world frame
AMBIENT = 0.35
NOISE_STD = 0.015
MIN_VISIBLE_PIXELS = 4  # a placement is kept only if every digit keeps this many visible pixels...
MIN_VISIBLE_FRACTION = 0.3  # ...and this fraction of its unoccluded pixels
MAX_TRIES = 8  # placements tried per digit before it is dropped
NEAR, FAR = 1.2, 3.5  # digits stand this far ahead (metres), log-uniform: near enough to read at 64x64

_SOURCE_SPLIT_SEED = 1797  # fixed: the source digits of each split do not depend on the dataset seed
_SOURCE_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 source digits as read-only (float32 [1797, 8, 8] ink in 0..1, int64 [1797] classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def _source_splits() -> dict[str, np.ndarray]:
    """Split the source digits 60/20/20 per class with a fixed permutation."""
    _, labels = _load_digits()
    rng = np.random.default_rng(_SOURCE_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        ends = np.round(np.cumsum(_SOURCE_SPLIT_FRACTIONS) * len(idx)).astype(int)
        for s, part in zip(SPLITS, np.split(idx, ends[:-1])):
            parts[s].append(part)
    out = {s: np.sort(np.concatenate(p)) for s, p in parts.items()}
    for a in out.values():
        a.setflags(write=False)
    return out


def _check_split(split: str, valid) -> None:
    if split not in valid:
        raise UserError(f"digit_scenes: unknown split {split!r}; valid splits are {', '.join(valid)}")


def digit_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of the source digits that scenes of ``split`` are composed from.

    The three splits are disjoint and together cover all 1,797 digits; they do not depend on the dataset seed.
    """
    _check_split(split, SPLITS)
    return _source_splits()[split].copy()


@functools.lru_cache(maxsize=8)
def _pixel_rays(image_size: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Focal length (pixels) and the flattened camera-frame ray components x, y of every pixel (z = -1)."""
    f = image_size / 2 / np.tan(np.radians(FOV_DEG) / 2)
    c = (np.arange(image_size) + 0.5 - image_size / 2) / f
    dx, dy = np.tile(c, image_size), np.repeat(-c, image_size)
    dx.setflags(write=False)
    dy.setflags(write=False)
    return float(f), dx, dy


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _card_depth(card, bitmap, h, wx, wy, wz) -> np.ndarray:
    """Depth per pixel where the ray hits the card's ink, inf elsewhere.

    ``card`` = (x0, dist, height, yaw): the card's bottom centre stands on the floor at world (x0, 0, -dist);
    it is square, faces +Z when yaw = 0 and is turned by ``yaw`` about the vertical axis. The camera is at
    (0, h, 0); (wx, wy, wz) are world ray directions scaled so that the ray parameter equals the depth.
    """
    x0, dist, height, yaw = card
    s, c = np.sin(yaw), np.cos(yaw)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (s * x0 - c * dist) / (s * wx + c * wz)  # n.(centre - camera) / n.ray, n = (sin yaw, 0, cos yaw)
    across = c * (t * wx - x0) - s * (t * wz + dist)  # along the card's right axis (cos yaw, 0, -sin yaw)
    up = h + t * wy - height / 2  # above the card's centre
    idx = np.flatnonzero((t > 0) & (np.abs(across) < height / 2) & (np.abs(up) < height / 2))
    # Bitmap coordinates in the zero-padded 10x10 bitmap (pixel centres at integers, the 8x8 at 1..8).
    col = np.clip((across[idx] / height + 0.5) * 8 + 0.5, 0, 8.999)
    row = np.clip((0.5 - up[idx] / height) * 8 + 0.5, 0, 8.999)
    c0, r0 = col.astype(np.intp), row.astype(np.intp)
    fc, fr = col - c0, row - r0
    top = bitmap[r0, c0] * (1 - fc) + bitmap[r0, c0 + 1] * fc
    bottom = bitmap[r0 + 1, c0] * (1 - fc) + bitmap[r0 + 1, c0 + 1] * fc
    ink = idx[top * (1 - fr) + bottom * fr > INK_THRESHOLD]
    depth = np.full(t.shape, np.inf)
    depth[ink] = t[ink]
    return depth


def _zbuffer(depths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest surface per pixel (the first on ties) and its depth (inf where nothing is hit)."""
    nearest = np.zeros(depths[0].shape, dtype=np.intp)
    zmin = depths[0].copy()
    for k, depth in enumerate(depths[1:], 1):
        nearest[depth < zmin] = k
        np.minimum(zmin, depth, out=zmin)
    return nearest, zmin


def _placement_ok(depths: list[np.ndarray], first_fallback: bool) -> bool:
    """Whether every card keeps enough visible pixels once the nearest hit wins."""
    nearest, zmin = _zbuffer(depths)
    visible = np.bincount(nearest[np.isfinite(zmin)], minlength=len(depths))
    if first_fallback:
        return bool(visible[0] > 0)
    own = np.array([np.isfinite(d).sum() for d in depths])
    return bool(np.all(visible >= np.maximum(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * own)))


def _expand_normals(surface: np.ndarray, surface_normals: np.ndarray) -> np.ndarray:
    """Per-pixel normals [3, H, W] from the surface map and the table of each surface's camera-frame normal."""
    return np.take(surface_normals.T, surface, axis=1)


def _box_corners(box: np.ndarray, size: int) -> np.ndarray:
    """The corners of an XYXY pixel box as normalised (x, y): top-left, top-right, bottom-right, bottom-left."""
    x1, y1, x2, y2 = box
    return (np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]) / size).astype(np.float32)


def generate_scene(
    rng: np.random.Generator,
    image_size: int,
    n_digits: int,
    digit_images: np.ndarray,
    digit_labels: np.ndarray,
) -> dict[str, np.ndarray]:
    """Ray cast one scene of up to ``n_digits`` digits drawn from the pool ``digit_images`` / ``digit_labels``.

    ``digit_images``: float [M, 8, 8] ink in 0..1; ``digit_labels``: int [M] classes 0..9; ``n_digits`` >= 1.
    All randomness comes from ``rng``. A digit whose placements all leave it (or another digit) mostly hidden
    is dropped after MAX_TRIES tries, except the first, which then falls back to a fixed near placement: every
    scene has at least one visible digit. N below is the number of visible digits, H = W = ``image_size``.

    Returns numpy arrays: ``image`` float32 [3,H,W] in [0,1]; ``segmentation`` uint8 [H,W] (0 background,
    class + 1 on digits); ``depth`` float32 [1,H,W] (0 = invalid); ``normals`` float32 [3,H,W] (0 = invalid);
    ``instances`` int8 [H,W] (index of the visible digit, -1 on floor and sky); ``surface`` int8 [H,W] (digit
    index, N for floor, N+1 for sky) and ``surface_normals`` float32 [N+2,3] with normals = surface_normals[surface];
    ``boxes`` float32 [N,4] XYXY; ``labels`` int64 [N]; ``sources`` int64 [N] (indices into the pool);
    ``cards`` float64 [N,4]: (x, distance, height, yaw) of each card, whose bottom centre stands at world
    (x, 0, -distance), square, turned by yaw (radians) about the vertical;
    ``classification`` int64 (class of the digit with the smallest visible depth); ``landmarks`` float32 [4,2]
    (the corners of that digit's box, normalised: see the module docstring); ``multilabel`` float32 [10];
    ``count`` int64; camera parameters ``camera_height`` (m), ``camera_pitch`` (radians, down) and
    ``focal_length`` (pixels), float64 scalars.
    """
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits}")
    size = int(image_size)
    f, dx, dy = _pixel_rays(size)
    h = rng.uniform(0.9, 1.1)
    pitch = np.radians(rng.uniform(8.0, 16.0))
    sp, cp = np.sin(pitch), np.cos(pitch)
    # World ray directions of the camera-frame rays (dx, dy, -1): the ray parameter t is the depth.
    wx, wy, wz = dx, dy * cp - sp, -dy * sp - cp

    # Appearance of the floor and sky.
    checker = rng.random() < 0.5
    floor_a = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.55, 0.85))
    floor_b = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.2, 0.45))
    tile = rng.uniform(0.4, 1.0)
    sky_top = _hsv_to_rgb(rng.uniform(0.53, 0.66), rng.uniform(0.4, 0.7), rng.uniform(0.6, 0.9))
    sky_bottom = 0.4 * sky_top + 0.6 * rng.uniform(0.8, 1.0)

    # Digits, placed one by one; a placement is retried while it hides a digit.
    half_width = np.tan(np.radians(FOV_DEG) / 2)
    depths, cards, labels, sources, colours = [], [], [], [], []
    for _ in range(n_digits):
        src = int(rng.integers(len(digit_images)))
        bitmap = np.zeros((10, 10))
        bitmap[1:9, 1:9] = digit_images[src]
        colour = _hsv_to_rgb(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
        first = not depths
        for attempt in range(MAX_TRIES + first):
            fallback = first and attempt == MAX_TRIES
            if fallback:
                card = (0.0, 2.5, 1.0, 0.0)
            else:
                dist = NEAR * (FAR / NEAR) ** rng.random()
                card = (rng.uniform(-0.85, 0.85) * half_width * dist, dist, rng.uniform(0.5, 1.2),
                        np.radians(rng.uniform(-40.0, 40.0)))
            depth = _card_depth(card, bitmap, h, wx, wy, wz)
            if _placement_ok(depths + [depth], fallback):
                depths.append(depth)
                cards.append(card)
                labels.append(int(digit_labels[src]))
                sources.append(src)
                colours.append(colour)
                break

    # Floor: the plane Y = 0 up to FLOOR_FAR ahead; then the z-buffer over cards, floor (and sky = nothing hit).
    n = len(cards)
    if n == 0:
        raise ValueError("no digit could be placed visibly: are the digit images blank?")
    with np.errstate(divide="ignore"):
        floor_t = np.where(wy < 0, -h / wy, np.inf)
    floor_t[-floor_t * wz > FLOOR_FAR] = np.inf
    surface, zmin = _zbuffer(depths + [floor_t])
    valid = np.isfinite(zmin)
    surface[~valid] = n + 1

    # Per-surface normals (world and camera frame), facing the camera.
    world_normals = np.zeros((n + 2, 3))
    for k, (_, _, _, yaw) in enumerate(cards):
        world_normals[k] = (np.sin(yaw), 0.0, np.cos(yaw))  # faces the camera: |yaw| <= 40 deg, card in view
    world_normals[n] = (0.0, 1.0, 0.0)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]])  # columns: camera axes in the world
    surface_normals = (world_normals @ rot).astype(np.float32)

    # Colour: albedo times Lambertian shading, sky gradient, noise.
    shade = AMBIENT + (1 - AMBIENT) * np.clip(world_normals @ LIGHT, 0, None)
    table = np.zeros((n + 2, 3))
    table[:n] = np.array(colours) * shade[:n, None]
    image = np.take(table.T, surface, axis=1)  # [3, H*W]
    on_floor = np.flatnonzero(surface == n)
    tf = floor_t[on_floor]
    if checker:
        parity = (np.floor(tf * wx[on_floor] / tile) + np.floor(tf * wz[on_floor] / tile)) % 2
    else:
        parity = np.clip(-tf * wz[on_floor] / FLOOR_FAR, 0, 1)
    image[:, on_floor] = (floor_a[:, None] + parity * (floor_b - floor_a)[:, None]) * shade[n]
    in_sky = np.flatnonzero(~valid)
    rows = (in_sky // size) / max(size - 1, 1)
    image[:, in_sky] = sky_top[:, None] + rows * (sky_bottom - sky_top)[:, None]
    image = image.reshape(3, size, size).astype(np.float32)
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(NOISE_STD * 12**0.5)  # std NOISE_STD
    np.clip(image, 0, 1, out=image)

    # Targets.
    labels_arr = np.array(labels, dtype=np.int64)
    instances = np.where(surface < n, surface, -1).astype(np.int8).reshape(size, size)
    depth_map = np.where(valid, zmin, 0.0).astype(np.float32)
    boxes = np.zeros((n, 4), dtype=np.float32)
    nearest = np.zeros(n)
    for k in range(n):
        pix = np.flatnonzero(surface == k)
        r, c = pix // size, pix % size
        boxes[k] = (c.min(), r.min(), c.max() + 1, r.max() + 1)
        nearest[k] = zmin[pix].min()
    multilabel = np.zeros(NUM_CLASSES, dtype=np.float32)
    multilabel[labels_arr] = 1.0
    surface = surface.astype(np.int8).reshape(size, size)
    return {
        "image": image,
        "segmentation": np.append(0, labels_arr + 1).astype(np.uint8)[instances + 1],
        "depth": depth_map.reshape(1, size, size),
        "normals": _expand_normals(surface, surface_normals),
        "instances": instances,
        "surface": surface,
        "surface_normals": surface_normals,
        "boxes": boxes,
        "labels": labels_arr,
        "sources": np.array(sources, dtype=np.int64),
        "cards": np.array(cards, dtype=np.float64).reshape(n, 4),
        "classification": np.int64(labels_arr[nearest.argmin()]),
        "landmarks": _box_corners(boxes[nearest.argmin()], size),
        "multilabel": multilabel,
        "count": np.int64(n),
        "camera_height": np.float64(h),
        "camera_pitch": np.float64(pitch),
        "focal_length": np.float64(f),
    }


def scenes_per_second(n: int = 200, image_size: int = 64) -> float:
    """Scenes generated per second (1..4 digits each from the train pool), single-threaded numpy."""
    images, labels = _load_digits()
    pool = digit_indices("train")
    images, labels = images[pool], labels[pool]
    rng = np.random.default_rng(0)
    generate_scene(rng, image_size, 2, images, labels)  # warm the caches
    start = time.perf_counter()
    for _ in range(n):
        generate_scene(rng, image_size, int(rng.integers(1, 5)), images, labels)
    return n / (time.perf_counter() - start)


def _int_param(name: str, value, low: int, high: int | None = None) -> int:
    valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"digit_scenes: {name} must be {valid}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise UserError(f"digit_scenes: {name} must be {valid}, got {value}")
    return int(value)


class DigitScenes(Dataset):
    """Scenes of real handwritten digits standing on a floor, with targets for many tasks at once.

    Scene ``i`` of a split is generated from ``np.random.default_rng([seed, split_id, i])`` alone, from the
    source digits of that split only (see :func:`digit_indices`). With ``cache`` a scene is kept in memory the
    first time it is generated (about 80 kB at 64x64). See the module docstring for the conventions.

    Each sample is a dict of tensors: ``image`` float32 [3,H,W] in [0,1]; ``segmentation`` int64 [H,W]
    (0 background, 1..10 digits 0..9); ``depth`` float32 [1,H,W] (metres along the optical axis, 0 = invalid);
    ``normals`` float32 [3,H,W] (camera frame, all-zero = invalid); ``classification`` int64 scalar (class of the
    nearest visible digit); ``landmarks`` float32 [4,2] (the (x, y) corners of that digit's box, top-left,
    top-right, bottom-right, bottom-left, divided by the image size: in [0, 1]); ``multilabel`` float32 [10];
    ``count`` int64 scalar; ``boxes`` BoundingBoxes [N,4] XYXY; ``labels`` int64 [N].
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        split: str,
        image_size: int = 64,
        scenes: Mapping[str, int] | None = None,
        min_digits: int = 1,
        max_digits: int = 4,
        seed: int = 0,
        cache: bool = True,
        transforms: Callable | None = None,
    ):
        scenes = DEFAULT_SCENES if scenes is None else scenes
        if not hasattr(scenes, "items"):
            raise UserError(f"digit_scenes: scenes must map split names to scene counts, got {scenes!r}")
        sizes = {str(k): _int_param(f"scenes.{k}", v, 0) for k, v in scenes.items()}
        _check_split(split, [s for s in SPLITS if s in sizes])
        self.split = split
        self.image_size = _int_param("image_size", image_size, 16)
        self.min_digits = _int_param("min_digits", min_digits, 1, MAX_DIGITS)
        self.max_digits = _int_param("max_digits", max_digits, 1, MAX_DIGITS)
        if self.min_digits > self.max_digits:
            raise UserError(
                f"digit_scenes: need 1 <= min_digits <= max_digits <= {MAX_DIGITS}, "
                f"got min_digits={min_digits}, max_digits={max_digits}"
            )
        self.seed = _int_param("seed", seed, 0)
        self.length = sizes[split]
        self._split_id = SPLITS.index(split)
        self._pool = digit_indices(split)
        images, labels = _load_digits()
        self._images, self._labels = images[self._pool], labels[self._pool]
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        self.transforms = transforms

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int, key: str | None = None) -> str:
        """What generates sample `index` (for messages): the scene's index and the dataset's seed."""
        return f"scene {index}, seed {self.seed}"

    def scene(self, index: int) -> dict[str, np.ndarray]:
        """The generator's full output for scene ``index`` (numpy; see :func:`generate_scene`).

        ``sources`` here are indices into ``load_digits()`` (not into the split's pool). Do not modify the arrays.
        """
        index = operator.index(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"scene {index} out of range for {self.length} scenes")
        index %= self.length
        packed = None if self._cache is None else self._cache.get(index)
        if packed is None:
            rng = np.random.default_rng([self.seed, self._split_id, index])
            n_digits = int(rng.integers(self.min_digits, self.max_digits + 1))
            scene = generate_scene(rng, self.image_size, n_digits, self._images, self._labels)
            scene["sources"] = self._pool[scene["sources"]]
            packed = {k: v for k, v in scene.items() if k != "normals"}  # normals are rebuilt from `surface`
            if self._cache is not None:
                self._cache[index] = packed
        return {**packed, "normals": _expand_normals(packed["surface"], packed["surface_normals"])}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.sample(index)
        if self.transforms is None:
            return plain(sample)
        # landmarks move with the image as key points in pixels. The scene-level labels (classification, count,
        # multilabel) are not revised: use transforms that keep every digit in view (flips, mild scales).
        size = (self.image_size, self.image_size)
        sample["landmarks"] = tv_tensors.KeyPoints(sample["landmarks"] * self.image_size, canvas_size=size)
        sample = self.transforms(sample)
        height, width = sample["image"].shape[-2:]
        sample["landmarks"] = sample["landmarks"].as_subclass(torch.Tensor) / torch.tensor([width, height])
        return plain(sample)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        s = self.scene(index)
        size = self.image_size
        return {
            "image": tv_tensors.Image(torch.from_numpy(s["image"].copy())),
            "segmentation": tv_tensors.Mask(torch.from_numpy(s["segmentation"].astype(np.int64))),
            "depth": Depth(torch.from_numpy(s["depth"].copy())),
            "normals": Normals(torch.from_numpy(s["normals"])),
            "classification": torch.tensor(int(s["classification"]), dtype=torch.int64),
            "landmarks": torch.from_numpy(s["landmarks"].copy()),
            "multilabel": torch.from_numpy(s["multilabel"].copy()),
            "count": torch.tensor(int(s["count"]), dtype=torch.int64),
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(s["boxes"].copy()), format="XYXY", canvas_size=(size, size)
            ),
            "labels": torch.from_numpy(s["labels"].copy()),
        }
