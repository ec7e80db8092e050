"""DualProj.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232, 2024 (as a baseline of
UPGrad, in the authors' library torchjd).
"""

import torch

from mtl_cli.weighting.upgrad import UPGrad


class DualProj(UPGrad):
    """The mean gradient projected onto the dual cone of the task gradients (the directions that conflict with
    none): c = argmin_{v >= 1/T} v^T M v. UPGrad projects each task's gradient and sums; DualProj projects their
    mean once. Equal to the mean gradient when no task conflicts with it. The Gramian's normalisation, reg_eps (with
    its cap on a small task's ridge) and norm_eps are UPGrad's (torchjd's defaults with norm_eps=1e-4); heads get
    their own task's gradient."""

    @staticmethod
    def projected(tasks: int) -> torch.Tensor:
        return torch.full((1, tasks), 1 / tasks, dtype=torch.float64)
