"""Files the run writes: a full disk said in one line with nothing saved lost, killed writers' temp files cleared,
the folder fsynced after the rename, strict JSON records, Ctrl-C in one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN
from mtl_cli.engine import atomic
from mtl_cli.engine.checkpoint import save_checkpoint
from mtl_cli.engine.records import write_record
from mtl_cli.errors import UserError


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def fills_the_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(UserError, match=r"^the disk is full: could not write .*last\.pt .*MiB free.*the previous "
                                        r"file there is intact"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_torch_saves_own_wrapping_of_a_failed_write_is_understood(tmp_path, monkeypatch):
    """torch.save reports a write that failed inside its zip writer as a RuntimeError raised while handling the
    OSError: still the disk's fault, said as such."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(atomic, "open", lambda p, mode: Full(real_open(p, mode)), raising=False)
    with pytest.raises(UserError, match="the disk is full"):
        save_checkpoint({"weights": torch.zeros(10_000)}, tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_mid_training_ends_in_one_line_and_keeps_the_saved_checkpoints(mtl_main, tmp_path, monkeypatch):
    saves = []
    real_save = torch.save

    def full_after_two(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 2:  # best.pt and last.pt of epoch 1 go through; epoch 2 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_after_two)
    r = mtl_main("train", *TINY_RUN, "trainer.max_epochs=2", "hydra.run.dir=run")
    assert r.status == 2 and r.err.startswith("mtl train: error: the disk is full: could not write "), r
    assert r.err.count("\n") == 1 and "Traceback" not in r.err + r.out
    monkeypatch.setattr(torch, "save", real_save)
    for name in ("best.pt", "last.pt"):
        assert torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)["epoch"] == 1
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_leftover_temp_files_of_killed_writers_are_removed_and_the_folder_is_fsynced(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for pid in (12345, 999999):
        (folder / f".last.pt.{pid}.tmp").write_bytes(b"half a checkpoint")
    (folder / ".unrelated.tmp").write_bytes(b"not ours")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    save_checkpoint({"epoch": 3}, folder / "last.pt")
    assert sorted(p.name for p in folder.iterdir()) == [".unrelated.tmp", "last.pt"]
    assert synced[-1] == str(folder.resolve())  # the rename reaches the disk


def test_records_are_strict_json_with_nonfinite_values_marked(tmp_path):
    path = tmp_path / "metrics.json"
    write_record(path, {"final": {"loss": {"depth": float("nan"), "total": float("inf")},
                                  "metrics": {"depth": {"abs_err": 0.5}}}, "values": [1.0, float("-inf")]})
    record = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["final"]["loss"] == {"depth": None, "total": None}
    assert record["final"]["metrics"]["depth"]["abs_err"] == 0.5 and record["values"] == [1.0, None]
    assert record["nonfinite"] == ["final.loss.depth", "final.loss.total", "values[1]"]


@pytest.mark.slow  # a longer variant; the default run checks the same more cheaply
def test_ctrl_c_is_one_line_naming_the_last_checkpoint(tmp_path):
    """A real SIGINT through the console script: one line on stderr, exit status 130."""
    mtl = str(Path(sys.executable).with_name("mtl"))
    args = [mtl, "train", "data.dataset.scenes={train:64,val:8,test:8}", "data.dataset.image_size=32",
            "data.batch_size=8", "trainer.max_epochs=50", "trainer.progress=plain", "logger=console",
            f"hydra.run.dir={tmp_path / 'run'}"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip() == f"mtl train: interrupted; the last checkpoint is {last}: continue with mtl train resume={last}"
