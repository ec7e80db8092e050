"""Checkpoints: written atomically (temp file, fsync, rename) and read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values only, so loading one cannot run code. It holds the
resolved config as YAML text, so `mtl eval` and `resume=` rebuild exactly the model that was trained.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_cli.errors import UserError

FORMAT = "mtl-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Writes `state` to `path` so that a reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by `save_checkpoint`, or fails with a message saying what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        hint = f"; it holds: {', '.join(sorted(p.name for p in path.glob('*.pt')))}" if path.is_dir() else ""
        raise UserError(f"checkpoint {str(path)!r} does not exist{hint}. Give the path to a best.pt or last.pt "
                        "written by mtl train (in <run dir>/checkpoints/)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch.load trips on (EOFError, KeyError, UnpicklingError, ...)
        first_line = next(iter(str(e).splitlines()), "")[:200]
        raise UserError(f"{str(path)!r} is not a readable mtl checkpoint ({type(e).__name__}"
                        f"{': ' + first_line if first_line else ''}). Give a best.pt or last.pt written by mtl train"
                        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} was not written by mtl train (format {FORMAT} expected): it cannot be "
                        "evaluated or resumed. Give a best.pt or last.pt from an mtl run directory")
    return state


def load_state(module: torch.nn.Module, state: dict[str, Any], what: str) -> None:
    """module.load_state_dict(state), with a mismatch reported as the user's to fix."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = next(iter(str(e).splitlines()[1:2]), str(e))[:300].strip()
        raise UserError(f"the checkpoint's {what} does not fit the {what} this config builds ({detail}). Overrides "
                        "of backbone, architecture, tasks or weighting cannot change a trained model") from None


def rng_state() -> dict[str, Any]:
    """The state of every random generator, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
