"""Fixtures shared by the test modules."""

import contextlib
import gc
import io
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker, or the workers fight for the cores
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and in the processes the tests start


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run faster on one thread (and do not fight other processes for the cores); a module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Ran:
    """What one in-process `mtl` command did: its exit status and what it printed."""

    def __init__(self, status: int, out: str, err: str):
        self.status, self.out, self.err = status, out, err

    def __repr__(self) -> str:
        return f"Ran(status={self.status}, err={self.err[-2000:]!r})"


def call_main(argv: list[str]) -> int:
    """cli.main(argv) in this process, with Hydra's own exits (--help, a parse error it reports itself) as a status;
    DataLoader workers a failed run left behind are shut down before the next run."""
    from mtl_cli.cli import main

    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if multiprocessing.active_children():
        stop_workers_left()
    return status


def stop_workers_left():
    """After an in-process run that failed with workers, its loaders' iterators (held by the traceback's frames)
    are left to the garbage collector, whose finalization order makes each worker time out (5 s) before it is
    killed; shutting them down explicitly while they are intact takes no time."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for leftover in [o for o in gc.get_objects() if type(o) is _MultiProcessingDataLoaderIter]:
        leftover._shutdown_workers()


@pytest.fixture
def mtl_main(tmp_path, monkeypatch, capsys):
    """Runs `mtl <argv>` in this process (cli.main) in a fresh working directory, tmp_path; returns a Ran.
    Faster than a subprocess by the interpreter's and torch's start-up: use it for errors, composition and
    resume equivalence, and keep subprocesses for what needs a process boundary."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main sets sys.argv for Hydra

    def run(*argv: str) -> Ran:
        capsys.readouterr()
        status = call_main(argv)
        out, err = capsys.readouterr()
        return Ran(status, out, err)
    return run


def run_mtl(*argv: str, cwd: Path) -> Ran:
    """`mtl <argv>` in this process with `cwd` as the working directory, for fixtures shared by several tests
    (mtl_main serves one test); the working directory and sys.argv are restored after."""
    out, err = io.StringIO(), io.StringIO()
    before, argv_before = os.getcwd(), list(sys.argv)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = call_main(argv)
    finally:
        os.chdir(before)
        sys.argv = argv_before
    return Ran(status, out.getvalue(), err.getvalue())


TINY_RUN = ["data.dataset.scenes={train:16,val:8,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
            "trainer.max_epochs=1", "trainer.progress=none", "logger=console"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The run directory of one tiny default training run, made in this process; tests copy, never edit it."""
    folder = tmp_path_factory.mktemp("tiny_run")
    ran = run_mtl("train", *TINY_RUN, f"hydra.run.dir={folder / 'run'}", cwd=folder)
    assert ran.status == 0, ran
    return folder / "run"
