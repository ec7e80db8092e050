"""User errors: a bad config, a missing file, a checkpoint from elsewhere. They end with one message on stderr and
exit status 2, no traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import difflib
import functools
import re
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """Something the user can correct; the message says what is wrong and what would be right."""


def reports_user_errors(command: str) -> Callable:
    """Wraps a Hydra task function: a user error inside the job prints its message and exits 2 (Hydra would
    otherwise report it as a failed job with a traceback)."""
    def wrap(task: Callable) -> Callable:
        @functools.wraps(task)
        def run(*args, **kwargs):
            try:
                return task(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- sorted into user errors and bugs right below
                message = user_message(e, command, [])
                if message is None:
                    raise
                print(f"mtl {command}: error: {message}", file=sys.stderr)
                raise SystemExit(2) from None
        return run
    return wrap


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def user_message(e: Exception, command: str, overrides: list[str]) -> str | None:
    """The message for a mistake the user can fix, or None for a bug."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException):
        match = re.search(r"'([\w/]+)/([\w.\-]+)'", str(e))
        if match:
            group, option = match.groups()
            options = e.options or group_options(group)
            return (f"{group}={option} is not an option of the {group} group{suggest(option, options)}; "
                    f"options: {', '.join(sorted(options))}")
        return str(e).strip().splitlines()[0]
    if isinstance(e, ConfigCompositionException):
        match = re.search(r"Could not override '([^']+)'", str(e))
        if match and "not in struct" in f"{e} {e.__cause__}":
            key = match.group(1)
            return (f"{key} is not a key of the config{suggest_key(key, command, overrides)}. "
                    f"To add a new key, write +{key}=...; `mtl {command} --cfg job` prints every key")
        return str(e).strip().splitlines()[0] + (f" ({e.__cause__})" if e.__cause__ else "")
    if isinstance(e, OverrideParseException):
        return f"cannot read the override: {str(e).strip()}"
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", "") or ""
        return f"{key} must be given, e.g. mtl {command} {key}=..." if key else str(e).splitlines()[0]
    if isinstance(e, InterpolationResolutionError):
        return f"a config value cannot be resolved: {str(e).splitlines()[0]}"
    return None


def group_options(group: str) -> list[str]:
    from mtl_cli.paths import config_dir

    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def suggest_key(key: str, command: str, overrides: list[str]) -> str:
    """A 'did you mean' for a mistyped key, from the keys of its parent in the config composed without it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    from mtl_cli.paths import config_dir

    parent, _, leaf = key.rpartition(".")
    kept = [o for o in overrides if not o.startswith("-") and o.split("=", 1)[0].lstrip("+~") != key]
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("eval" if command == "eval" else "train", overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except Exception:  # noqa: BLE001 -- the suggestion is a courtesy; the main message stands without it
        return ""
    return suggest(leaf, list(node.keys())) if isinstance(node, DictConfig) else ""
