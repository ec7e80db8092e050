"""SIGKILL inside a checkpoint write and right after a save (twice), then resume=auto: the final last.pt equals an
uninterrupted run's bit for bit. Two trials of scripts/kill_resume.py on a smaller run, each run a fork of this
process (a real process to kill, without the interpreter's start-up)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).parents[1] / "scripts" / "kill_resume.py"
RUN = [*TINY_RUN, "data.dataset.scenes={train:32,val:8,test:8}", "trainer.max_epochs=2",  # 4 batches an epoch
       "trainer.checkpoint_every_n_steps=1", "data.num_workers=0", "trainer.progress=plain"]


def script():
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_killed_inside_a_write_and_after_saves_then_resumed_ends_bit_identical(tmp_path):
    kr = script()
    run = [*RUN, kr.FLIP]
    straight = kr.straight_run(run, tmp_path, launch=kr.Forked, timeout=120)
    assert kr.load(straight.last)["step"] == 8 and straight.saves  # last.pt after each of the 8 steps

    plans = [[kr.Kill("writing", n=2)], [kr.Kill("saved", n=2), kr.Kill("saved", n=3)]]
    trials = [kr.run_trial(i, kills, run, tmp_path, straight.last, launch=kr.Forked, timeout=120)
              for i, kills in enumerate(plans)]

    for trial in trials:
        assert trial.identical and not trial.unreadable, trial.row()
        assert [ended.killed for _, ended in trial.kills] == [True] * len(trial.kills), trial.row()
        assert "fresh" not in trial.resumed, trial.row()  # each restart began from a checkpoint, not from scratch
    assert trials[1].resumed[1].startswith("e1/")  # the second kill came after the first epoch's end

    changed = kr.load(straight.last)
    name = next(iter(changed["model"]))
    changed["model"][name] = torch.nextafter(changed["model"][name], torch.tensor(float("inf")))  # one ulp up
    assert kr.differences(kr.load(straight.last), changed) == [f"model {name}"]  # the comparison can fail
