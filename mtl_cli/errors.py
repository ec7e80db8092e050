"""User errors: a bad config, a missing file, a checkpoint from elsewhere. They end with one message on stderr and
exit status 2, no traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import difflib
import functools
import itertools
import re
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """Something the user can correct; the message says what is wrong and what would be right. `status` is the
    exit status it ends the command with."""
    status = 2
    kind = "user error"


class RunFailed(UserError):
    """The run itself went wrong in a way the user must look into (a loss that turned NaN): said in one line like a
    user error, exit status 1."""
    status = 1
    kind = "run failed"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where the last checkpoint is."""


class Stopped(BaseException):
    """The run stopped on a scheduler's request (SIGTERM, SIGUSR1, SIGUSR2) after writing last.pt; `signal` is its
    number. A BaseException, so that a sweep stops with it (the whole job is being taken away) instead of going on.
    `then`: the handler the signal had before the run (submitit's requeue), called once the job has wound up."""

    def __init__(self, message: str, signal: int, then=None):
        super().__init__(message)
        self.signal, self.then = signal, then

    def hand_on(self) -> None:
        if callable(self.then):  # Python's own SIG_DFL and SIG_IGN are not callables
            self.then(self.signal, None)


FAILED = "failed.json"  # written into the directory of a sweep's job that failed


def reports_user_errors(command: str) -> Callable:
    """Wraps a Hydra task function: a user error inside the job prints its message and exits 2 (Hydra would
    otherwise report it as a failed job with a traceback). In a sweep, a failed job (user error or crash) is
    recorded in its directory and the sweep goes on: guard.RunGuard names the failures at the end."""
    def wrap(task: Callable) -> Callable:
        @functools.wraps(task)
        def run(*args, **kwargs):
            try:
                return task(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- sorted into user errors and bugs right below
                message = user_message(e, command, [])
                if in_sweep():
                    return record_failure(e, message, command)
                if message is None:
                    raise
                print(f"mtl {command}: error: {message}", file=sys.stderr)
                raise SystemExit(getattr(e, "status", 2)) from None
        return run
    return wrap


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(e: Exception, message: str | None, command: str) -> None:
    """A sweep's job failed: say so (a bug with its traceback) and leave failed.json in the job's directory."""
    import json
    import logging
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    if message is None:
        logging.getLogger("mtl").error(f"job {job.job.num} crashed", exc_info=e)
    else:
        print(f"mtl {command}: error: {message}", file=sys.stderr)
    failure = {"job": job.job.num, "overrides": list(job.overrides.task), "kind": "crash" if message is None
               else getattr(e, "kind", "user error"), "error": message or f"{type(e).__name__}: {e}"}
    (Path(job.runtime.output_dir) / FAILED).write_text(json.dumps(failure, indent=2))
    return None


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def user_message(e: Exception, command: str, overrides: list[str]) -> str | None:
    """The message for a mistake the user can fix, or None for a bug."""
    import yaml
    from hydra.errors import (ConfigCompositionException, MissingConfigException, OverrideParseException,
                              SearchPathException)
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(e, UserError):
        return str(e)
    plugin = missing_plugin(e)
    if plugin is not None:
        return plugin
    if isinstance(e, MissingConfigException):  # the missing one, not the config that asked for it
        match = (re.search(r"Could not (?:find|load) '([\w/]+)/([\w.\-]+)'", str(e))
                 or re.search(r"'([\w/]+)/([\w.\-]+)'", str(e)))
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
        return spaced_value(overrides) or f"cannot read the override: {str(e).strip().splitlines()[0]}"
    if isinstance(e, SearchPathException):
        match = re.search(r"directory '(.*)' not found", str(e))
        folder = match.group(1) if match else str(e)
        return f"-cd {folder}: no such folder; give a folder of your own configs (e.g. -cd ~/my_configs)"
    yaml_error = in_chain(e, yaml.YAMLError)
    if yaml_error is not None:
        return yaml_message(yaml_error)
    if isinstance(e, UnicodeDecodeError) and (path := config_file_being_read(e)) is not None:
        return f"{path} is not a YAML text file (it is not UTF-8 text: byte {e.start}); give a YAML config there"
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", "") or ""
        return f"{key} must be given, e.g. mtl {command} {key}=..." if key else str(e).splitlines()[0]
    if isinstance(e, InterpolationResolutionError):
        return f"a config value cannot be resolved: {str(e).splitlines()[0]}"
    return None


SWEEP_PLUGINS = {  # what the [sweep] extra brings, by the names Hydra gives when one of them is missing
    "optuna": "Hydra's Optuna sweeper", "study_sweeper": "Hydra's Optuna sweeper",
    "joblib": "Hydra's joblib launcher", "submitit_local": "Hydra's submitit launcher",
    "submitit_slurm": "Hydra's submitit launcher", "slurm_launcher": "Hydra's submitit launcher"}


def missing_plugin(e: Exception) -> str | None:
    """A sweeper or launcher preset used without its plugin: Hydra says "Unknown plugin class" (our presets'
    classes are defined only when their plugin is there) or cannot find the plugin's own config (joblib, optuna)."""
    text = str(e)
    wanted = re.search(r"Unknown plugin class : '[\w.]*\.(\w+)\.\w+'"
                       r"|Could not (?:find|load) 'hydra/(?:sweeper|launcher)/(\w+)'", text)
    plugin = SWEEP_PLUGINS.get(next((name for name in wanted.groups() if name), "")) if wanted else None
    return None if plugin is None else f'this sweep needs {plugin}, not installed: pip install "mtl-cli[sweep]"'


def config_file_being_read(e: BaseException) -> str | None:
    """The config file Hydra was reading when `e` was raised: Hydra's FileConfigSource.load_config names it only in
    its local `full_path`, so the traceback's frames are the one place to learn it."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "load_config" and "full_path" in tb.tb_frame.f_locals:
            return str(tb.tb_frame.f_locals["full_path"])
        tb = tb.tb_next
    return None


def in_chain(e: BaseException, kind: type) -> BaseException | None:
    """`e`, or the exception it was raised from or during, that is a `kind`."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def yaml_message(e) -> str:
    """A YAML file that does not parse: its name, line and the problem (yaml's marks count lines from 0)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    where = f"{mark.name} line {mark.line + 1}" if mark is not None else "a config file"
    tabs = "; YAML indents with spaces, not tabs" if "\\t" in problem else ""
    return f"{where} is not valid YAML: {problem}{tabs}"


def load_problem(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one clause, without torch's advice to retry with
    weights_only=False (which would let the file run code)."""
    for line in str(e).splitlines():
        line = line.strip().split("WeightsUnpickler error:")[-1].strip()
        if line and "weights_only" not in line and not line.startswith(("Weights only", "Check the documentation")):
            return f"{type(e).__name__}: {line.split(' Please use')[0][:200]}"  # less the advice to allowlist it
    return type(e).__name__


def spaced_value(overrides: list[str]) -> str | None:
    """When an override's value held an unquoted space, the shell split it into words, and Hydra stumbles on a
    word without '=': say so, and show the override quoted."""
    for i, word in enumerate(overrides[1:], start=1):
        previous = overrides[i - 1]
        if "=" in word or word.startswith(("-", "~")) or "=" not in previous or previous.startswith("-"):
            continue
        rest = list(itertools.takewhile(lambda w: "=" not in w and not w.startswith(("-", "~")), overrides[i:]))
        key, value = previous.split("=", 1)
        quoted = f"{key}=\"{' '.join([value, *rest])}\""
        return (f"{word!r} is not an override (key=value): the value of {key} seems to contain a space, which split "
                f"it into words; quote the whole override: '{quoted}'")
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
