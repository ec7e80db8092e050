"""Where the run happens: seeding, the device, mixed precision, the config a checkpoint carries."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtl_cli.errors import UserError
from mtl_cli.overrides import apply_overrides
from mtl_cli.paths import config_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device


def pick_device(name: str) -> torch.device:
    """"auto" takes cuda, then mps, then cpu; anything else is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name!r} but no CUDA GPU is available here; use trainer.device=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"trainer.device={name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                        f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"trainer.device={name!r} but MPS is not available here; use trainer.device=auto or cpu")
    return device


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of trainer.precision: "32" (none), "bf16" or "16" (fp16, CUDA only)."""
    precision = str(precision)
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16":
        if device.type != "cuda":
            raise UserError(f"trainer.precision=16 (fp16 with gradient scaling) needs a CUDA GPU, not {device.type}; "
                            "use trainer.precision=bf16 or 32")
        return torch.autocast("cuda", dtype=torch.float16)
    raise UserError(f"trainer.precision={precision!r} is not one of 32, bf16, 16")


def config_from_checkpoint(checkpoint: dict, composed: DictConfig) -> DictConfig:
    """The config saved in `checkpoint`, with the overrides typed on this command line applied on top.

    The saved config names classes to build (`_target_`), so a checkpoint from elsewhere could make us call any
    function: only classes that the configs of this installation (or the user's own -cd folder) name are built,
    unless the user vouches for the checkpoint with +trust_checkpoint=true.
    """
    saved = OmegaConf.create(checkpoint["config"])
    hydra_cfg = HydraConfig.get()
    cfg = apply_overrides(saved, composed, hydra_cfg.overrides.task, groups=hydra_cfg.runtime.choices)
    unknown = sorted(targets(OmegaConf.to_container(cfg, resolve=True)) - known_targets(hydra_cfg))
    if unknown and not cfg.get("trust_checkpoint", False):
        raise UserError(f"the checkpoint's config would build {', '.join(unknown)}, which no config of this "
                        "installation names; a checkpoint from elsewhere could run code this way, so it is not "
                        "built. If you trust its author, add +trust_checkpoint=true")
    return cfg


def targets(node) -> set[str]:
    """Every `_target_` value in a plain (container) config."""
    if isinstance(node, dict):
        found = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return found.union(*(targets(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(targets(v) for v in node))
    return set()


def known_targets(hydra_cfg) -> set[str]:
    """The `_target_`s named by the YAML files Hydra composes from here: ours and the user's -cd folders."""
    folders = {config_dir()} | {Path(s.path) for s in hydra_cfg.runtime.config_sources if s.schema == "file"}
    return set().union(*(targets(yaml.safe_load(f.read_text())) for d in folders for f in Path(d).rglob("*.yaml")))
