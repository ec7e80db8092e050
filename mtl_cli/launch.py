"""Several processes for one run: `mtl train trainer.devices=N` starts them through torch's own launcher API
(`torch.distributed.launcher.api.elastic_launch`, the engine of torchrun); under `torchrun ... -m mtl_cli train`
they are torchrun's. Either way rank 0 decides the job (the composed config, the run directory, the checkpoint
to resume: Hydra's timestamped directory would differ per process) and the other ranks receive it; every process
joins the group, takes its device, and runs the same recipe (train.py), which combines the ranks' work at the
points engine/distributed.py names. Only rank 0 writes (TensorBoard, checkpoints, metrics.json, the table); every
rank's warnings and errors reach the console and the run's log."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_cli.engine.signals import REQUEUE_SIGNAL
from mtl_cli.errors import Interrupted, RunFailed, Stopped, UserError

log = logging.getLogger("mtl")
TIMEOUT = timedelta(minutes=30)  # a collective that waits longer than this ends the job (a rank died silently)


@dataclass(frozen=True)
class Job:
    """What every rank runs: `command` ("train" or "eval") on `config` (YAML, unresolved, as a checkpoint keeps
    it) in `run_dir`, resuming from `resume` if set."""
    command: str
    config: str
    run_dir: str
    resume: str | None = None


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def processes(cfg: DictConfig) -> int:
    """How many processes this config asks for: 0 for a plain single-process run."""
    devices, strategy = int(cfg.trainer.get("devices", 1)), cfg.trainer.get("strategy", "auto")
    count = int(os.environ["WORLD_SIZE"]) if under_torchrun() else devices if devices > 1 or strategy == "ddp" else 0
    if count and int(cfg.data.batch_size) % count:  # said before any process starts (train.prepare says it too)
        raise UserError(f"data.batch_size={cfg.data.batch_size} (the global batch) does not split evenly over "
                        f"{count} processes: use a multiple of {count}")
    return count


def distributed(job: Job, count: int):
    """Runs `job` on `count` processes; returns rank 0's result. Called by the Hydra job, on rank 0 under torchrun."""
    if under_torchrun():
        import torch.distributed as dist

        dist.broadcast_object_list([job])  # the followers (`follow`) wait for it
        return execute(job)
    return launch(job, count)


def launch(job: Job, count: int):
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = on_this_machine(count, f"mtl-{os.getpid()}")
    log.info(f"starting {count} process{'es' if count > 1 else ''} (torch.distributed.launcher), one per device")
    try:
        with quiet("torch.distributed.elastic", "torch.multiprocessing"), handlers_kept():  # a failure is told once
            results = elastic_launch(config, worker)(job)
    except SignalException as e:  # SIGTERM/SIGUSR1...: the launcher passed it on; the ranks finished their step
        last = Path(job.run_dir) / "checkpoints" / "last.pt"
        then = signal.getsignal(e.sigval) if e.sigval == getattr(signal, REQUEUE_SIGNAL, None) else None
        raise Stopped(f"stopped by {e.sigval.name}: {last} holds the last step; continue with mtl train "
                      f"resume={last} (or resume=auto hydra.run.dir={job.run_dir})", int(e.sigval), then) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        raise reraised(rank, str(message), failure.exitcode) from None
    return results[0]


def on_this_machine(count: int, run_id: str):
    """torch's launcher config for `count` processes on this machine (torchrun --standalone), no restarts, the
    scheduler's signals passed on to them."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=run_id, rdzv_backend="c10d",
                        rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn",
                        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2")


@contextlib.contextmanager
def handlers_kept():
    """The signal handlers as they were before: torch's launcher installs its own (which raise SignalException)
    and leaves them, so a later job of the same sweep would otherwise meet them."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    numbers = [getattr(signal, name) for name in names if hasattr(signal, name)]
    before = {number: signal.getsignal(number) for number in numbers}
    try:
        yield
    finally:
        for number, handler in before.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(number, handler)


@contextlib.contextmanager
def quiet(*names: str):
    """Only critical messages from these loggers and their children (which set levels of their own)."""
    known = [name for name in logging.root.manager.loggerDict if name.startswith(names)]
    loggers = [logging.getLogger(name) for name in {*names, *known}]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def reraised(rank: int, message: str, exitcode: int) -> BaseException:
    """The error a worker ended with, as this process's own (its traceback, if any, is already on stderr)."""
    kind, _, text = message.partition(": ")
    where = f"rank {rank}: {text}"
    if kind == "Stopped":
        return Stopped(where, exitcode - 128)
    if kind in ("UserError", "RunFailed"):
        return (UserError if kind == "UserError" else RunFailed)(where)
    if kind in ("Interrupted", "KeyboardInterrupt"):
        return Interrupted(where)
    return RuntimeError(f"rank {rank} failed (exit status {exitcode}): {message}; its traceback is above")


def worker(job: Job):
    """One process of `launch`: joins the group, runs the job; ends with the error it met, told as one line."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

    join()
    try:
        return record(execute)(job)
    except (UserError, Stopped, Interrupted) as e:  # the launcher tells the user, as the kind `reraised` knows
        kind = Stopped if isinstance(e, Stopped) else Interrupted if isinstance(e, Interrupted) else \
            RunFailed if isinstance(e, RunFailed) else UserError
        ErrorHandler().record_exception(e if kind is Stopped else kind(str(e)))
        status = 128 + e.signal if isinstance(e, Stopped) else 130 if isinstance(e, Interrupted) else e.status
        sys.exit(status)
    finally:
        leave()


def follow() -> int:
    """A rank other than 0 under torchrun: runs each job rank 0 sends (one, or a sweep's in turn) until it sends
    None. Its errors end the process, and torchrun ends the others."""
    import torch.distributed as dist

    join()
    try:
        while True:
            message = [None]
            dist.broadcast_object_list(message)
            if message[0] is None:
                return 0
            execute(message[0])
    finally:
        leave()


def lead() -> None:
    """Rank 0 under torchrun joins the group before Hydra composes anything (see `release`)."""
    join()


def release() -> None:
    """Rank 0 under torchrun: no more jobs; the followers return."""
    if not under_torchrun():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.broadcast_object_list([None])
        leave()


def execute(job: Job):
    """Runs the job on this rank's device (group joined)."""
    import torch

    from mtl_cli.engine.checkpoint import load_checkpoint

    cfg = OmegaConf.create(job.config)
    device = rank_device(cfg.trainer.device)
    with open_dict(cfg):
        cfg.trainer.device = str(device)
    configure_logging(Path(job.run_dir), job.command)
    if device.type == "cpu":  # the ranks share the cores, and no rank should take them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if job.command == "train":
        from mtl_cli.train import train

        checkpoint = load_checkpoint(job.resume, "resume") if job.resume else None
        return train(cfg, Path(job.run_dir), checkpoint)
    from mtl_cli.evaluate import evaluate_config

    return evaluate_config(cfg, Path(job.run_dir), load_checkpoint(job.resume, "eval"))


def rank_device(name: str):
    """cuda:LOCAL_RANK where the run is on CUDA, else the CPU."""
    import torch

    from mtl_cli.runtime import pick_device

    if pick_device(name).type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name not in ("auto", "cpu"):
        raise UserError(f"trainer.device={name}: several processes run on CUDA GPUs (NCCL) or on the CPU (gloo)")
    return torch.device("cpu")


def join() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def configure_logging(run_dir: Path, command: str) -> None:
    """Rank 0 (unless Hydra set it up in this process): messages on stdout and in the run's log; the other ranks:
    their warnings and errors on stderr and in the same log, marked with their rank."""
    import torch.distributed as dist

    rank = dist.get_rank()
    root = logging.getLogger()
    if rank == 0 and root.handlers:  # torchrun's rank 0 runs inside Hydra, which configured it
        return
    root.handlers.clear()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    run_dir.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(run_dir / f"{command}.log")
    file.setFormatter(logging.Formatter(f"[%(asctime)s][%(levelname)s] {prefix}%(message)s"))
    root.addHandler(console)
    root.addHandler(file)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
