"""A checkpoint never vouches for itself: only the person at the keyboard can widen what it may build or write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtl_cli.runtime import TRUST_ENV, distrust


class RunsCode:
    """A pickle that would make a folder when unpickled (standing in for any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def craft(run: Path, out: Path, **changes) -> Path:
    """A copy of the run's last.pt whose stored config is changed: dotted key -> value."""
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    cfg = OmegaConf.create(state["config"])
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    state["config"] = OmegaConf.to_yaml(cfg)
    torch.save(state, out)
    return out


def writes_a_file(marker: Path) -> dict:
    return {"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0]}


def unpickles(tmp_path: Path, marker: Path) -> dict:
    bomb = tmp_path / "bomb.pkl"
    torch.save(RunsCode(marker), bomb)
    return {"_target_": "torch.load", "f": str(bomb), "weights_only": False}


@pytest.mark.parametrize("payload", [writes_a_file, unpickles], ids=["writes", "unpickles"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_stored_trust_flag_is_ignored_and_nothing_runs(tiny_run, tmp_path, mtl_main, payload, command):
    marker = tmp_path / "pwned"
    target = payload(marker) if payload is writes_a_file else payload(tmp_path, marker)
    evil = craft(tiny_run, tmp_path / "evil.pt", trust_checkpoint=True, **{"tasks.depth.loss": target})
    if command == "eval":
        r = mtl_main("eval", f"ckpt={evil}", "hydra.run.dir=ev")
    else:
        r = mtl_main("train", f"resume={evil}", "trainer.max_epochs=2", "hydra.run.dir=resumed")
    assert r.status == 2, r
    assert target["_target_"] in r.err and "+trust_checkpoint=true" in r.err and "Traceback" not in r.err
    assert "sets trust_checkpoint" in r.out and "ignored" in r.out  # reported
    assert not marker.exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_the_person_at_the_keyboard_can_vouch_for_a_checkpoint(tiny_run, tmp_path, mtl_main, monkeypatch):
    """An unknown but harmless class runs once the command line (or the environment) vouches for it, and the
    vouch is never saved with the new run."""
    other = craft(tiny_run, tmp_path / "other.pt", **{"tasks.depth.loss": {"_target_": "torch.nn.SmoothL1Loss"}})
    refused = mtl_main("eval", f"ckpt={other}", "hydra.run.dir=ev0")
    assert refused.status == 2 and "torch.nn.SmoothL1Loss" in refused.err
    assert mtl_main("eval", f"ckpt={other}", "+trust_checkpoint=true", "hydra.run.dir=ev1").status == 0
    monkeypatch.setenv(TRUST_ENV, "1")
    assert mtl_main("eval", f"ckpt={other}", "hydra.run.dir=ev2").status == 0
    monkeypatch.delenv(TRUST_ENV)
    r = mtl_main("train", f"resume={other}", "+trust_checkpoint=true", "trainer.max_epochs=2", "hydra.run.dir=res")
    assert r.status == 0, r
    saved = torch.load(tmp_path / "res" / "checkpoints" / "last.pt", weights_only=True)
    assert "trust_checkpoint" not in saved["config"] and "SmoothL1Loss" in saved["config"]
    assert "trust_checkpoint" not in (tmp_path / "res" / "config.yaml").read_text()


def test_a_fresh_run_never_saves_the_trust_flag(tmp_path, mtl_main):
    from conftest import TINY_RUN

    assert mtl_main("train", *TINY_RUN, "+trust_checkpoint=true", "hydra.run.dir=run").status == 0
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert "trust_checkpoint" not in saved["config"]


def test_a_checkpoint_cannot_switch_on_a_download():
    """A download writes files where the config says: a stored switch is off unless typed on the command line."""
    saved = OmegaConf.create({"data": {"download": True, "root": "/x", "dataset": {"download": "${..download}"},
                                       "members": {"a": {"download": True}}}, "trust_checkpoint": True})
    cfg = distrust(saved.copy(), typed=[])
    assert cfg.data.download is False and cfg.data.dataset.download is False
    assert cfg.data.members.a.download is False and "trust_checkpoint" not in cfg
    typed = distrust(saved.copy(), typed=["data.download=true"])
    assert typed.data.download is True and typed.data.dataset.download is False


def test_every_torch_load_of_the_code_is_weights_only():
    sources = (Path(__file__).parents[1] / "mtl_cli").rglob("*.py")
    calls = [(p.name, line) for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
