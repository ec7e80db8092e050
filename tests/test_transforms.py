"""The dense augmentation (mtl_cli.data.transforms) keeps image, mask, depth, normals and boxes aligned.

Every check compares against a reference computed here independently: index slicing of the original at the
window the transform chose (read back from a mask whose value at each pixel is that pixel's index), a nearest
resize by hand or by torch.nn.functional.interpolate, torch.flip, and boxes drawn into a mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, SequentialSampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from mtl_cli.data.seeding import SeededBatches, SeededSamples
from mtl_cli.data.transforms import Depth, Normals, RandomScaleCrop
from mtl_cli.errors import UserError

H, W = 12, 18  # divisible by 2 and by 1.5: the crop is exactly H/s x W/s
SEEDS = range(8)


def sample(seed: int = 0) -> dict:
    """A sample with known patterns: random image, random labels with -1, depth with invalid zeros, unit normals
    with invalid zeros, a pixel-index mask (`ids`: r * W + c) and two boxes also drawn in the `drawn` mask."""
    gen = torch.Generator().manual_seed(seed)
    depth = torch.rand(1, H, W, generator=gen) * 5 + 0.5
    depth[0, 0, :5] = 0
    normals = F.normalize(torch.randn(3, H, W, generator=gen), dim=0)
    normals[:, 3, 4:9] = 0
    labels = torch.tensor([-1, 0, 3, 7])[torch.randint(4, (H, W), generator=gen)]
    boxes = torch.tensor([[2.0, 3.0, 9.0, 8.0], [10.0, 1.0, 17.0, 11.0]])  # XYXY: x2, y2 one past the last pixel
    drawn = torch.zeros(H, W, dtype=torch.int64)
    for value, (x1, y1, x2, y2) in enumerate(boxes.long().tolist(), 1):
        drawn[y1:y2, x1:x2] = value
    return {"image": tv_tensors.Image(torch.rand(3, H, W, generator=gen)),
            "segmentation": tv_tensors.Mask(labels),
            "ids": tv_tensors.Mask(torch.arange(H * W).reshape(H, W)),
            "drawn": tv_tensors.Mask(drawn),
            "depth": Depth(depth), "normals": Normals(normals),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
            "labels": torch.tensor([1, 2])}


def run(transform, seed: int, source: dict | None = None) -> dict:
    torch.manual_seed(seed)
    return transform(source if source is not None else sample(seed))


def window(ids: torch.Tensor) -> tuple[int, int]:
    """(top, left) of the crop, read from the pixel-index mask: output pixel (0, 0) comes from the window's corner."""
    corner = int(ids[0, 0])
    return corner // W, corner % W


def crop(x: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    return x[..., top:top + h, left:left + w]


def plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(torch.Tensor)


def drawn_box(drawn: torch.Tensor, value: int) -> list[float]:
    """The XYXY box of the pixels of `value` in a mask (x2, y2 one past the last pixel); zeros if none."""
    rows, cols = torch.nonzero(drawn == value, as_tuple=True)
    if rows.numel() == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


# ------------------------------------------------------------------------------------------ flips


@pytest.mark.parametrize("flip", [v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0)],
                         ids=["horizontal", "vertical"])
def test_flipping_twice_gives_back_every_type(flip):
    original = sample(1)
    twice = flip(flip(original))
    for key, value in original.items():
        assert type(twice[key]) is type(value), key
        assert torch.equal(plain(twice[key]), plain(value)), key


def test_a_horizontal_flip_mirrors_every_map_and_negates_the_normals_x():
    original = sample(2)
    out = v2.RandomHorizontalFlip(p=1.0)(original)
    for key in ("image", "segmentation", "ids", "drawn", "depth"):
        assert torch.equal(plain(out[key]), plain(original[key]).flip(-1)), key
    mirrored = plain(original["normals"]).flip(-1)
    assert torch.equal(plain(out["normals"])[0], -mirrored[0])
    assert torch.equal(plain(out["normals"])[1:], mirrored[1:])
    x1, y1, x2, y2 = plain(original["boxes"]).unbind(-1)
    assert torch.equal(plain(out["boxes"]), torch.stack([W - x2, y1, W - x1, y2], dim=-1))
    assert torch.equal(out["labels"], original["labels"])


def test_a_vertical_flip_negates_the_normals_y_only():
    original = sample(3)
    out = v2.RandomVerticalFlip(p=1.0)(original)
    mirrored = plain(original["normals"]).flip(-2)
    assert torch.equal(plain(out["normals"])[1], -mirrored[1])
    assert torch.equal(plain(out["normals"])[[0, 2]], mirrored[[0, 2]])
    assert torch.equal(plain(out["depth"]), plain(original["depth"]).flip(-2))


# ------------------------------------------------------------------------------------------ scale and crop


@pytest.mark.parametrize("seed", SEEDS)
def test_zooming_by_2_gives_the_hand_crop_resized_by_hand_with_depth_divided_by_2(seed):
    original = sample(seed)
    out = run(RandomScaleCrop(scales=[2.0]), seed, original)
    top, left = window(out["ids"])
    rows, cols = torch.arange(H) // 2, torch.arange(W) // 2  # nearest at an exact factor 2: pixel i <- i // 2
    for key in ("ids", "segmentation", "drawn", "depth"):
        expected = crop(plain(original[key]), top, left, H // 2, W // 2)[..., rows[:, None], cols[None, :]]
        if key == "depth":
            expected = expected / 2
        assert torch.equal(plain(out[key]), expected), key


@pytest.mark.parametrize("seed", SEEDS)
def test_zooming_by_1_5_gives_the_nearest_resized_crop_with_depth_divided_by_1_5(seed):
    original = sample(seed)
    out = run(RandomScaleCrop(scales=[1.5]), seed, original)
    top, left = window(out["ids"])
    h, w = H * 2 // 3, W * 2 // 3
    for key in ("ids", "segmentation", "depth"):
        part = crop(plain(original[key]), top, left, h, w)
        expected = F.interpolate(part[None, None].float() if part.dim() == 2 else part[None].float(),
                                 size=(H, W), mode="nearest").reshape(out[key].shape).to(part.dtype)
        if key == "depth":
            expected = expected / 1.5
        torch.testing.assert_close(plain(out[key]), expected, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_image_and_the_normals_are_resized_bilinearly_and_the_normals_not_scaled(seed):
    original = sample(seed)
    out = run(RandomScaleCrop(scales=[1.5]), seed, original)
    top, left = window(out["ids"])
    h, w = H * 2 // 3, W * 2 // 3
    for key in ("image", "normals"):
        part = crop(plain(original[key]), top, left, h, w)
        expected = F.interpolate(part[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(plain(out[key]), expected, rtol=0, atol=1e-5, msg=key)


def test_where_h_over_s_is_not_whole_depth_is_divided_by_the_zoom_applied():
    """At 12 x 17 and s = 1.5 the crop is 8 x 11 (rounded): the zoom is 12/8 down and 17/11 across, and depth is
    divided by their geometric mean (exactly s at NYUv2's 288 x 384; within 0.2% of s at Cityscapes' 128 x 256)."""
    width = 17
    original = {"ids": tv_tensors.Mask(torch.arange(H * width).reshape(H, width)),
                "depth": Depth(torch.rand(1, H, width, generator=torch.Generator().manual_seed(0)) + 1)}
    out = run(RandomScaleCrop(scales=[1.5]), 0, original)
    corner = int(out["ids"][0, 0])
    part = crop(plain(original["depth"]), corner // width, corner % width, 8, 11)
    expected = F.interpolate(part[None], size=(H, width), mode="nearest")[0] / (12 / 8 * 17 / 11) ** 0.5
    torch.testing.assert_close(plain(out["depth"]), expected, rtol=1e-6, atol=1e-6)


def test_a_scale_of_1_changes_nothing():
    original = sample(4)
    out = run(RandomScaleCrop(scales=[1.0]), 4, original)
    for key, value in original.items():
        torch.testing.assert_close(plain(out[key]), plain(value), rtol=0, atol=1e-6, msg=key)


def test_the_mask_keeps_its_labels_and_ignore_value_through_the_whole_augmentation():
    augment = v2.Compose([RandomScaleCrop(scales=[1.0, 1.2, 1.5]), v2.RandomHorizontalFlip()])
    for seed in range(20):
        original = sample(seed)
        out = run(augment, seed, original)
        assert out["segmentation"].dtype == torch.int64
        assert set(out["segmentation"].unique().tolist()) <= set(original["segmentation"].unique().tolist())
        assert out["image"].shape == (3, H, W) and out["depth"].shape == (1, H, W)


@pytest.mark.parametrize("scales,tolerance", [([1.0, 2.0], 0.0), ([1.2, 1.5], 1.0)], ids=["exact", "fractional"])
def test_the_boxes_stay_on_the_boxes_drawn_in_the_mask(scales, tolerance):
    augment = v2.Compose([RandomScaleCrop(scales=scales), v2.RandomHorizontalFlip()])
    for seed in range(24):
        out = run(augment, seed)
        for value, box in enumerate(plain(out["boxes"]).tolist(), 1):
            expected = drawn_box(plain(out["drawn"]), value)
            if expected == [0.0, 0.0, 0.0, 0.0]:  # the box fell outside the window: clamped to no area
                assert box[0] == box[2] or box[1] == box[3], (seed, value, box)
                continue
            assert max(abs(a - b) for a, b in zip(box, expected)) <= tolerance, (seed, value, box, expected)


def test_a_rotation_with_normals_is_a_user_error():
    rotate = v2.RandomRotation(degrees=(10, 10))
    with pytest.raises(UserError, match="normals"):
        rotate(sample(5))
    without = {key: value for key, value in sample(5).items() if key != "normals"}
    assert rotate(without)["image"].shape == (3, H, W)  # the same rotation is fine without normals


def test_scales_below_1_are_refused():
    with pytest.raises(UserError, match="scales"):
        RandomScaleCrop(scales=[0.5, 1.0])


def test_colour_transforms_change_the_image_only():
    torch.manual_seed(0)
    image, normals, depth = torch.rand(3, 8, 12), torch.randn(3, 8, 12), torch.rand(1, 8, 12) + 1
    sample = {"image": tv_tensors.Image(image), "normals": Normals(normals), "depth": Depth(depth)}
    out = v2.Compose([v2.ColorJitter(0.5, 0.5, 0.5, 0.1), v2.RandomGrayscale(1.0),
                      v2.Normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])])(sample)
    assert not torch.allclose(out["image"], image)
    assert torch.equal(out["normals"], normals) and torch.equal(out["depth"], depth)
    assert type(out["normals"]) is Normals and type(out["depth"]) is Depth


def test_a_seeded_sample_is_augmented_the_same_whatever_was_loaded_before():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.rand(3)}  # the random draw stands for a random transform

    batches = list(SeededBatches(BatchSampler(SequentialSampler(range(4)), 2, False), torch.Generator().manual_seed(5)))
    again = list(SeededBatches(BatchSampler(SequentialSampler(range(4)), 2, False), torch.Generator().manual_seed(5)))
    assert batches == again and len({seed for batch in batches for _, seed in batch}) == 4
    samples = SeededSamples(Noisy())
    state = torch.get_rng_state()
    forward = [samples[item]["image"] for batch in batches for item in batch]
    backward = [samples[item]["image"] for batch in reversed(batches) for item in reversed(batch)]
    assert all(torch.equal(a, b) for a, b in zip(forward, reversed(backward)))
    assert not torch.equal(forward[0], forward[1])  # each sample its own seed
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
