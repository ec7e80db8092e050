"""Checks made before a run or a sweep writes anything, as a Hydra callback (configs/train.yaml: hydra.callbacks).

Hydra calls `on_run_start` after composing the config and before it creates the run directory, so a bad value or
an unwritable output folder ends the command with one line and no directory left behind. The run directory is then
locked for the run's lifetime: a second run given the same `hydra.run.dir` refuses instead of writing into the
first one's checkpoints. The lock is an flock, which the kernel drops when its process dies, so a killed run's
directory can be resumed at once. Imports no torch.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mtl_cli.errors import FAILED, UserError
from mtl_cli.schema import check_config

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

LOCK = ".mtl.lock"
SWEEPS: list[dict] = []  # {"jobs": n, "failures": [failed.json, ...]} per finished sweep, for cli.main
LAST = Path("checkpoints") / "last.pt"


class Refused(BaseException):
    """A UserError raised by a check of RunGuard. Hydra turns an Exception raised in a callback into a warning and
    goes on, so the refusal travels as a BaseException; cli.main reports it as the user error it carries."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


def refuses(hook):
    """Runs a callback hook; a UserError it raises stops the command (as Refused) instead of becoming a warning."""
    @functools.wraps(hook)
    def run(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except UserError as e:
            raise Refused(e) from None
    return run


class RunGuard(Callback):
    def __init__(self) -> None:
        self.locks: list[RunLock] = []

    @refuses
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        check_config(config)
        check_machine(config)
        if config.hydra.job.name == "train" and not config.get("tasks") and not config.get("resume"):
            raise UserError("no task selected: choose some, e.g. tasks=[segmentation,depth]")
        if config.hydra.job.name != "eval" and config.get("robustness") is not None:  # else saved with the run
            raise UserError(f"+robustness=... attacks a trained model in mtl eval, not in mtl {config.hydra.job.name}:"
                            " mtl eval ckpt=<best.pt> +robustness=pgd")
        run_dir = Path(str(config.hydra.run.dir))  # `now` is cached on the config: the dir Hydra will make
        check_writable(run_dir, "hydra.run.dir")
        if config.hydra.job.name == "train" and not config.get("resume") and (run_dir / LAST).is_file():
            raise UserError(f"{str(run_dir)!r} already holds a run's checkpoints, which a new run would overwrite: "
                            f"continue it with resume=auto (or resume={run_dir / LAST}), or give another "
                            "hydra.run.dir")
        self.locks.append(RunLock(run_dir))

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self.release()

    @refuses
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_writable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")

    @refuses
    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:  # a run's own directory was locked in on_run_start
            job_dir = Path(HydraConfig.get().runtime.output_dir)
            self.locks.append(RunLock(job_dir))
            (job_dir / FAILED).unlink(missing_ok=True)  # a record of an earlier sweep in the same folder

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            self.release()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = [set(yaml.safe_load(p.read_text()) or []) for p in sweep_dir.rglob(".hydra/overrides.yaml")]
        shared = set.intersection(*jobs) if jobs else set()
        failures = sorted((json.loads(p.read_text()) for p in sweep_dir.rglob(FAILED)), key=lambda f: f["job"])
        for failure in failures:  # named by what sets the job apart
            failure["overrides"] = [o for o in failure["overrides"] if o not in shared]
        SWEEPS.append({"jobs": len(jobs), "failures": failures})

    def release(self) -> None:
        while self.locks:
            self.locks.pop().release()


def check_machine(config: DictConfig) -> None:
    """trainer.device exists here and trainer.precision runs on it (imports torch: a run needs it anyway)."""
    from mtl_cli.runtime import autocast, pick_device

    autocast(config.trainer.precision, pick_device(config.trainer.device))


def check_writable(folder: Path, key: str) -> None:
    """Fails with one line unless `folder` exists as a writable directory or can be made as one."""
    folder = folder.expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}={str(folder)!r} cannot be created: {str(existing)!r} is a file, not a folder. Give "
                        f"a folder path, e.g. {key}=outputs/my_run")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise UserError(f"{key}={str(folder)!r} cannot be written: {str(existing)!r} refuses new files ({reason}). "
                        f"Give a writable folder, e.g. {key}=outputs/my_run") from None


class RunLock:
    """An exclusive lock on `<run dir>/.mtl.lock`, holding the owner's pid, for as long as the run lives."""

    def __init__(self, run_dir: Path):
        self.file = None
        if fcntl is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"the run directory {str(run_dir)!r} is in use by a running mtl command (pid {owner}): "
                            "two runs would overwrite each other's checkpoints. Give another hydra.run.dir, or wait "
                            "for that run to end") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self.file = handle

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None
