"""The `mtl` command: picks the subcommand and hands the rest of the command line to Hydra.

User mistakes (a bad option or key, a missing file, a checkpoint from elsewhere) end with one message on stderr
and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys

from mtl_cli import __version__
from mtl_cli.errors import UserError

COMMANDS = {"train": ("mtl_cli.train", "train a multi-task model (the default config needs no download)"),
            "eval": ("mtl_cli.evaluate", "score a checkpoint: mtl eval ckpt=<run dir>/checkpoints/best.pt")}

USAGE = f"""usage: mtl <command> [group=option ...] [key=value ...] [-m] [--cfg job] [--help]

mtl {__version__}: a config-driven trainer for multi-task learning in computer vision.

commands:
""" + "\n".join(f"  {name:<8}{text}" for name, (_, text) in COMMANDS.items()) + """

Everything after the command is Hydra's: `mtl train --help` lists the config groups and their options,
`mtl train -m weighting=ew,uw seed=0,1` sweeps, `mtl train --cfg job` prints the composed config.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mtl {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail("mtl", f"unknown command {command!r}{suggest(command, COMMANDS)}; commands: {', '.join(COMMANDS)}")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us, so user errors can be told from bugs
    logging.getLogger("hydra.core.utils").addFilter(lambda r: not r.getMessage().startswith("Error executing job"))
    sys.argv = [f"mtl {command}", *rest]
    entry = importlib.import_module(COMMANDS[command][0]).main
    try:
        entry()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `mtl train --help | head`
        return 0
    except Exception as e:  # noqa: BLE001 -- sorted into user errors and bugs right below
        message = user_message(e, command, rest)
        if message is None:
            raise
        return fail(f"mtl {command}", message)
    return 0


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def user_message(e: Exception, command: str, overrides: list[str]) -> str | None:
    """The one-paragraph message for a mistake the user can fix, or None for a bug."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return (f"{group}={option} is not an option of the {group} group{suggest(option, e.options)}; "
                f"options: {', '.join(sorted(e.options))}")
    if isinstance(e, MissingConfigException):
        return str(e).strip()
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
        return f"{key} must be given, e.g. mtl {command} {key}=..." if key else str(e)
    if isinstance(e, InterpolationResolutionError):
        return f"a config value cannot be resolved: {e}"
    return None


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


def run() -> None:
    """The console script."""
    sys.exit(main())
