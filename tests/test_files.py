"""Reading dataset files: a bad file is named, and data.skip_bad turns it into a counted warning."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtl_cli.data.collate import collate
from mtl_cli.data.files import BadSample, SkipBad, read_image, read_npy, read_raw
from mtl_cli.errors import UserError


@pytest.fixture
def files(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    Image.fromarray(pixels).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    Image.fromarray((np.arange(6, dtype=np.uint16).reshape(2, 3) * 1000)).save(tmp_path / "depth16.png")
    np.save(tmp_path / "good.npy", np.ones((2, 2), np.float32))
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY junk")
    return tmp_path, pixels


def test_images_read_as_float_in_0_1_and_16_bit_pngs_keep_their_values(files):
    root, pixels = files
    image = read_image(root / "good.png")
    assert image.dtype == torch.float32 and image.shape == (3, 2, 3)
    assert torch.allclose(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    depth = read_raw(root / "depth16.png")
    assert depth.dtype == torch.uint16 and depth.flatten().tolist() == [0, 1000, 2000, 3000, 4000, 5000]


@pytest.mark.parametrize("name, reason", [("truncated.png", "not a readable image"), ("junk.jpg", "not a readable"),
                                          ("missing.png", "no such file"), ("bad.npy", "not a readable .npy")])
def test_a_bad_file_is_named(files, name, reason):
    root, _ = files
    read = read_npy if name.endswith(".npy") else read_image
    with pytest.raises(BadSample, match=reason) as error:
        read(root / name)
    assert str(root / name) in str(error.value) and "data.skip_bad=true" in str(error.value)
    assert isinstance(error.value, UserError)


class Files(Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {"image": read_image(self.paths[i])}


def test_skip_bad_drops_bad_samples_with_a_counted_warning(files, caplog):
    root, _ = files
    dataset = SkipBad(Files([root / "good.png", root / "junk.jpg", root / "good.png", root / "missing.png"]))
    with caplog.at_level(logging.WARNING, logger="mtl"):
        samples = [dataset[i] for i in range(4)]
    assert [s is None for s in samples] == [False, True, False, True] and dataset.skipped == 2
    assert "(2 skipped so far" in caplog.text and str(root / "missing.png") in caplog.text
    assert collate(samples)["image"].shape == (2, 3, 2, 3)
    with pytest.raises(UserError, match="every sample of a batch was bad"):
        collate([None, None])
