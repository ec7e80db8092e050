"""Command-line overrides applied on top of a config saved in a checkpoint (for mtl eval and resume=).

Hydra composes the command line against the packaged defaults; the run's real config is the one in the
checkpoint. Each override the user typed is replayed onto it: a key (data.split=test) takes the composed value,
a config group (data=..., tasks=[...]) replaces that whole node, ~key deletes.
"""

from __future__ import annotations

from collections.abc import Iterable

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict


def apply_overrides(saved: DictConfig, composed: DictConfig, overrides: Iterable[str], groups: Iterable[str]
                    ) -> DictConfig:
    """saved + the user's `overrides` (strings as typed), taking values from the Hydra-`composed` config."""
    cfg = saved.copy()
    groups = set(groups)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra.") or override.package is not None:
            continue
        with open_dict(cfg):
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if isinstance(node, DictConfig) and leaf in node:
                    del node[leaf]
            elif key in groups:
                if key in composed:  # a group with its own node; packages elsewhere (experiment) cannot be replayed
                    cfg[key] = composed[key]
            else:
                OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return cfg
