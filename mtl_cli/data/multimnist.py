"""MultiMNIST as in Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization" (NeurIPS 2018): two
overlapping MNIST digits in one 28x28 image; one task names the top-left digit, the other the bottom-right one.

The recipe of the authors' release (isl-org/MultiObjectiveOptimization, multi_task/loaders/multi_mnist_loader.py,
`read_image_file` and `read_label_file`), which this module follows:
- every MNIST image of a split is the left digit of one sample; its partner, the right digit, is drawn uniformly
  at random (with replacement) from the same split's images: its label is independent of the left one's and
  may equal it;
- on a 36x36 black canvas the left digit (28x28) lies at rows/columns 0..27 and the right one at 6..33; where they
  overlap each pixel is the maximum of the two (the release writes the left, then the right, then the maximum
  over the overlap, which equals a pixel-wise maximum over the whole canvas);
- the canvas goes through scipy.misc.imresize(..., (28, 28), interp='nearest'): first scaled to 0..255 by its
  own minimum (0) and maximum (the identity for MNIST's digits, which reach 255), then a nearest-neighbour resize
  by PIL that samples pixel centres: output pixel i reads canvas pixel floor((i + 0.5) * 36 / 28);
- the left digit's label is the first task's, the right digit's the second's.

Here the pairing comes from `seed` (the release used numpy's global random state), and `jitter` > 0 moves each
digit by up to that many pixels in each direction (drawn from the seed, kept inside the canvas): 0, the default,
is the release's fixed placement. Splits: `test` pairs the 10,000 t10k digits; `train` and `val` split MNIST's
60,000 training digits, `val_size` of them (10,000 by default, so train keeps 50,000) held out by a fixed
permutation that does not depend on `seed`; partners come from the same split, so no digit is in two splits.

MNIST is read by torchvision.datasets.MNIST from {root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
(the uncompressed idx files; data.download=true fetches and unpacks them). The image is the grey canvas repeated
on three channels, so every backbone takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import MNIST

from mtl_cli.data.transforms import plain
from mtl_cli.errors import UserError

SPLITS = ("train", "val", "test")
HOLDOUT_SEED = 2018  # fixed: the val digits are the same whatever data.dataset.seed is
DOWNLOAD = "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror of yann.lecun.com/exdb/mnist)"
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # idx headers: 0x00000803 (ubyte, 3 dims) and 0x00000801 (ubyte, 1 dim)


def idx_files(root: Path, train: bool) -> tuple[Path, Path]:
    stem = "train" if train else "t10k"
    raw = root / "MNIST" / "raw"
    return raw / f"{stem}-images-idx3-ubyte", raw / f"{stem}-labels-idx1-ubyte"


def missing_error(root: Path, missing: Path) -> UserError:
    hint = ""
    if missing.with_name(missing.name + ".gz").is_file():
        hint = (f" {missing.name}.gz is there, but torchvision reads the uncompressed file: gunzip it, or set "
                "data.download=true (torchvision unpacks the official archives, checked by MD5, without fetching "
                "them again).")
    return UserError(f"multimnist: {missing} does not exist.{hint} Expected MNIST's idx files in "
                     f"{root}/MNIST/raw/: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                     f"t10k-labels-idx1-ubyte (from {DOWNLOAD}); data.download=true downloads them there")


def check_idx(path: Path, magic: int, dims: int) -> int:
    """The item count of an idx file, after checking its big-endian header and its length: a bad file names
    itself here instead of failing inside torchvision with a bare assertion."""
    data = path.read_bytes()
    header = np.frombuffer(data[: 4 * (dims + 1)], dtype=">u4")
    if len(header) != dims + 1 or header[0] != magic:
        raise UserError(f"multimnist: {path} is not an MNIST idx file (expected the magic number {magic})")
    expected = 4 * (dims + 1) + int(np.prod(header[1:], dtype=np.int64))
    if len(data) != expected:
        raise UserError(f"multimnist: {path} holds {len(data)} bytes, its header says {expected}: truncated?")
    return int(header[1])


def load_mnist(root: Path, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 28, 28] digits, int64 [N] labels) of MNIST's train or t10k files."""
    files = idx_files(root, train)
    if download and not all(f.is_file() for f in files):
        try:
            MNIST(str(root), train=train, download=True)
        except (RuntimeError, OSError) as e:
            reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise UserError(f"multimnist: could not download MNIST into {files[0].parent} ({reason}). Offline? Put "
                            f"the files there by hand (from {DOWNLOAD})") from None
    for path in files:
        if not path.is_file():
            raise missing_error(root, path)
    count = check_idx(files[0], IMAGES_MAGIC, 3), check_idx(files[1], LABELS_MAGIC, 1)
    if count[0] != count[1]:
        raise UserError(f"multimnist: {files[0]} holds {count[0]} digits but {files[1]} {count[1]} labels")
    mnist = MNIST(str(root), train=train)
    return mnist.data.numpy(), mnist.targets.numpy().astype(np.int64)


def split_pool(total: int, split: str, val_size: int) -> np.ndarray:
    """Indices into MNIST's file of the digits of `split`: train and val part its training file."""
    if split == "test":
        return np.arange(total)
    if not 0 < val_size < total:
        raise UserError(f"multimnist: val_size={val_size} must lie between 1 and {total - 1}, the training digits "
                        "less one")
    held_out = np.random.default_rng(HOLDOUT_SEED).permutation(total)[:val_size]
    in_val = np.zeros(total, dtype=bool)
    in_val[held_out] = True
    return np.flatnonzero(in_val if split == "val" else ~in_val)


def compose_pair(left: np.ndarray, right: np.ndarray, left_at: tuple[int, int], right_at: tuple[int, int],
                 canvas: int, image_size: int) -> np.ndarray:
    """uint8 [image_size, image_size]: both digits on a black canvas, pixel-wise maximum, scaled to 0..255 by the
    canvas maximum, resized by nearest neighbour at pixel centres (the release's scipy.misc.imresize)."""
    board = np.zeros((canvas, canvas), dtype=np.float64)
    for digit, (top, left_edge) in ((left, left_at), (right, right_at)):
        window = board[top: top + digit.shape[0], left_edge: left_edge + digit.shape[1]]
        np.maximum(window, digit, out=window)
    if board.max() > 0:
        board = np.floor(board * (255.0 / board.max()) + 0.5)
    rows = np.floor((np.arange(image_size) + 0.5) * canvas / image_size).astype(np.intp)
    return board[np.ix_(rows, rows)].astype(np.uint8)


class MultiMnist(Dataset):
    """Pairs of overlapping MNIST digits; see the module docstring for the recipe and the splits.

    Each sample: `image` float [3, S, S] in [0, 1] (S = image_size), `classification` int64 (the top-left digit's
    class) and `right` int64 (the bottom-right digit's class). Sample i of a split depends only on
    (seed, split, i) and the MNIST files.
    """

    def __init__(self, split: str, root: str, transforms: Callable | None = None, download: bool = False,
                 seed: int = 0, val_size: int = 10000, canvas: int = 36, offset: int = 6, jitter: int = 0,
                 image_size: int = 28):
        if split not in SPLITS:
            raise UserError(f"multimnist: unknown split {split!r}; valid splits are {', '.join(SPLITS)}")
        images, labels = load_mnist(Path(root).expanduser(), split != "test", download)
        digit = images.shape[-1]
        if not (0 <= offset <= canvas - digit and jitter >= 0 and image_size >= 1):
            raise UserError(f"multimnist: need 0 <= offset <= canvas - {digit} (the digit size), jitter >= 0 and "
                            f"image_size >= 1; got canvas={canvas}, offset={offset}, jitter={jitter}, "
                            f"image_size={image_size}")
        self.pool = split_pool(len(images), split, int(val_size))
        self.images, self.labels = images, labels
        self.canvas, self.offset, self.image_size = int(canvas), int(offset), int(image_size)
        rng = np.random.default_rng([int(seed), SPLITS.index(split)])
        self.partners = self.pool[rng.integers(len(self.pool), size=len(self.pool))]
        shifts = rng.integers(-jitter, jitter + 1, size=(len(self.pool), 2, 2))
        corners = np.array([[0, 0], [offset, offset]])
        self.corners = np.clip(corners + shifts, 0, canvas - digit)  # [N, digit (left, right), (row, column)]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.pool)

    def sources(self, index: int) -> tuple[int, int]:
        """Indices into MNIST's file of the left and the right digit of sample `index`."""
        return int(self.pool[index]), int(self.partners[index])

    def pair(self, index: int) -> tuple[np.ndarray, int, int]:
        """(uint8 [S, S] image, left label, right label) of sample `index`."""
        left, right = self.sources(index)
        (left_at, right_at) = (tuple(c) for c in self.corners[index])
        image = compose_pair(self.images[left], self.images[right], left_at, right_at, self.canvas, self.image_size)
        return image, int(self.labels[left]), int(self.labels[right])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, left, right = self.pair(index)
        grey = torch.from_numpy(image).float().div(255)
        sample = {"image": tv_tensors.Image(grey.expand(3, -1, -1).clone()),
                  "classification": torch.tensor(left, dtype=torch.int64),
                  "right": torch.tensor(right, dtype=torch.int64)}
        if self.transforms is not None:
            sample = self.transforms(sample)
        return plain(sample)
