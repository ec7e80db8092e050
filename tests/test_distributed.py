"""Several processes (torch.distributed, gloo on the CPU): 2 ranks x half the batch give what 1 process gives with
the whole batch, for loss-based and gradient methods with both gradient targets; sharded scoring gives the
single-process scores; the CLI runs, resumes across world sizes and fails as one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.launcher.api import elastic_launch

import ranks_worker
from test_configs import compose_cfg

from mtl_cli.launch import on_this_machine

SIZE = ["data.dataset.scenes={train:40,val:9,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
        "backbone.widths=[8,16,16,16]", "optimizer=sgd"]
# SGD: Adam's first steps are nearly sign(g), which turns the last-digit differences of a sum taken in another order
# into differences of the learning rate's size wherever a gradient is about 0.
CASES = [("ew", "params"), ("uw", "params"), ("pcgrad", "params"), ("pcgrad", "representation"),
         ("mgda", "params"), ("mgda", "representation"), ("cagrad", "params"), ("cagrad", "representation"),
         ("nash_mtl", "params"), ("nash_mtl", "representation")]

DEFAULT_CASES = [("ew", "params"), ("pcgrad", "representation"), ("nash_mtl", "params")]
# (a loss-based method, a gradient method on each target; -m slow: every case)


def config(weighting: str, target: str) -> str:
    overrides = [*SIZE, f"weighting={weighting}"]
    if weighting not in ("ew", "uw"):
        overrides.append(f"weighting.grad_target={target}")
    return OmegaConf.to_yaml(compose_cfg(overrides))


def on_two_ranks(jobs: list[tuple[str, str]]) -> list[dict]:
    """`jobs` run by two processes that torch's launcher starts; rank 0's results."""
    launch = on_this_machine(2, "test")
    return elastic_launch(launch, ranks_worker.rank_main)(jobs)[0]


@pytest.fixture(scope="module")
def two_ranks(request):
    """Every case's steps (the default run's, unless -m selects the slow ones too), and the scores, on two ranks:
    one launch for all of them."""
    cases = DEFAULT_CASES if "not slow" in request.config.getoption("markexpr") else CASES
    jobs = [("train_steps", config(*case)) for case in cases] + [("scores", config("ew", "params"))]
    resumed = config("pcgrad", "params")  # pcgrad draws random orders: the generators must continue too
    one_rank_first = ranks_worker.steps_from(resumed, None, 0, 2)["checkpoint"]
    jobs += [("steps_from", resumed, None, 0, 3), ("steps_from", resumed, one_rank_first, 2, 5)]
    results = on_two_ranks(jobs)
    return dict(zip(cases, results)), results[len(cases)], results[-2:]


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c[0]}-{c[1]}", marks=() if c in DEFAULT_CASES else pytest.mark.slow)
                                  for c in CASES])
def test_two_ranks_with_half_batches_step_as_one_process_with_the_whole_batch(two_ranks, case, one_thread):
    theirs = two_ranks[0][case]
    ours = ranks_worker.train_steps(config(*case))  # one process: no group
    assert len(ours["scalars"]) == len(theirs["scalars"]) == ranks_worker.STEPS
    for step, (mine, other) in enumerate(zip(ours["scalars"], theirs["scalars"])):
        assert mine.keys() == other.keys()
        assert {t for t in mine if t.startswith("train/weight/")}, "the step logs the task weights"
        bad = {t: (mine[t], other[t]) for t in mine if not close(mine[t], other[t])}
        assert not bad, f"step {step + 1}: {bad}"
    for name, value in ours["params"].items():
        torch.testing.assert_close(theirs["params"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    for name, value in ours["weighting"].items():
        torch.testing.assert_close(theirs["weighting"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert ours["moved"] > 1e-3, "the steps changed the weights"


def test_sharded_scoring_gives_the_single_process_scores_of_an_odd_split(two_ranks, one_thread):
    theirs = two_ranks[1]
    ours = ranks_worker.scores(config("ew", "params"))
    assert ours["samples"] == 9 and theirs["samples"] == 5  # rank 0's share of 9: every sample once
    assert ours["loss"].keys() == theirs["loss"].keys()
    for task, value in ours["loss"].items():
        assert close(value, theirs["loss"][task], 1e-6), task
    for task, metrics in ours["metrics"].items():
        for metric, value in metrics.items():
            assert close(value, theirs["metrics"][task][metric], 1e-6), (task, metric)


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_back_as_a_straight_run(two_ranks, one_thread):
    two_first, two_last = two_ranks[2]
    resumed = config("pcgrad", "params")
    straight = ranks_worker.steps_from(resumed, None, 0, 5)["params"]
    one_after_two = ranks_worker.steps_from(resumed, two_first["checkpoint"], 3, 5)["params"]
    for name, value in straight.items():
        torch.testing.assert_close(one_after_two[name], value, atol=1e-5, rtol=1e-5, msg=f"2 then 1 rank: {name}")
        torch.testing.assert_close(two_last["params"][name], value, atol=1e-5, rtol=1e-5, msg=f"1 then 2: {name}")


CLI = [*SIZE, "trainer.max_epochs=1", "trainer.progress=none", "logger=console"]


@pytest.mark.slow  # 25 s; the default run launches two ranks through the same launcher for the equivalence cases
def test_mtl_train_on_two_processes_writes_one_run_dir_that_one_process_resumes(mtl_main, tmp_path):
    ran = mtl_main("train", *CLI, "trainer.devices=2", "hydra.run.dir=two")
    assert ran.status == 0, ran
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".hydra", ".mtl.lock", "checkpoints",
                                                                   "config.yaml", "metrics.json", "train.log"]
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # no directory of another rank
    log = (tmp_path / "two" / "train.log").read_text()
    assert "starting 2 processes" in log and log.count("validation metrics") == 1  # rank 0's table, once
    ran = mtl_main("train", f"resume={tmp_path / 'two/checkpoints/last.pt'}", "trainer.max_epochs=2",
                   "trainer.devices=1", "hydra.run.dir=one")  # a checkpoint of two processes goes on in one
    assert ran.status == 0 and "resumed from" in ran.out and "at epoch 1, step 5" in ran.out, ran


@pytest.mark.slow
def test_mtl_eval_on_two_processes_scores_as_on_one(mtl_main, tmp_path):
    assert mtl_main("train", *CLI, "hydra.run.dir=run").status == 0
    scored = {}
    for devices in (1, 2):
        ran = mtl_main("eval", f"ckpt={tmp_path / 'run/checkpoints/best.pt'}", f"trainer.devices={devices}",
                       f"hydra.run.dir=eval{devices}")
        assert ran.status == 0, ran
        scored[devices] = json.loads((tmp_path / f"eval{devices}" / "eval.json").read_text())
    for task, metrics in scored[1]["metrics"].items():
        for metric, value in metrics.items():
            assert close(value, scored[2]["metrics"][task][metric], 1e-6), (task, metric)


def test_a_batch_that_does_not_split_over_the_processes_is_one_line(mtl_main):
    ran = mtl_main("train", *CLI, "data.batch_size=7", "trainer.devices=2", "hydra.run.dir=run")
    assert ran.status == 2 and "Traceback" not in ran.err, ran
    assert ran.err.strip() == ("mtl train: error: data.batch_size=7 (the global batch) does not split evenly "
                               "over 2 processes: use a multiple of 2")


@pytest.mark.slow
def test_a_sweep_of_two_distributed_jobs(mtl_main, tmp_path):
    ran = mtl_main("train", "-m", *CLI, "trainer.devices=2", "seed=0,1", "hydra.sweep.dir=sweep")
    assert ran.status == 0, ran
    assert sorted(json.loads((tmp_path / f"sweep/{job}/metrics.json").read_text())["final"]["epoch"]
                  for job in (0, 1)) == [1, 1]


@pytest.mark.slow
def test_torchrun_runs_the_same_recipe(tmp_path):
    """torchrun's own processes: rank 0 composes and hands the job on; one run dir."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mtl_cli",
               "train", *CLI, "hydra.run.dir=run"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.slow
def test_sigterm_to_a_run_of_two_processes_saves_the_step_and_resume_auto_goes_on(tmp_path):
    args = [*CLI, "data.dataset.scenes={train:400,val:8,test:8}", "trainer.max_epochs=3", "trainer.devices=2",
            "trainer.progress=plain", "hydra.run.dir=run", "resume=auto"]
    mtl = Path(sys.executable).with_name("mtl")
    started = subprocess.Popen([mtl, "train", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in started.stdout:  # rank 0's progress lines: training is under way
        if "epoch 1/3 step" in line:
            break
    started.send_signal(signal.SIGTERM)
    _, err = started.communicate(timeout=300)
    assert started.returncode == 128 + signal.SIGTERM, err
    assert err.strip().startswith("mtl train: stopped by SIGTERM:") and "resume=auto" in err
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert saved["epoch"] == 0 and 0 < saved["batch"] < 50  # inside the first epoch
    resumed = subprocess.run([mtl, "train", *args, "trainer.max_epochs=1"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at epoch 0, step {saved['step']}, batch {saved['batch']} of the epoch" in (tmp_path / "run/train.log").read_text()
