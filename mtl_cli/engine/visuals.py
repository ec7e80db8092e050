"""Predictions and targets as RGB images [N,3,H,W] in [0,1], for TensorBoard."""

import torch
import torch.nn.functional as F


def label_map(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class labels [N,H,W] (or logits [N,C,H,W]) in a fixed colour map; labels outside 0..C-1 are black."""
    labels = x.argmax(1) if x.ndim == 4 else x
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(num_classes, 3, generator=generator) * 0.8 + 0.2
    palette[0] = 0.25  # background grey
    valid = (labels >= 0) & (labels < num_classes)
    rgb = palette.to(labels.device)[labels.clamp(0, num_classes - 1)] * valid.unsqueeze(-1)
    return rgb.permute(0, 3, 1, 2).float()


def depth_map(x: torch.Tensor) -> torch.Tensor:
    """Depth [N,1,H,W] as grey levels, near = bright, scaled per image; invalid (0) is black."""
    x = x.float().clamp(min=0)
    far = x.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
    grey = torch.where(x > 0, 1 - 0.8 * x / far, torch.zeros_like(x))
    return grey.expand(-1, 3, -1, -1)


def normal_map(x: torch.Tensor) -> torch.Tensor:
    """Unit normals [N,3,H,W] as RGB = (n + 1) / 2; invalid (zero) is black."""
    x = x.float()
    valid = x.norm(dim=1, keepdim=True) > 0
    return torch.where(valid, (F.normalize(x, dim=1) + 1) / 2, torch.zeros_like(x))
