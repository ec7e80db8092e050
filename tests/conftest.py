"""Fixtures shared by the test modules."""

import pytest
import torch


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


@pytest.fixture
def mtl_main(tmp_path, monkeypatch, capsys):
    """Runs `mtl <argv>` in this process (cli.main) in a fresh working directory, tmp_path; returns a Ran.
    Faster than a subprocess by the interpreter's and torch's start-up: use it for errors, composition and
    resume equivalence, and keep subprocesses for what needs a process boundary."""
    import sys

    from mtl_cli.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main sets sys.argv for Hydra

    def run(*argv: str) -> Ran:
        capsys.readouterr()
        try:
            status = main(list(argv))
        except SystemExit as e:  # Hydra's own exits (--help, a parse error it reports itself)
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return Ran(status, out, err)
    return run


TINY_RUN = ["data.dataset.scenes={train:16,val:8,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
            "trainer.max_epochs=1", "trainer.progress=none", "logger=console"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The run directory of one tiny default training run, made in this process; tests copy, never edit it."""
    import os
    import sys

    from mtl_cli.cli import main

    folder = tmp_path_factory.mktemp("tiny_run")
    cwd, argv = os.getcwd(), list(sys.argv)
    try:
        os.chdir(folder)
        assert main(["train", *TINY_RUN, f"hydra.run.dir={folder / 'run'}"]) == 0
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return folder / "run"
