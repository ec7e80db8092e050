"""The mixtures of experts beyond MMoE and CGC: DSelect-k's gate against a hand computation and its defining
properties (weights on the simplex at any input scale, exactly k experts once trained, its regulariser in the task
losses); PLE's levels (one level is CGC; the trunk is exactly what several tasks reach; a task never depends on
another's last-level experts but does on its lower ones, through the shared gate); exact per-task gradients through
the feature cut for both; and `mtl train` with each."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import ok, run_dirs

from mtl_cli.build import build_model, build_tasks
from mtl_cli.errors import UserError
from mtl_cli.models.base import reached_parameters
from mtl_cli.models.dselect_k import DSelectK, DSelectKGate, smooth_step
from mtl_cli.models.ple import Extraction
from mtl_cli.paths import config_dir
from mtl_cli.weighting.gradients import flat, task_gradients

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32
TWO_STEPS = ["data.dataset.scenes={train:16,val:8,test:8}", f"data.dataset.image_size={SIZE}", "data.batch_size=8",
             "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.progress=none", "logger=console"]


def build(*overrides: str, tasks=("segmentation", "count")):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"tasks=[{','.join(tasks)}]", f"data.dataset.image_size={SIZE}", *overrides])
    torch.manual_seed(0)
    built = build_tasks(cfg)
    return build_model(cfg, built), built


def batch(size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.rand(size, 3, SIZE, SIZE, generator=generator),
            "segmentation": torch.randint(0, 11, (size, SIZE, SIZE), generator=generator),
            "count": torch.randint(0, 5, (size,), generator=generator)}


def ids(modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def test_smooth_step_and_the_gate_match_a_hand_computation():
    t = torch.tensor([-0.7, -0.5, -0.25, 0.0, 0.25, 0.5, 0.7])
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0])  # 1/2 + 3t/2 - 2t^3 at gamma = 1
    torch.testing.assert_close(smooth_step(t, 1.0), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(smooth_step(3 * t, 3.0), expected, rtol=0, atol=1e-7)  # gamma scales t
    gate = DSelectKGate(2, experts=4, k=2)
    with torch.no_grad():
        for layer in (gate.z, gate.w):
            layer.weight.zero_()
        gate.z.bias.copy_(torch.tensor([0.25, -0.25, 0.5, -0.7]))  # selector 1's two bits, then selector 2's
        gate.w.bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # the selectors weigh 3/4 and 1/4
    weights, selectors = gate(torch.randn(3, 2))
    # selector 1: S = (0.84375, 0.15625); expert e = (b1 b2) in binary gets (S or 1-S of bit 1) * (of bit 2)
    first = torch.tensor([0.15625 * 0.84375, 0.15625 * 0.15625, 0.84375 * 0.84375, 0.84375 * 0.15625])
    second = torch.tensor([0.0, 0.0, 1.0, 0.0])  # S = (1, 0): binary 10, expert 2 alone
    torch.testing.assert_close(selectors, torch.stack([first, second]).expand(3, 2, 4), rtol=0, atol=1e-7)
    torch.testing.assert_close(weights, (0.75 * first + 0.25 * second).expand(3, 4), rtol=0, atol=1e-7)


@pytest.mark.parametrize("experts", [2, 3, 4, 5, 8])
def test_gate_weights_lie_on_the_simplex_at_any_input_scale(experts):
    torch.manual_seed(experts)
    gate = DSelectKGate(16, experts=experts, k=2)
    model = SimpleNamespace(entropy=0.0)
    for scale in (1e-4, 1.0, 1e4):  # large inputs saturate the smooth step: the selectors turn binary
        weights, selectors = gate(scale * torch.randn(64, 16))
        assert weights.dtype == torch.float32 and (weights >= 0).all() and (selectors >= 0).all()
        reach = selectors.sum(-1)
        extra = DSelectK.regulariser(model, selectors)
        if experts & (experts - 1) == 0:  # every code names an expert: each selector is a point of the simplex
            torch.testing.assert_close(reach, torch.ones_like(reach))
            torch.testing.assert_close(weights.sum(1), torch.ones(64))
            assert extra == 0
        else:  # codes that name no expert may take weight, which the regulariser charges: 1/reach - 1 each
            assert (reach <= 1 + 1e-6).all()  # (finite where a saturated selector names no expert: reach 0)
            torch.testing.assert_close(extra, (1 / reach.clamp_min(1e-6) - 1).sum(1).mean())
    saturated = selectors[(selectors == 1).any(-1)]
    assert len(saturated) and ((saturated == 0) | (saturated == 1)).all()


def test_the_regulariser_is_the_selectors_entropy_and_zero_once_they_are_binary():
    r = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]]])  # [B=1, k=2, n=3]: the second has found expert 1
    entropy = -(0.5 * math.log(0.5 + 1e-6) + 2 * 0.25 * math.log(0.25 + 1e-6) + math.log(1 + 1e-6))
    value = DSelectK.regulariser(SimpleNamespace(entropy=0.1), r)
    torch.testing.assert_close(value, torch.tensor(0.1 * entropy))  # both sum to 1: no reachability term
    torch.testing.assert_close(DSelectK.regulariser(SimpleNamespace(entropy=0.0), r * 0.8),
                               torch.tensor(2 * (1 / 0.8 - 1)))
    assert DSelectK.regulariser(SimpleNamespace(entropy=1.0), torch.eye(4)[None, [2, 0]]).abs() < 1e-5


def test_a_trained_gate_selects_exactly_k_experts():
    """Eight experts (unit vectors), a target mixing two of them: trained from the paper's initialisation, each
    selector ends on one expert exactly (its smooth steps saturated), so the weights have exactly k = 2 non-zeros."""
    torch.manual_seed(0)
    experts = torch.eye(8)
    target = 0.6 * experts[1] + 0.4 * experts[6]
    gate = DSelectKGate(1, experts=8, k=2)
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    x = torch.ones(1, 1)
    for _ in range(200):
        weights, _ = gate(x)
        optimizer.zero_grad()
        (weights @ experts - target).square().sum().backward()
        optimizer.step()
    weights, selectors = gate(x)
    assert ((selectors == 0) | (selectors == 1)).all()
    assert sorted(selectors[0].argmax(-1).tolist()) == [1, 6]
    assert weights[0].nonzero().flatten().tolist() == [1, 6]
    torch.testing.assert_close(weights[0], target, rtol=0, atol=1e-3)


def test_dselect_k_adds_each_gates_regulariser_to_its_task_loss_and_a_task_reaches_only_its_gate():
    model, tasks = build("architecture=dselect_k", "architecture.experts=3", "architecture.entropy=0.5")
    data = batch()
    outputs, cut = model.train().forward_cut(data["image"])
    assert set(outputs) == set(tasks)  # the selectors sit beside the outputs, not among them
    assert {t: s.shape for t, s in outputs.selectors.items()} == {t: (2, 2, 3) for t in tasks}
    losses = model.task_losses(tasks, outputs, data)
    for name, task in tasks.items():
        plain = task.loss(*task.select(outputs[name], data))
        torch.testing.assert_close(losses[name] - plain, model.regulariser(outputs.selectors[name]))
        assert model.regulariser(outputs.selectors[name]) > 0
    losses["count"].backward()
    cut.backward_trunk()
    assert all(p.grad is None for p in model.gates["segmentation"].parameters())
    assert all(p.grad is not None and p.grad.any() for p in model.gates["count"].parameters())
    assert all(p.grad is not None for e in model.experts for p in e[-1].parameters())


@pytest.mark.parametrize("architecture", ["ple", "dselect_k"])
def test_the_cut_gives_each_tasks_exact_gradient(architecture):
    """The task-gradient matrix every gradient method aggregates, through forward_cut, equals each task loss's
    gradient by plain autograd over the whole model (the DSelect-k regulariser included)."""
    model, tasks = build(f"architecture={architecture}", "architecture.experts=3")
    model.train()
    data = batch()
    outputs, cut = model.forward_cut(data["image"])
    jacobian = task_gradients(list(model.task_losses(tasks, outputs, data).values()), model, cut, "params")
    losses = model.task_losses(tasks, model(data["image"]), data)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    assert jacobian.matrix.shape == (2, sum(p.numel() for p in shared))
    for row, head_grads, loss in zip(jacobian.matrix, jacobian.head_grads, losses.values()):
        grads = torch.autograd.grad(loss, shared + jacobian.heads, retain_graph=True, allow_unused=True)
        torch.testing.assert_close(row, flat(grads[:len(shared)], shared), rtol=1e-4, atol=1e-6)
        for got, want in zip(head_grads, grads[len(shared):]):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_ple_with_one_level_is_cgc():
    cgc, _ = build("architecture=cgc")
    ple, _ = build("architecture=ple", "architecture.levels=1")
    ple.load_state_dict(cgc.state_dict())  # strict: the same modules under the same names
    image = batch()["image"]
    with torch.no_grad():
        expected, got = cgc.eval()(image), ple.eval()(image)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=0)


@pytest.mark.parametrize("levels", [2, 3])
def test_ple_trunk_is_exactly_what_several_tasks_reach(levels):
    """Two dense tasks (both read every stage): every trunk parameter reaches both outputs, and the rest of the
    model splits into the two tasks' own parts, each reaching its own output alone."""
    model, _ = build("architecture=ple", f"architecture.levels={levels}", tasks=("segmentation", "depth"))
    outputs = model.train()(batch()["image"])
    reached = {task: reached_parameters([output]) for task, output in outputs.items()}
    parts = {part: ids(modules) for part, modules in model.parts().items()}
    trunk = {id(p) for p in model.shared_parameters()}
    assert parts["shared"] == trunk
    assert trunk == reached["segmentation"] & reached["depth"]
    for task in outputs:
        assert reached[task] - trunk == parts[task]
    assert sum(map(len, parts.values())) == len(list(model.parameters()))  # every parameter in one part


def test_ple_task_depends_on_anothers_lower_experts_but_never_on_its_last_level():
    """Count's output moves when segmentation's experts of the first level move (the shared gate mixes them into
    the shared stream at the stage count reads), and stays when segmentation's own last-level experts, its gates
    or its experts at a stage count does not read move."""
    model, _ = build("architecture=ple", "architecture.experts=1")
    image, last = batch()["image"], str(len(model.backbone.channels) - 1)
    model.eval()
    with torch.no_grad():
        before = model(image)
        changes = {"lower": [e[last] for e in model.lower[0].own["segmentation"]],
                   "lower, finer stage": [e["0"] for e in model.lower[0].own["segmentation"]],
                   "own": list(model.own_experts["segmentation"]), "gates": [model.gates["segmentation"],
                                                                             model.lower_gates[-1]["segmentation"]]}
        moved = {}
        for what, modules in changes.items():
            saved = [p.clone() for m in modules for p in m.parameters()]
            for p in (p for m in modules for p in m.parameters()):
                p.add_(torch.randn_like(p))
            after = model(image)
            moved[what] = {task: not torch.equal(after[task], before[task]) for task in after}
            for p, old in zip((p for m in modules for p in m.parameters()), saved):
                p.copy_(old)
    assert moved == {"lower": {"segmentation": True, "count": True},
                     "lower, finer stage": {"segmentation": True, "count": False},
                     "own": {"segmentation": True, "count": False},
                     "gates": {"segmentation": True, "count": False}}


def test_ple_shared_gate_mixes_the_experts_present_at_each_stage():
    """Task b reads the coarser stage only: at the finer one the shared gate's softmax runs over the shared expert
    and a's. Constant maps make each mixture a weighted mean computed by hand."""
    level = Extraction([4, 4], [0, 1], {"a": [0, 1], "b": [1]}, experts=1, task_experts=1, reduction=4)
    assert level.columns == {0: [0, 1], 1: [0, 1, 2]}
    with torch.no_grad():
        level.shared_gate.weight.zero_()
        level.shared_gate.bias.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0])))
    full = lambda value: torch.full((1, 4, 2, 2), value)  # noqa: E731
    mixed = level.shared_stream(full(0.0), {0: [full(1.0)], 1: [full(1.0)]},
                                {"a": {0: [full(4.0)], 1: [full(4.0)]}, "b": {1: [full(10.0)]}})
    torch.testing.assert_close(mixed[0], full((1 + 2 * 4) / 3))
    torch.testing.assert_close(mixed[1], full((1 + 2 * 4 + 3 * 10) / 6))


@pytest.mark.parametrize("override, message", [
    (["architecture=ple", "architecture.levels=0"], "architecture.levels=0"),
    (["architecture=dselect_k", "architecture.k=5"], "1 <= k <= n"),
    (["architecture=dselect_k", "architecture.experts=1"], "n >= 2"),
    (["architecture=dselect_k", "architecture.gamma=0"], "gamma > 0"),
])
def test_bad_settings_are_one_clear_error(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build(*override)


@pytest.mark.parametrize("architectures", ["dselect_k", pytest.param("ple,dselect_k", marks=pytest.mark.slow)])
def test_mtl_trains_each_architecture(mtl_main, tmp_path, architectures):
    """From the command line on the embedded data, two steps each, under a gradient method (the task-gradient
    matrix through the cut, DSelect-k's regulariser in the losses through the loop's task_losses); -m slow adds
    ple (its forward and backward are in tests/test_models.py, its step in tests/test_configs.py)."""
    ok(mtl_main("train", "-m", f"architecture={architectures}", "weighting=pcgrad", *TWO_STEPS))
    runs = run_dirs(tmp_path / "multirun")
    assert len(runs) == len(architectures.split(","))
    for run in runs:
        record = json.loads((run / "metrics.json").read_text())
        assert record["steps"] == 2 and set(record["final"]["metrics"]) == {"segmentation", "depth", "normals",
                                                                            "count"}
        assert "MACs / image" in (run / "train.log").read_text()
