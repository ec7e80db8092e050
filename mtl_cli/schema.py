"""The types and ranges of the config's values, declared once and checked before a run starts.

A value of the wrong type or outside its range (`trainer.max_epochs=abc`, `data.batch_size=0`) is a user error
naming the key, the value and what is expected. Keys a config does not have (a scheduler without `step_size`) are
not checked; a key may name every child of a node with `*` (`data.dataset.scenes.*`). Imports no torch: it runs
before the run directory exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl_cli.errors import UserError


@dataclass(frozen=True)
class Number:
    """An int (or, with `integer=False`, any real number) in [least, most], greater than `above` if given."""
    integer: bool = True
    least: float | None = None
    above: float | None = None
    nullable: bool = False

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.nullable else "a value (null is not allowed)"
        kind = "an integer" if self.integer else "a number"
        wanted = kind + (f" of at least {self.least:g}" if self.least is not None else "") + (
            f" greater than {self.above:g}" if self.above is not None else "") + (" or null" if self.nullable else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return wanted
        if self.integer and not isinstance(value, int):
            return wanted
        if not math.isfinite(value):
            return wanted
        if (self.least is not None and value < self.least) or (self.above is not None and value <= self.above):
            return wanted
        return None


@dataclass(frozen=True)
class Choice:
    """One of `options` (compared as text: `trainer.precision=32` arrives as the int 32)."""
    options: tuple[str, ...]

    def problem(self, value) -> str | None:
        return None if str(value) in self.options else "one of " + ", ".join(self.options)


@dataclass(frozen=True)
class Flag:
    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "true or false"


COUNT = Number(least=1)
OPTIONAL_COUNT = Number(least=1, nullable=True)

RULES: dict[str, Number | Choice | Flag] = {
    "seed": Number(least=0),
    "trainer.max_epochs": COUNT,
    "trainer.max_steps": OPTIONAL_COUNT,
    "trainer.limit_train_batches": OPTIONAL_COUNT,
    "trainer.limit_val_batches": OPTIONAL_COUNT,
    "trainer.val_every": COUNT,
    "trainer.grad_clip": Number(integer=False, above=0, nullable=True),
    "trainer.precision": Choice(("32", "bf16", "16")),
    "trainer.monitor_mode": Choice(("auto", "max", "min")),
    "trainer.progress": Choice(("auto", "bar", "plain", "none")),
    "trainer.log_grad_conflicts": Flag(),
    "trainer.checkpoint_every_n_steps": OPTIONAL_COUNT,
    "trainer.checkpoint_every_minutes": Number(integer=False, above=0, nullable=True),
    "trainer.nonfinite": Choice(("stop", "skip")),
    "trainer.nonfinite_patience": COUNT,
    "trainer.devices": COUNT,
    "trainer.strategy": Choice(("auto", "ddp")),
    "trainer.sync_batchnorm": Flag(),
    "trainer.compile": Flag(),
    "trainer.channels_last": Flag(),
    "trainer.task_affinity.every": OPTIONAL_COUNT,
    "trainer.task_affinity.update": Choice(("optimizer", "sgd")),
    "optimizer.lr": Number(integer=False, above=0),
    "optimizer.weight_decay": Number(integer=False, least=0),
    "optimizer.momentum": Number(integer=False, least=0),
    "scheduler.step_size": COUNT,
    "scheduler.gamma": Number(integer=False, above=0),
    "scheduler.T_max": COUNT,
    "scheduler.eta_min": Number(integer=False, least=0),
    "data.batch_size": COUNT,
    "data.num_workers": Number(least=0),
    "data.dataset.image_size": COUNT,
    "data.dataset.scenes.*": COUNT,
    "data.folds": Number(least=2, nullable=True),
    "data.fold": Number(least=0),
    "data.fold_seed": Number(least=0),
    "data.held_out": Number(integer=False, above=0, nullable=True),
    "data.members.*.batch_size": COUNT,
    "data.members.*.num_workers": Number(least=0),
    "logger.log_every": COUNT,
    "logger.images": Number(least=0),
    "logger.sinks.mlflow.checkpoints": Flag(),
    "logger.sinks.wandb.mode": Choice(("offline", "online", "disabled")),
    "logger.sinks.wandb.images": Flag(),
    "delta_m_average": Choice(("metrics", "tasks")),
}


def check_config(cfg: DictConfig) -> None:
    """Raises a UserError for the first value of `cfg` that breaks RULES."""
    for pattern, rule in RULES.items():
        for key, value in values(cfg, pattern):
            wanted = rule.problem(value)
            if wanted is not None:
                raise UserError(f"{key}={value!r} is not valid: expected {wanted}")
    check_folds(cfg)


def check_folds(cfg: DictConfig) -> None:
    """data.fold names one of the data.folds folds (data/folds.py); without data.folds there is no fold to pick."""
    folds, fold = select(cfg, "data.folds"), select(cfg, "data.fold")
    if folds is _ABSENT or fold is _ABSENT:
        return
    if folds is None and fold:
        raise UserError(f"data.fold={fold} picks a fold of k-fold cross-validation, which data.folds=null turns off: "
                        f"give the number of folds too, e.g. data.folds={max(5, fold + 1)}")
    if folds is not None and fold >= folds:
        raise UserError(f"data.fold={fold} is out of range for data.folds={folds}: use 0..{folds - 1}")


def values(cfg: DictConfig, pattern: str) -> list[tuple[str, object]]:
    """(key, resolved value) for each key of `cfg` that `pattern` names; a key that is absent, unset (???) or
    cannot be resolved yet is left to the code that reads it."""
    head, star, tail = pattern.partition("*")
    if not star:
        return [(pattern, value)] if (value := select(cfg, pattern)) is not _ABSENT else []
    parent = select(cfg, head.rstrip("."))
    if not isinstance(parent, DictConfig):
        return []
    found = []
    for child in parent.keys():
        found += values(cfg, f"{head}{child}{tail}")
    return found


_ABSENT = object()


def select(cfg: DictConfig, key: str):
    """The resolved value at `key`, or _ABSENT when there is none (absent, ???, or not resolvable)."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT)
    except OmegaConfBaseException:
        return _ABSENT
