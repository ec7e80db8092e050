"""Where the run happens: seeding, the device, mixed precision, the config a checkpoint carries."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_cli.errors import UserError
from mtl_cli.overrides import apply_overrides
from mtl_cli.paths import config_dir

log = logging.getLogger("mtl")


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


TRUST_FLAG = "trust_checkpoint"
TRUST_ENV = "MTL_TRUST_CHECKPOINT"


def config_from_checkpoint(checkpoint: dict, composed: DictConfig, typed: list[str] | None = None,
                           groups=None, config_sources=None) -> DictConfig:
    """The config saved in `checkpoint`, with the overrides typed on this command line applied on top.

    The saved config names classes to build (`_target_`), so a checkpoint from elsewhere could make us call any
    function: only classes that the configs of this installation (or the user's own -cd folder) name are built,
    unless the person at the keyboard vouches for the checkpoint (`user_trusts`). Nothing stored in the checkpoint
    can widen what is built or written: see `distrust`.
    """
    if typed is None:  # the Hydra values of this job, unless the caller passes them in
        hydra_cfg = HydraConfig.get()
        typed, groups = list(hydra_cfg.overrides.task), hydra_cfg.runtime.choices
        config_sources = hydra_cfg.runtime.config_sources
    saved = distrust(OmegaConf.create(checkpoint["config"]), typed)
    cfg = without_trust(apply_overrides(saved, composed, typed, groups=groups or {}))
    unknown = sorted(targets(OmegaConf.to_container(cfg, resolve=True)) - known_targets(config_sources or []))
    if unknown and not user_trusts(typed):
        raise UserError(f"the checkpoint's config would build {', '.join(unknown)}, which no config of this "
                        "installation names; a checkpoint from elsewhere could run code this way, so it is not "
                        f"built. If you trust its author, add +{TRUST_FLAG}=true to this command line (or set "
                        f"{TRUST_ENV}=1)")
    return cfg


def user_trusts(typed: list[str]) -> bool:
    """Whether the person at the keyboard vouches for the checkpoint: +trust_checkpoint=true typed on this command
    line, or MTL_TRUST_CHECKPOINT=1 in the environment. Never a value read from a config."""
    if os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    for override in OverridesParser.create().parse_overrides(list(typed)):
        if override.key_or_group == TRUST_FLAG and not override.is_delete():
            return str(override.value()).strip().lower() in ("true", "1", "yes")
    return False


def without_trust(cfg: DictConfig) -> DictConfig:
    """`cfg` without the trust flag: a vouch holds for one command line and is never saved with a run."""
    if TRUST_FLAG in cfg:
        with open_dict(cfg):
            del cfg[TRUST_FLAG]
    return cfg


def distrust(saved: DictConfig, typed: list[str]) -> DictConfig:
    """The saved config, less what would widen what may be built or written if a checkpoint could set it: a
    stored trust flag is dropped (and reported), and every `download` switch is off unless typed on this command
    line (a download writes files where the checkpoint says)."""
    if TRUST_FLAG in saved:
        log.warning(f"the checkpoint's config sets {TRUST_FLAG}, which only the command line (or {TRUST_ENV}) may "
                    "set: ignored")
        saved = without_trust(saved)
    typed_keys = {o.split("=", 1)[0].lstrip("+~") for o in typed}
    for path in download_switches(saved):
        if path not in typed_keys and OmegaConf.select(saved, path, throw_on_resolution_failure=False) is not False:
            OmegaConf.update(saved, path, False, force_add=True)
    return saved


def download_switches(node, prefix: str = "") -> list[str]:
    """The dotted paths of every `download` key in `node`."""
    if not isinstance(node, DictConfig):
        return []
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key == "download":
            found.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found += download_switches(child, path + ".")
    return found


def targets(node) -> set[str]:
    """Every `_target_` value in a plain (container) config."""
    if isinstance(node, dict):
        found = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return found.union(*(targets(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(targets(v) for v in node))
    return set()


def known_targets(config_sources) -> set[str]:
    """The `_target_`s named by the YAML files Hydra composes from here: ours and the user's -cd folders."""
    folders = {config_dir()} | {Path(s.path) for s in config_sources if s.schema == "file"}
    found = set()
    for file in (f for d in folders for f in Path(d).rglob("*.yaml")):
        try:
            found |= targets(yaml.safe_load(file.read_text(encoding="utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError) as e:  # Hydra cannot build from it either: it names nothing
            log.warning(f"{file} is not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}): skipped")
    return found
