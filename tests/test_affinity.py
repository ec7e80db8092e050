"""Task affinity (TAG: Fifty et al., "Efficiently Identifying Task Groupings in Multi-Task Learning", NeurIPS 2021):
the lookahead affinities against a hand computation, the probe leaving no trace, the network selection against a
brute force over every cover, and the command line end to end."""

import copy
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mtl_cli.analysis.affinity import lookahead_affinity
from mtl_cli.analysis.grouping import onto, partitions, propose
from conftest import TINY_RUN

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["a", "b"]


class TwoTaskLinear(nn.Module):
    """h = W x (shared), prediction_t = a_t . h (task t's head)."""

    def __init__(self, w: np.ndarray, heads: np.ndarray):
        super().__init__()
        self.shared = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.heads = nn.ModuleDict({t: nn.Linear(w.shape[0], 1, bias=False) for t in TASKS})
        with torch.no_grad():
            self.shared.weight.copy_(torch.from_numpy(w))
            for t, a in zip(TASKS, heads):
                self.heads[t].weight.copy_(torch.from_numpy(a)[None])

    def shared_parameters(self):
        return self.shared.parameters()

    def forward(self, x):
        h = self.shared(x)
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def mse_losses(model, x, y):
    return lambda: {t: ((model(x)[t] - y[k]) ** 2).mean() for k, t in enumerate(TASKS)}


def hand_affinity(w, heads, x, y, lr, adam_eps=None):
    """Z(i -> j) in float64: the gradient of task i's MSE with respect to W is (2/B) a_i (X^T r_i); the step is
    plain SGD, or Adam's first step from an empty state (its bias-corrected moments are g and g^2)."""
    def loss(weights, j):
        return np.mean((x @ weights.T @ heads[j] - y[j]) ** 2)
    z = np.zeros((2, 2))
    for i in range(2):
        residual = x @ w.T @ heads[i] - y[i]
        g = 2 / len(x) * np.outer(heads[i], x.T @ residual)
        moved = w - lr * (g if adam_eps is None else g / (np.abs(g) + adam_eps))
        for j in range(2):
            z[i, j] = 1 - loss(moved, j) / loss(w, j)
    return z


def problem(scale: float, task_b_scale: float):
    rng = np.random.default_rng(0)
    w, heads = rng.normal(size=(3, 4)) * 0.5, rng.normal(size=(2, 3))
    x = rng.normal(size=(16, 4)) * scale
    y = np.stack([rng.normal(size=16) * scale, rng.normal(size=16) * scale * task_b_scale])
    return (w.astype(np.float32), heads.astype(np.float32), x.astype(np.float32), y.astype(np.float32))


SCALES = {"unit": (1.0, 1.0), "badly scaled": (1e3, 1e3)}  # inputs x1e3, and task b's targets x1e3 more


@pytest.mark.parametrize("scales", SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize("update", ["sgd", "torch SGD", "torch Adam"])
def test_lookahead_equals_the_hand_computation(scales, update):
    w, heads, x, y = problem(*scales)
    model = TwoTaskLinear(w, heads)
    adam = update == "torch Adam"
    lr = 0.01 if adam else 0.05 / scales[0] ** 2 / (1 + (scales[1] > 1) * 1e3)  # a step of a sensible size
    optimizer = None if update == "sgd" else torch.optim.Adam(model.parameters(), lr=lr) if adam else \
        torch.optim.SGD(model.parameters(), lr=lr)
    z = lookahead_affinity(model, mse_losses(model, torch.from_numpy(x), torch.from_numpy(y)), TASKS, lr, optimizer)
    ref = hand_affinity(*(a.astype(np.float64) for a in (w, heads, x, y)), lr, adam_eps=1e-8 if adam else None)
    assert np.abs(ref).max() > 1e-3  # the steps move the losses: the comparison means something
    np.testing.assert_allclose(z.numpy(), ref, rtol=2e-4, atol=1e-5)


class Noisy(nn.Module):
    """Batch norm (statistics the probe's forwards update) and dropout (draws they make) in the shared part."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def shared_parameters(self):
        return self.trunk.parameters()

    def forward(self, x):
        h = self.trunk(x)
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def train_step(model, optimizer, x, y):
    losses = mse_losses(model, x, y)()
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_the_probe_restores_parameters_buffers_gradients_optimizer_and_generators(optimizer_class):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(2, 16)
    model = Noisy()
    optimizer = optimizer_class(model.parameters(), lr=0.1, **({"momentum": 0.9} if optimizer_class is
                                                              torch.optim.SGD else {}))
    train_step(model, optimizer, x, y)  # optimizer state and .grad as the loop leaves them before the next step
    twin = copy.deepcopy(model)
    twin_optimizer = optimizer_class(twin.parameters(), lr=0.1, **({"momentum": 0.9} if optimizer_class is
                                                                   torch.optim.SGD else {}))
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # shares no tensor
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    moments = copy.deepcopy(optimizer.state_dict())
    generator = torch.get_rng_state()

    first = lookahead_affinity(model, mse_losses(model, x, y), TASKS, 0.1, optimizer)
    second = lookahead_affinity(model, mse_losses(model, x, y), TASKS, 0.1, optimizer)

    assert torch.isfinite(first).all() and torch.equal(first, second)  # the same dropout masks each time
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # running stats included
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    after = optimizer.state_dict()
    assert after["param_groups"] == moments["param_groups"]
    for key, state in moments["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][key][n])) for n, v in state.items())
    assert torch.equal(torch.get_rng_state(), generator)
    for m, o in ((model, optimizer), (twin, twin_optimizer)):  # the next step: the same with and without the probe
        torch.set_rng_state(generator)
        train_step(m, o, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_a_task_missing_from_the_batch_leaves_its_row_and_column_unmeasured():
    w, heads, x, y = problem(1.0, 1.0)
    model = TwoTaskLinear(w, heads)
    only_a = lambda: {"a": ((model(torch.from_numpy(x))["a"] - torch.from_numpy(y[0])) ** 2).mean()}  # noqa: E731
    z = lookahead_affinity(model, only_a, TASKS, 0.01)
    assert math.isfinite(z[0, 0]) and all(math.isnan(z[i, j]) for i, j in ((0, 1), (1, 0), (1, 1)))


# the network selection

def cover_score(z, groups):
    return sum(max(onto(z, g, j) for g in groups if j in g) for j in range(len(z)))


def brute_force(z, k, disjoint):
    """The best score over every set of at most k groups covering the tasks (disjoint: partitions into k)."""
    n = len(z)
    groups = [g for size in range(1, n + 1) for g in itertools.combinations(range(n), size)]
    best = -math.inf
    for count in ([k] if disjoint else range(1, k + 1)):
        for chosen in itertools.combinations(groups, count):
            members = [j for g in chosen for j in g]
            if set(members) != set(range(n)) or (disjoint and len(members) != n):
                continue
            best = max(best, cover_score(z, chosen))
    return best


def test_grouping_finds_the_known_best_split():
    z = [[0.9, 0.5, -0.2, -0.2],  # z[i][j] = Z(i -> j): {0, 1} help each other, and so do {2, 3}
         [0.4, 0.8, -0.1, -0.3],
         [-0.2, -0.2, 0.7, 0.3],
         [-0.1, -0.3, 0.6, 0.9]]
    for disjoint in (True, False):
        best = propose(z, 2, disjoint=disjoint)[0]
        assert best.groups == ((0, 1), (2, 3))
        assert best.score == pytest.approx(0.4 + 0.5 + 0.6 + 0.3)
        assert best.onto == pytest.approx((0.4, 0.5, 0.6, 0.3))


@pytest.mark.parametrize("disjoint", [True, False], ids=["partitions", "covers"])
def test_grouping_is_the_exhaustive_optimum(disjoint):
    rng = np.random.default_rng(1)
    for n in (3, 4, 4, 4, 5):
        z = rng.normal(size=(n, n)).tolist()
        for k in range(1, min(n, 3) + 1):
            found = propose(z, k, disjoint=disjoint, top=50)
            assert found[0].score == pytest.approx(brute_force(z, k, disjoint), abs=1e-12)
            assert all(cover_score(z, g.groups) == pytest.approx(g.score) for g in found)
            assert [g.score for g in found] == sorted((g.score for g in found), reverse=True)
            assert all(len(g.groups) <= k and set(itertools.chain(*g.groups)) == set(range(n)) for g in found)


def test_overlapping_groups_can_beat_a_partition():
    z = [[0.0, 0.5, 0.5],  # task 0 helps both others, which hurt each other
         [0.0, 0.0, -0.9],
         [0.0, -0.9, 0.0]]
    assert propose(z, 2, disjoint=False)[0].groups == ((0, 1), (0, 2))
    assert propose(z, 2, disjoint=False)[0].score == pytest.approx(1.0)
    assert propose(z, 2, disjoint=True)[0].score == pytest.approx(0.5)


def test_ties_go_to_fewer_task_slots_then_to_the_earlier_groups():
    zero = [[0.0] * 3 for _ in range(3)]
    ranked = propose(zero, 2, disjoint=False, top=10)
    assert [g.groups for g in ranked[:3]] == [((0,), (1, 2)), ((0, 1), (2,)), ((0, 2), (1,))]
    assert all(sum(map(len, g.groups)) > 3 for g in ranked[3:])
    assert propose(zero, 2, disjoint=True)[0].groups == ((0,), (1, 2))


def test_partitions_into_k_blocks_are_each_listed_once():
    found = [tuple(map(tuple, p)) for p in partitions(list(range(6)), 3)]
    assert len(found) == len(set(found)) == 90  # the Stirling number S(6, 3)
    assert all(sorted(itertools.chain(*p)) == list(range(6)) and len(p) == 3 for p in found)


# the command line

def test_a_run_with_affinity_trains_as_without_and_mtl_affinity_proposes_groups(mtl_main, tmp_path, tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    ran = mtl_main("train", *TINY_RUN, "logger=tensorboard", "trainer.task_affinity.every=1", f"hydra.run.dir={run}")
    assert ran.status == 0, ran
    section = json.loads((run / "metrics.json").read_text())["task_affinity"]
    tasks = section["tasks"]
    assert tasks == ["segmentation", "depth", "normals", "count"] and section["measured_steps"] == 2
    assert np.isfinite(np.array(section["mean"])).all() and section["epochs"][0]["fraction_of_step"] > 0
    assert section["mean"] == section["epochs"][0]["affinity"]  # one epoch: the run's mean is that epoch's
    picture = (run / "task_affinity.png").read_bytes()
    assert picture.startswith(b"\x89PNG") and len(picture) > 10_000
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"affinity/{a}->{b}" for a in tasks for b in tasks} <= scalars
    assert "affinity/heatmap" in events.Tags()["images"]
    ours, theirs = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (run, tiny_run))
    for part in ("model", "optimizer"):  # the probe leaves the training trajectory bit-identical
        assert all(torch.equal(a, b) for a, b in zip(tensors(ours[part]), tensors(theirs[part])))

    ran = mtl_main("affinity", str(run), "groups=2")
    assert ran.status == 0, ran
    assert "best grouping into 2 groups" in ran.out and "the top 5 groupings" in ran.out
    best = propose(section["mean"], 2)[0]
    assert " | ".join("{" + ", ".join(tasks[i] for i in g) + "}" for g in best.groups) in ran.out


def tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in tensors(item)]
    return [torch.tensor(float(state))] if isinstance(state, (int, float)) else []


def test_mtl_affinity_on_a_run_without_affinities_names_the_key(mtl_main, tiny_run):
    ran = mtl_main("affinity", str(tiny_run), "groups=2")
    assert ran.status == 2 and "trainer.task_affinity.every" in ran.err and "Traceback" not in ran.err
    ran = mtl_main("affinity", str(tiny_run), "groups=two")
    assert ran.status == 2 and "groups=two" in ran.err


def test_several_processes_are_refused_and_a_resumed_run_keeps_its_measured_epochs(tmp_path):
    from omegaconf import OmegaConf

    from mtl_cli.analysis.affinity import TaskAffinity
    from mtl_cli.engine.logger import Logger
    from mtl_cli.errors import UserError

    cfg = OmegaConf.create({"trainer": {"task_affinity": {"every": 1, "update": "sgd"}}})
    with pytest.raises(UserError, match="trainer.devices=1"):
        TaskAffinity.of(cfg, TASKS, 2, tmp_path, None)
    assert TaskAffinity.of(OmegaConf.create({"trainer": {"task_affinity": {"every": None}}}), TASKS, 1, tmp_path,
                           None) is None
    first = TaskAffinity.of(cfg, TASKS, 1, tmp_path, None)
    for epoch, value in ((1, 0.1), (2, 0.3)):  # two epochs of one measurement each, nan where b never met a
        first.sums[:], first.counts[:], first.measured = [[value, 0], [0, value]], [[1, 0], [0, 1]], 1
        first.epoch_end(epoch, 2 * epoch, Logger(tmp_path))
    assert first.section()["mean"][0][0] == pytest.approx(0.2) and math.isnan(first.section()["mean"][0][1])
    resumed = TaskAffinity.of(cfg, TASKS, 1, tmp_path, 1)  # from a checkpoint written after epoch 1
    assert [e["epoch"] for e in resumed.epochs] == [1] and resumed.section()["mean"][0][0] == pytest.approx(0.1)
