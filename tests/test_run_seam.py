"""The run seam: mid-epoch checkpoints and an exact resume from them, stopping on a scheduler's signal, and
non-finite losses. In-process through cli.main; a real SIGTERM to this process stands in for the scheduler."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from conftest import TINY_RUN

pytestmark = pytest.mark.usefixtures("one_thread")

FLIP = "data.transforms.train=[{_target_: torchvision.transforms.v2.RandomHorizontalFlip}]"
RUN = [*TINY_RUN, "data.dataset.scenes={train:40,val:8,test:8}", "trainer.max_epochs=2", FLIP]  # 5 batches/epoch


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def same(a, b) -> None:
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM):
    """Sends `signum` to this process once the run has taken `step` optimizer steps."""
    import mtl_cli.train as recipe

    real = recipe.train_step

    def step_then_signal(run, batch):
        real(run, batch)
        if run.state.step == step:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(recipe, "train_step", step_then_signal)
    return real


@pytest.mark.parametrize("weighting", ["ew", pytest.param("pcgrad", marks=pytest.mark.slow)])
def test_sigterm_mid_epoch_saves_and_resume_auto_ends_bit_identical(mtl_main, tmp_path, monkeypatch, weighting):
    assert mtl_main("train", *RUN, f"weighting={weighting}", "hydra.run.dir=straight").status == 0
    real = signal_at_step(monkeypatch, 7)  # epoch 2, batch 2
    stopped = mtl_main("train", *RUN, f"weighting={weighting}", "hydra.run.dir=run")
    assert stopped.status == 128 + signal.SIGTERM, stopped
    assert stopped.err.strip().startswith("mtl train: stopped by SIGTERM at epoch 2, batch 2, step 7: saved ")
    assert "resume=auto" in stopped.err and stopped.err.count("\n") == 1
    saved = weights(tmp_path / "run")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 2, 7)
    monkeypatch.setattr("mtl_cli.train.train_step", real)
    resumed = mtl_main("train", *RUN, f"weighting={weighting}", "resume=auto", "hydra.run.dir=run")
    assert resumed.status == 0 and "batch 2 of the epoch" in resumed.out, resumed
    same(weights(tmp_path / "straight"), weights(tmp_path / "run"))


def test_sigusr2_saves_then_reaches_the_handler_that_requeues_and_no_sigterm_handler_is_called(mtl_main, tmp_path,
                                                                                                monkeypatch):
    """hydra/launcher=slurm: submitit requeues the job in its SIGUSR2 handler. The run takes the signal first
    (finishes the step, saves last.pt, closes its loggers), then hands it on; another handler of SIGTERM (torch
    elastic's, left by a launch) is never handed a stop."""
    calls = []

    def requeue(number, frame):
        calls.append((number, (tmp_path / "run" / "checkpoints" / "last.pt").is_file()))
    before = {signum: signal.signal(signum, requeue) for signum in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        signal_at_step(monkeypatch, 3, signal.SIGUSR2)
        r = mtl_main("train", *RUN, "hydra.run.dir=run")
        assert r.status == 128 + signal.SIGUSR2 and "stopped by SIGUSR2" in r.err, r
        assert calls == [(signal.SIGUSR2, True)]  # once, after last.pt was written
        signal_at_step(monkeypatch, 6, signal.SIGTERM)
        assert mtl_main("train", *RUN, "resume=auto", "hydra.run.dir=run").status == 128 + signal.SIGTERM
        assert calls == [(signal.SIGUSR2, True)]
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_checkpoints_every_n_steps_inside_the_epoch(mtl_main, tmp_path, monkeypatch):
    from mtl_cli.engine import state as state_module

    saved = []
    real_save = state_module.TrainState.save

    def recording_save(self, path):
        saved.append((path.name, self.epoch, self.batch, self.step))
        real_save(self, path)
    monkeypatch.setattr(state_module.TrainState, "save", recording_save)
    assert mtl_main("train", *RUN, "trainer.checkpoint_every_n_steps=2", "hydra.run.dir=run").status == 0
    inside = [s for s in saved if s[0] == "last.pt" and s[2] != 0]
    assert inside == [("last.pt", 0, 2, 2), ("last.pt", 0, 4, 4), ("last.pt", 1, 1, 6), ("last.pt", 1, 3, 8)]


@pytest.mark.slow  # a longer variant; the default run checks the same more cheaply
def test_a_resume_from_a_mid_epoch_checkpoint_of_data_multi_with_workers_is_exact(mtl_main, tmp_path, monkeypatch):
    multi = ["experiment=digits_multi", "data.members.scenes.dataset.scenes={train:24,val:8,test:8}",
             "data.members.counts.dataset.scenes={train:16,val:8,test:8}", "data.members.scenes.dataset.image_size=32",
             "data.members.counts.dataset.image_size=32", "data.batch_size=8", "data.num_workers=2",
             "trainer.max_epochs=2", "trainer.progress=none", "logger=console"]
    assert mtl_main("train", *multi, "hydra.run.dir=straight").status == 0
    real = signal_at_step(monkeypatch, 6, signal.SIGUSR1)
    assert mtl_main("train", *multi, "hydra.run.dir=run").status == 128 + signal.SIGUSR1
    monkeypatch.setattr("mtl_cli.train.train_step", real)
    assert mtl_main("train", *multi, "resume=auto", "hydra.run.dir=run").status == 0
    same(weights(tmp_path / "straight"), weights(tmp_path / "run"))


def test_a_nan_loss_stops_the_run_and_keeps_finite_checkpoints(mtl_main, tmp_path):
    """A run driven to NaN by a huge learning rate, resumed from a sound first epoch: it stops with one line and
    exit status 1, and its checkpoints load and hold finite weights."""
    assert mtl_main("train", *RUN, "trainer.max_epochs=1", "hydra.run.dir=run").status == 0
    r = mtl_main("train", *RUN, "resume=auto", "optimizer.lr=1e30", "hydra.run.dir=run")
    assert r.status == 1, r
    line = r.err.strip()
    assert line.startswith("mtl train: error: step ") and "NaN or infinite" in line and line.count("\n") == 0
    assert "the loss of" in line or "the gradient is" in line
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), name
    assert not (tmp_path / "run" / "metrics.json").read_text().count("NaN")


def test_skip_counts_the_nonfinite_steps_and_stops_after_the_patience(mtl_main, tmp_path, monkeypatch):
    import mtl_cli.train as recipe

    real = recipe.NonFinitePolicy.allows
    calls = []

    def poisons_steps_3_and_4(self, state, losses, norm, last):
        calls.append(1)
        if len(calls) in (3, 4):
            name = next(iter(losses))
            losses = {**losses, name: losses[name] * float("nan")}
        return real(self, state, losses, norm, last)
    monkeypatch.setattr(recipe.NonFinitePolicy, "allows", poisons_steps_3_and_4)
    r = mtl_main("train", *RUN, "trainer.nonfinite=skip", "logger.log_every=1", "hydra.run.dir=run")
    assert r.status == 0 and "skipped (1 so far" in r.out and "skipped (2 so far" in r.out, r
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["skipped_steps"] == 2 and record["steps"] == 8  # 10 batches, 2 of them without an update

    calls.clear()
    stopped = mtl_main("train", *RUN, "trainer.nonfinite=skip", "trainer.nonfinite_patience=2",
                       "hydra.run.dir=run2")
    assert stopped.status == 1 and "2 steps in a row" in stopped.err, stopped


def test_a_run_never_writes_a_checkpoint_of_nonfinite_weights(tmp_path):
    from mtl_cli.engine.state import NonFinite, TrainState

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    state = TrainState(cfg=None, model=model, tasks={}, weighting=None, optimizer=None, scheduler=None, scaler=None)
    with pytest.raises(NonFinite, match="no longer finite"):
        state.save(tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists()


def test_a_checkpoint_from_before_sinks_folds_and_objectives_evaluates_and_resumes(mtl_main, tmp_path, tiny_run):
    """Configs saved before this version lack logger.sinks (they say logger.tensorboard), data.folds/fold/fold_seed
    and objectives: mtl eval and a resume read them as they were, unfolded and logging to TensorBoard."""
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    config = yaml.safe_load(checkpoint["config"])
    config["logger"] = {"_target_": "mtl_cli.engine.logger.Logger", "_partial_": True, "tensorboard": True,
                        "log_every": 20, "images": 4}
    for key in ("folds", "fold", "fold_seed"):
        del config["data"][key]
    del config["objectives"]
    checkpoint["config"] = yaml.safe_dump(config, sort_keys=False)
    torch.save(checkpoint, tmp_path / "old.pt")
    r = mtl_main("eval", "ckpt=old.pt", "hydra.run.dir=eval")
    assert r.status == 0, r
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert record["metrics"]["segmentation"] == trained["final"]["metrics"]["segmentation"]
    r = mtl_main("train", "resume=old.pt", "trainer.max_epochs=2", "hydra.run.dir=resumed")
    assert r.status == 0, r
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"] == 2
    assert list((tmp_path / "resumed").glob("events.out.tfevents.*"))
