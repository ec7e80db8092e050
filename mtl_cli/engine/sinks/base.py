"""What every sink shares: the calls it answers, its package check, and the run's name in a tracker."""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import torch

from mtl_cli.errors import UserError


class Sink(ABC):
    """Receives what the run logs; what a tool has no place for is dropped (the defaults below). `shows_images`:
    whether `images` is worth the validation's example predictions."""

    shows_images = False

    @abstractmethod
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        ...

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        pass

    def close(self, status: str) -> None:
        """status: finished, failed, or killed (stopped by a signal or Ctrl-C; resumable)."""


def require(module: str, extra: str) -> ModuleType:
    """The tracker's package, or one UserError saying how to install it (before the run trains)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"logger={extra} needs the package {module}, which cannot be imported ({e}): install it "
                        f"with pip install \"mtl-cli[{extra}]\", or choose another logger") from None


def run_name(run_dir: Path) -> str:
    """The run directory as typed (outputs/<date>/<time>_<name>, multirun/.../<job>): unique, and it says where the
    files are. Relative to the working directory when below it."""
    path = Path(os.path.relpath(run_dir))
    return str(Path(run_dir).resolve() if path.parts[:1] == ("..",) else path)
