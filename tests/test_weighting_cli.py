"""Every weighting option through `mtl train` (in this process): one sweep over all of them, and exact resume of
stateful ones."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from test_cli import TASKS, TINY, ok, run_dirs, scalar_tags

from mtl_cli.paths import config_dir
from mtl_cli.weighting.base import GradientWeighting

OPTIONS = sorted(p.stem for p in (config_dir() / "weighting").glob("*.yaml"))
# The default run sweeps a loss-based and a gradient method (test_configs builds and steps every option); -m slow
# sweeps them all.
SAMPLE = ["uw", "pcgrad"]
STEPS = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger.log_every=1"]
# two steps of every method, also of those that read three batches per step (MoDo, SDMGrad)
TWO_STEPS = [*STEPS, "data.batch_size=8", "trainer.limit_train_batches=6", "trainer.max_steps=2"]


def is_gradient_method(option: str) -> bool:
    target = OmegaConf.load(config_dir() / "weighting" / f"{option}.yaml")["_target_"]
    return issubclass(get_class(target), GradientWeighting)


@pytest.mark.parametrize("swept", [SAMPLE, pytest.param(OPTIONS, marks=pytest.mark.slow)], ids=["sample", "all"])
def test_one_sweep_trains_every_weighting_and_logs_its_weights(mtl_main, tmp_path, swept):
    ok(mtl_main("train", "-m", f"weighting={','.join(swept)}", *TINY, *TWO_STEPS))  # in tmp_path
    dirs = run_dirs(tmp_path / "multirun")
    assert len(dirs) == len(swept)
    for run_dir in dirs:
        option = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")[0].removeprefix("weighting=")
        tags = scalar_tags(run_dir)
        assert {f"train/weight/{t}" for t in TASKS} <= tags, option
        assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2, option
        conflicts = {f"grad/norm/{t}" for t in TASKS} | {"grad/cos/segmentation-depth", "grad/cos/normals-count"}
        if is_gradient_method(option):
            assert conflicts | {"grad/solver_failures"} <= tags, option
        else:
            assert not any(tag.startswith("grad/") for tag in tags), option


def test_loss_based_methods_log_gradient_conflicts_when_asked(mtl_main, tmp_path):
    ok(mtl_main("train", "weighting=uw", "trainer.log_grad_conflicts=true", *TINY, *STEPS,
                f"hydra.run.dir={tmp_path / 'run'}"))
    tags = scalar_tags(tmp_path / "run")
    assert {f"grad/norm/{t}" for t in TASKS} | {"grad/cos/depth-normals"} <= tags


@pytest.mark.parametrize("option", ["famo", *[pytest.param(o, marks=pytest.mark.slow) for o in ("gradvac", "nash_mtl")]])
def test_resuming_a_stateful_method_gives_the_uninterrupted_run(mtl_main, tmp_path, option):
    args = [*TINY, f"weighting={option}", "trainer.limit_train_batches=2", "logger=console"]
    ok(mtl_main("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(mtl_main("train", *args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'short'}"))
    ok(mtl_main("train", f"resume={tmp_path / 'short' / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=2",
                f"hydra.run.dir={tmp_path / 'resumed'}"))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2 and a["weighting"].keys() == b["weighting"].keys()
    for part in ("weighting", "model"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"


@pytest.mark.parametrize("override, expected", [
    ("+weighting.grad_every=3", "grad_every=3 must be 1"),  # pcgrad's coefficients are not loss weights to reuse
    ("weighting.grad_target=pixels", "does not support grad_target='pixels'; it allows: params, representation"),
])
def test_an_option_the_method_does_not_allow_is_one_clear_error(mtl_main, tmp_path, override, expected):
    result = mtl_main("train", "weighting=pcgrad", override, *TINY)  # in tmp_path
    assert result.status == 2 and expected in result.err and "Traceback" not in result.err
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("target", ["params", "representation"])
def test_a_gradient_method_trains_under_bf16_autocast(mtl_main, tmp_path, target):
    """The rows of G are float32 whatever the autocast dtype of the features; the update goes back in theirs."""
    ok(mtl_main("train", "weighting=pcgrad", f"weighting.grad_target={target}", "trainer.precision=bf16", *TINY,
                *STEPS, f"hydra.run.dir={tmp_path / 'run'}"))
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert all(value == value for value in final["loss"].values())  # no NaN
    assert {"grad/cos/segmentation-depth", "train/weight/count"} <= scalar_tags(tmp_path / "run")
