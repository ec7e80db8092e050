"""Several processes (torch.distributed, gloo on the CPU): 2 ranks x half the batch give what 1 process gives with
the whole batch, for loss-based and gradient methods with both gradient targets; sharded scoring gives the
single-process scores; the CLI runs, resumes across world sizes and fails as one."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

import ranks_worker
from test_configs import compose_cfg

SIZE = ["data.dataset.scenes={train:40,val:9,test:8}", "data.dataset.image_size=32", "data.batch_size=8",
        "backbone.widths=[8,16,16,16]", "optimizer=sgd"]
# SGD: Adam's first steps are nearly sign(g), which turns the last-digit differences of a sum taken in another order
# into differences of the learning rate's size wherever a gradient is about 0.
CASES = [("ew", "params"), ("uw", "params"), ("pcgrad", "params"), ("pcgrad", "representation"),
         ("mgda", "params"), ("mgda", "representation"), ("cagrad", "params"), ("cagrad", "representation"),
         ("nash_mtl", "params"), ("nash_mtl", "representation")]


def config(weighting: str, target: str) -> str:
    overrides = [*SIZE, f"weighting={weighting}"]
    if weighting not in ("ew", "uw"):
        overrides.append(f"weighting.grad_target={target}")
    return OmegaConf.to_yaml(compose_cfg(overrides))


def on_two_ranks(jobs: list[tuple[str, str]]) -> list[dict]:
    """`jobs` run by two processes that torch's launcher starts; rank 0's results."""
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id="test", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    return elastic_launch(launch, ranks_worker.rank_main)(jobs)[0]


@pytest.fixture(scope="module")
def two_ranks():
    """Every case's steps, and the scores, on two ranks: one launch for all of them."""
    jobs = [("train_steps", config(*case)) for case in CASES] + [("scores", config("ew", "params"))]
    results = on_two_ranks(jobs)
    return dict(zip(CASES, results)), results[-1]


def close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("case", CASES, ids=[f"{w}-{t}" for w, t in CASES])
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
