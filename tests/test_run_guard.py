"""What is checked before a run writes anything: types and ranges of the config, the output folder, the lock."""

from __future__ import annotations

import fcntl

import pytest

from conftest import TINY_RUN
from mtl_cli.guard import LOCK, RunLock

BAD_VALUES = [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc'", "an integer of at least 1"),
    ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5", "an integer of at least 1"),
    ("optimizer.lr=abc", "optimizer.lr='abc'", "a number greater than 0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1", "a number greater than 0"),
    ("seed=abc", "seed='abc'", "an integer of at least 0"),
    ("trainer.grad_clip=abc", "trainer.grad_clip='abc'", "a number greater than 0 or null"),
    ("scheduler=step scheduler.step_size=0", "scheduler.step_size=0", "an integer of at least 1"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0", "an integer of at least 1 or null"),
    ("trainer.limit_val_batches=-3", "trainer.limit_val_batches=-3", "an integer of at least 1 or null"),
    ("data.dataset.scenes.train=0", "data.dataset.scenes.train=0", "an integer of at least 1"),
    ("data.batch_size=0", "data.batch_size=0", "an integer of at least 1"),
    ("data.num_workers=-1", "data.num_workers=-1", "an integer of at least 0"),
    ("trainer.val_every=0", "trainer.val_every=0", "an integer of at least 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5", "an integer of at least 1 or null"),
    ("logger.log_every=0", "logger.log_every=0", "an integer of at least 1"),
    ("trainer.precision=64", "trainer.precision=64", "one of 32, bf16, 16"),
    ("trainer.log_grad_conflicts=maybe", "trainer.log_grad_conflicts='maybe'", "true or false"),
]


@pytest.mark.parametrize("override, named, expected", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_a_bad_value_is_one_line_before_any_run_dir(mtl_main, tmp_path, override, named, expected):
    r = mtl_main("train", *override.split(), "hydra.run.dir=run")
    assert r.status == 2, r
    assert r.err.strip() == f"mtl train: error: {named} is not valid: expected {expected}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_a_bad_value_in_a_resumed_checkpoint_config_is_named(tiny_run, mtl_main, tmp_path):
    """The schema also holds for the config a resume rebuilds (checkpoint + overrides)."""
    r = mtl_main("train", f"resume={tiny_run / 'checkpoints' / 'last.pt'}", "data.batch_size=-2",
                 "hydra.run.dir=resumed")
    assert r.status == 2 and "data.batch_size=-2 is not valid" in r.err, r


def test_a_split_smaller_than_a_batch_is_refused(mtl_main):
    r = mtl_main("train", *TINY_RUN, "data.batch_size=64", "hydra.run.dir=run")
    assert r.status == 2 and "16 samples, fewer than data.batch_size=64" in r.err, r


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_output_folder_that_cannot_be_made_is_one_line(mtl_main, tmp_path, where):
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "a_file" / "run" if where == "under_a_file" else "/proc/mtl_run"
    r = mtl_main("train", *TINY_RUN, f"hydra.run.dir={run_dir}")
    assert r.status == 2, r
    assert r.err.startswith(f"mtl train: error: hydra.run.dir='{run_dir}' cannot be") and r.err.count("\n") == 1
    assert "Traceback" not in r.err + r.out


def test_a_read_only_folder_is_one_line(mtl_main, tmp_path, monkeypatch):
    """As root a chmod does not stop writes, so the refusal of the file system is simulated where it is asked."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    r = mtl_main("train", *TINY_RUN, "hydra.run.dir=ro/run")
    assert r.status == 2 and "refuses new files (Read-only file system)" in r.err, r
    assert not (tmp_path / "ro").exists()


def test_a_second_run_in_a_live_run_dir_refuses(mtl_main, tmp_path):
    held = RunLock(tmp_path / "run")  # a live run holds the lock (this process, another open file: still exclusive)
    try:
        r = mtl_main("train", *TINY_RUN, "hydra.run.dir=run")
    finally:
        held.release()
    assert r.status == 2 and "is in use by a running mtl command" in r.err, r
    assert not (tmp_path / "run" / ".hydra").exists()  # the live run's record was not touched
    assert mtl_main("train", *TINY_RUN, "hydra.run.dir=run").status == 0  # once it ends, the dir is free


def test_the_lock_is_held_during_the_run_and_dropped_after(mtl_main, tmp_path, monkeypatch):
    import mtl_cli.train as train_module

    seen = []
    real_train = train_module.train

    def probing_train(cfg, run_dir, checkpoint=None):
        with open(run_dir / LOCK) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        return real_train(cfg, run_dir, checkpoint)
    monkeypatch.setattr(train_module, "train", probing_train)
    assert mtl_main("train", *TINY_RUN, "hydra.run.dir=run").status == 0
    assert seen == ["held"]
    with open(tmp_path / "run" / LOCK) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again


def test_a_fresh_run_never_overwrites_a_run_dir_with_checkpoints_but_resume_auto_continues(mtl_main, tmp_path):
    assert mtl_main("train", *TINY_RUN, "hydra.run.dir=run").status == 0
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    again = mtl_main("train", *TINY_RUN, "hydra.run.dir=run")
    assert again.status == 2 and "resume=auto" in again.err, again
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    auto = mtl_main("train", *TINY_RUN, "resume=auto", "trainer.max_epochs=2", "hydra.run.dir=run")
    assert auto.status == 0 and "resumed from" in auto.out and "at epoch 1" in auto.out, auto
    fresh = mtl_main("train", *TINY_RUN, "resume=auto", "hydra.run.dir=new")  # nothing to resume: a fresh start
    assert fresh.status == 0 and "resumed from" not in fresh.out
