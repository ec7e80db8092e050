"""Joint augmentation: torchvision.transforms.v2 on samples of tv_tensors, plus the two dense targets v2 lacks.

A sample is a dict: `image` a tv_tensors.Image, masks tv_tensors.Mask, boxes tv_tensors.BoundingBoxes, depth a
`Depth` and normals a `Normals` (below); plain tensors (class labels, landmarks) pass through untouched. Any v2
transform then moves every dense target with the image, with the right interpolation for each: bilinear for the
image and the normals, nearest for masks and depth.

Two facts v2 cannot know, registered here as kernels of the two types:
- Depth under a crop resized back up (`resized_crop`, hence RandomResizedCrop and `RandomScaleCrop`): zooming
  in by s brings the scene s times closer, so depth is divided by s (the convention of the MTAN release).
- Normals under a flip: a horizontal flip negates the x component, a vertical flip the y component (camera
  frame, x right, y up). Rotations, affine and perspective warps would need the vectors rotated too: refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mtl_cli.errors import UserError


class Depth(tv_tensors.Mask):
    """Depth [1, H, W] (metres, 0 = invalid): moved like a mask (nearest), divided by the zoom of a crop."""


class Normals(tv_tensors.TVTensor):
    """Surface normals [3, H, W] (unit vectors, all-zero = invalid): cropped, padded and resized (bilinear) like an
    image, flips negate x or y; colour transforms (jitter, normalisation, grayscale) leave them alone."""


def _like_image(kernel):
    def normals_kernel(normals: Normals, *args, **kwargs):
        return tv_tensors.wrap(kernel(normals.as_subclass(torch.Tensor), *args, **kwargs), like=normals)
    return normals_kernel


for _functional, _kernel in ((F.resize, F.resize_image), (F.crop, F.crop_image), (F.center_crop, F.center_crop_image),
                             (F.resized_crop, F.resized_crop_image), (F.pad, F.pad_image)):
    F.register_kernel(_functional, Normals)(_like_image(_kernel))


@F.register_kernel(F.resized_crop, Depth)
def _resized_crop_depth(depth: Depth, top: int, left: int, height: int, width: int, size: list[int], **kwargs):
    out = F.resized_crop(depth.as_subclass(tv_tensors.Mask), top, left, height, width, size, **kwargs)
    out_h, out_w = out.shape[-2:]
    zoom = math.sqrt(out_h / height * out_w / width)
    return tv_tensors.wrap(out.as_subclass(torch.Tensor) / zoom, like=depth)


def _negate(normals: Normals, channel: int) -> torch.Tensor:
    out = normals.as_subclass(torch.Tensor).clone()
    out[..., channel, :, :] = -out[..., channel, :, :]
    return out


@F.register_kernel(F.horizontal_flip, Normals)
def _horizontal_flip_normals(normals: Normals):
    return tv_tensors.wrap(_negate(normals, 0).flip(-1), like=normals)


@F.register_kernel(F.vertical_flip, Normals)
def _vertical_flip_normals(normals: Normals):
    return tv_tensors.wrap(_negate(normals, 1).flip(-2), like=normals)


def _refuse(name: str):
    def kernel(normals, *args, **kwargs):
        raise UserError(f"transform {name} would turn the image without turning the surface normals; use flips, "
                        "crops and scales with normals (or drop the normals task)")
    return kernel


for _functional in (F.rotate, F.affine, F.perspective, F.elastic):
    F.register_kernel(_functional, Normals)(_refuse(_functional.__name__))


class RandomScaleCrop(v2.Transform):
    """The dense-prediction augmentation of the MTAN release: pick a scale s from `scales`, crop a random window
    of size (H/s, W/s) and resize it back to (H, W). Depth is divided by s (through its resized_crop kernel)."""

    def __init__(self, scales: Sequence[float] = (1.0, 1.2, 1.5)):
        super().__init__()
        if not scales or min(scales) < 1:
            raise UserError(f"RandomScaleCrop: scales={list(scales)} must be a non-empty list of values >= 1")
        self.scales = [float(s) for s in scales]

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        scale = self.scales[int(torch.randint(len(self.scales), ()))]
        h, w = round(height / scale), round(width / scale)
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w, "size": [height, width]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(F.resized_crop, inpt, **params, antialias=True)


def compose(transforms: Sequence | None) -> v2.Compose | None:
    """The instantiated list of one split's transforms as one callable, or None for no transform."""
    if not transforms:
        return None
    return v2.Compose(list(transforms))


def split_transforms(declared: Mapping | DictConfig | None, split: str):
    """The transforms declared for `split` (`data.transforms.<split>`); splits not named use `val`'s."""
    if not declared:
        return None
    return declared.get(split, declared.get("val"))


def plain(sample: Mapping) -> dict:
    """The sample with every tv_tensor turned back into a plain tensor (boxes keep their type for detection)."""
    return {key: value if isinstance(value, tv_tensors.BoundingBoxes) or not isinstance(value, torch.Tensor)
            else value.as_subclass(torch.Tensor) for key, value in sample.items()}
