"""Checkpoints: written atomically (temp file, fsync, rename) and read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values only, so loading one cannot run code. It holds the
resolved config as YAML text, so `mtl eval` and `resume=` rebuild exactly the model that was trained.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtl_cli.engine.atomic import write_atomically
from mtl_cli.errors import UserError, load_problem

FORMAT = "mtl-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Writes `state` to `path` so that a reader (or a crash, or a full disk) never sees a half-written file."""
    write_atomically(path, lambda f: torch.save({"format": FORMAT, **state}, f))


# What a checkpoint must hold, and for what: key -> (accepted types, what it is).
CONTENTS: dict[str, tuple[tuple[type, ...], str]] = {
    "config": ((str,), "the run's config as YAML text"),
    "model": ((dict,), "the model's weights"),
    "epoch": ((int,), "the count of epochs done"),
    "step": ((int,), "the count of steps done"),
    "weighting": ((dict,), "the weighting's state"),
    "optimizer": ((dict,), "the optimizer's state"),
    "scheduler": ((dict,), "the learning-rate schedule's state"),
    "scaler": ((dict,), "the gradient scaler's state"),
    "rng": ((dict,), "the random generators' states"),
    "best": ((float, int, type(None)), "the best monitored value"),
    "best_results": ((dict, type(None)), "the validation results of the best epoch"),
    "results": ((dict, type(None)), "the last validation results"),
}
NEEDS = {"eval": ("config", "model", "epoch", "step"),
         "resume": ("config", "model", "weighting", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best",
                    "best_results", "results")}
ARGUMENT = {"eval": "ckpt", "resume": "resume", None: "checkpoint"}  # the command-line key that names the file


def load_checkpoint(path: str | os.PathLike, purpose: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by `save_checkpoint`, or fails with a message saying what is wrong. `purpose`
    ("eval" or "resume") checks that it holds what that needs (NEEDS), in the types save_checkpoint writes."""
    path, argument = Path(path).expanduser(), ARGUMENT[purpose]
    if path.is_dir():
        raise UserError(directory_message(path, argument))
    if not path.is_file():
        raise UserError(f"{argument}={str(path)!r}: the checkpoint file does not exist. Give the path to a best.pt "
                        "or last.pt written by mtl train (in <run dir>/checkpoints/)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch.load trips on (EOFError, KeyError, UnpicklingError, ...)
        raise UserError(f"{str(path)!r} is not a readable mtl checkpoint ({load_problem(e)}). Give a best.pt or "
                        "last.pt written by mtl train") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} was not written by mtl train (format {FORMAT} expected): it cannot be "
                        "evaluated or resumed. Give a best.pt or last.pt from an mtl run directory")
    if purpose is not None:
        check_contents(state, path, purpose)
    return state


def directory_message(path: Path, argument: str) -> str:
    """`path` is a folder: name the .pt files in it and in its checkpoints/ (a run directory), the likeliest first:
    last.pt to resume, best.pt to evaluate."""
    likeliest = "last.pt" if argument == "resume" else "best.pt"
    found = sorted([*path.glob("*.pt"), *path.glob("checkpoints/*.pt")],
                   key=lambda p: (p.parent != path, p.name != likeliest, str(p)))
    if not found:
        return (f"{argument}={str(path)!r} is a directory, not a checkpoint file, and no .pt file exists in it (nor "
                "in its checkpoints/); give the path to a best.pt or last.pt written by mtl train")
    names = ", ".join(str(p.relative_to(path)) for p in found)
    return (f"{argument}={str(path)!r} is a directory: a checkpoint file of that name does not exist. Did you mean "
            f"{str(found[0])!r}? The .pt files in it: {names}")


def check_contents(state: dict[str, Any], path: Path, purpose: str) -> None:
    needed = NEEDS[purpose]
    missing = [key for key in needed if key not in state]
    if missing:
        what = "; ".join(f"{key}: {CONTENTS[key][1]}" for key in missing)
        raise UserError(f"checkpoint {str(path)!r} lacks {', '.join(missing)} ({what}), which "
                        f"{'mtl eval' if purpose == 'eval' else 'a resume'} needs; it holds only "
                        f"{', '.join(sorted(state))}. Give a best.pt or last.pt written by mtl train")
    for key in needed:
        types, what = CONTENTS[key]
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            expected = " or ".join(t.__name__ for t in types if t is not type(None))
            raise UserError(f"checkpoint {str(path)!r}: its {key} ({what}) is of type {type(state[key]).__name__}, "
                            f"expected {expected}; give a best.pt or last.pt written by mtl train")
    try:
        config = yaml.safe_load(state["config"])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}: {e.problem})" if mark is not None else ""
        raise UserError(f"checkpoint {str(path)!r}: its config is not YAML{where}, so the run it holds cannot be "
                        "rebuilt") from None
    if not isinstance(config, dict) or not config:
        kind = "empty" if config is None else f"a {type(config).__name__}"
        raise UserError(f"checkpoint {str(path)!r}: its config is not a mapping of settings (it is {kind}), so the "
                        "run it holds cannot be rebuilt")


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


def set_rng_state(state: dict[str, Any], source: str = "the checkpoint") -> None:
    """Every generator as `rng_state` saved it; a checkpoint from a machine with more GPUs restores the devices this
    one has. `source` names the checkpoint in the error a malformed state gets."""
    try:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        cuda = list(state["cuda"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise UserError(f"{source}: the random generator states are malformed ({type(e).__name__}: "
                        f"{str(e)[:120]}): it was not written by mtl train, or was damaged; resume from another "
                        "checkpoint") from None
    if torch.cuda.is_available() and cuda:
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


class CheckpointSchedule:
    """When last.pt is written inside an epoch (trainer.checkpoint_every_n_steps, trainer.checkpoint_every_minutes;
    either may be null). The epoch's end always writes it."""

    def __init__(self, every_n_steps: int | None, every_minutes: float | None):
        self.steps = int(every_n_steps) if every_n_steps else None
        self.seconds = float(every_minutes) * 60 if every_minutes else None
        self.last_step, self.last_time = None, time.monotonic()

    def due(self, step: int) -> bool:
        if step == self.last_step:  # nothing new since the last save (a batch without labels makes no step)
            return False
        by_steps = self.steps is not None and step % self.steps == 0
        return by_steps or (self.seconds is not None and time.monotonic() - self.last_time >= self.seconds)

    def saved(self, step: int) -> None:
        self.last_step, self.last_time = step, time.monotonic()
