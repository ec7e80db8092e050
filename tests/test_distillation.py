"""PAD-Net and MTI-Net (models/pad_net.py, mti_net.py, distillation.py): each task's training loss adds its
intermediate predictions' losses, outputs come at the input size, a task's output reads the other tasks'
intermediate features through the distillation (and only there), the intermediate heads learn from their own
losses, and `mtl train` runs both architectures with a gradient method."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from test_cli import TINY, ok, run_dirs
from test_weighting_cli import STEPS

from mtl_cli.build import build_model, build_tasks
from mtl_cli.errors import UserError
from mtl_cli.models.distillation import Distillation
from mtl_cli.paths import config_dir

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (36, 52)  # not a multiple of the backbone's strides: every map is resized to the input's size
TASKS = ["segmentation", "depth", "count"]
SCALES = {"pad_net": 1, "mti_net": 3}  # intermediate predictions per dense task (small_cnn taps 3 stages)


def build(architecture: str, *overrides: str, tasks=TASKS, channels=16):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [f"tasks=[{','.join(tasks)}]", f"architecture={architecture}",
                                f"architecture.channels={channels}", *overrides])
    torch.manual_seed(0)
    built = build_tasks(cfg)
    return build_model(cfg, built), built


def labelled_batch() -> dict:
    """Four images; depth labelled on three of them (as a batch mixing datasets has it), with invalid pixels."""
    g = torch.Generator().manual_seed(0)
    segmentation = torch.randint(0, 11, (4, *SIZE), generator=g)
    segmentation[:, :5] = 255  # ignored
    depth = torch.rand(3, 1, *SIZE, generator=g) * 10
    depth[..., :7] = 0.0  # invalid
    return {"image": torch.rand(4, 3, *SIZE, generator=g), "segmentation": segmentation, "depth": depth,
            "present/depth": torch.tensor([True, False, True, True]),
            "count": torch.randint(0, 7, (4,), generator=g).float()}


@pytest.mark.parametrize("architecture", sorted(SCALES))
def test_each_task_loss_adds_its_intermediate_predictions_losses(architecture):
    model, tasks = build(architecture, "architecture.aux_weight=0.3")
    batch = labelled_batch()
    outputs, _ = model.train().forward_cut(batch["image"])
    assert set(outputs) == set(TASKS)  # the intermediate predictions are not task outputs
    scales = SCALES[architecture]
    assert {t: len(p) for t, p in outputs.intermediate.items()} == {"segmentation": scales, "depth": scales}
    seg, depth, count = (tasks[t] for t in TASKS)
    present = batch["present/depth"]
    expected = {
        "segmentation": seg.loss(outputs["segmentation"], batch["segmentation"]) + 0.3 * sum(
            seg.loss(p, batch["segmentation"]) for p in outputs.intermediate["segmentation"]),
        "depth": depth.loss(outputs["depth"][present], batch["depth"]) + 0.3 * sum(
            depth.loss(p[present], batch["depth"]) for p in outputs.intermediate["depth"]),
        "count": count.loss(outputs["count"], batch["count"])}
    losses = model.task_losses(tasks, outputs, batch)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)
    assert losses["segmentation"] > seg.loss(outputs["segmentation"], batch["segmentation"]) + 0.3  # CE > 1 each
    model.eval()
    with torch.no_grad():  # evaluation: the final predictions alone
        assert model(batch["image"]).intermediate == {}


@pytest.mark.parametrize("architecture", sorted(SCALES))
def test_every_output_and_intermediate_prediction_is_at_the_input_size(architecture):
    model, _ = build(architecture, tasks=["segmentation", "depth", "normals", "count"])
    outputs, _ = model.train().forward_cut(torch.rand(2, 3, *SIZE))
    channels = {"segmentation": 11, "depth": 1, "normals": 3}
    for task, c in channels.items():
        assert [tuple(p.shape) for p in [outputs[task], *outputs.intermediate[task]]] == [(2, c, *SIZE)] * (
            1 + SCALES[architecture])
    torch.testing.assert_close(outputs.intermediate["normals"][-1].norm(dim=1), torch.ones(2, *SIZE))  # its head's
    assert outputs["count"].shape == (2, 1)


@pytest.mark.parametrize("architecture", sorted(SCALES))
def test_a_tasks_output_reads_the_other_tasks_intermediate_features_through_the_distillation(architecture):
    model, _ = build(architecture)
    finest = (lambda modules: modules) if architecture == "pad_net" else (lambda modules: modules[0])
    depth_features = finest(model.features)["depth"]  # at the finest scale: no propagation follows it
    into_segmentation = finest(model.distillation)["segmentation"]
    image = torch.rand(2, 3, *SIZE)

    def outputs(doubled: bool) -> dict:
        hook = depth_features.register_forward_hook(lambda module, inputs, out: 2 * out if doubled else out)
        try:
            with torch.no_grad():
                return model.eval()(image)
        finally:
            hook.remove()

    before, after = outputs(False), outputs(True)
    assert (before["segmentation"] - after["segmentation"]).abs().max() > 1e-5  # far above rounding
    torch.testing.assert_close(before["count"], after["count"], rtol=0, atol=0)  # image-level: not distilled
    with torch.no_grad():  # silence depth's message to segmentation: segmentation no longer sees depth's features
        into_segmentation.messages["depth"].weight.zero_()
    before, after = outputs(False), outputs(True)
    torch.testing.assert_close(before["segmentation"], after["segmentation"], rtol=0, atol=0)
    assert (before["depth"] - after["depth"]).abs().max() > 1e-5


@pytest.mark.parametrize("architecture", sorted(SCALES))
def test_the_intermediate_heads_learn_from_the_auxiliary_losses_alone(architecture):
    model, tasks = build(architecture)
    batch = labelled_batch()
    outputs, cut = model.train().forward_cut(batch["image"])
    heads = [p for p in model.initial.parameters()]
    final = sum(t.loss(*t.select(outputs[n], batch)) for n, t in tasks.items())
    final.backward(retain_graph=True)
    assert all(p.grad is None for p in heads)  # no final output reads an intermediate prediction
    model.zero_grad(set_to_none=True)
    sum(model.task_losses(tasks, outputs, batch).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in cut.inputs)  # and the trunk from them


def test_the_distillation_is_the_papers_attention_guided_message_passing():
    torch.manual_seed(0)
    module = Distillation("a", ["a", "b", "c"], channels=4)
    assert set(module.messages) == {"b", "c"}
    features = {t: torch.randn(2, 4, 5, 6) * scale for t, scale in zip("abc", (1.0, 1e3, 1e-3))}
    gate = torch.sigmoid(F.conv2d(features["a"], module.gate.weight, module.gate.bias, padding=1))
    messages = [F.conv2d(features[t], module.messages[t].weight, padding=1) for t in "bc"]
    torch.testing.assert_close(module(features), features["a"] + gate * (messages[0] + messages[1]))
    alone = Distillation("a", ["a"], channels=4)
    assert alone(features) is features["a"] and not list(alone.parameters())


def test_without_a_dense_task_there_is_nothing_to_distil_and_widths_are_checked():
    with pytest.raises(UserError, match=r"^architecture mti_net distils between dense \(per-pixel\) tasks, and none "
                                        r"of count has a dense head: .* or use architecture=hps$"):
        build("mti_net", tasks=["count"])
    with pytest.raises(UserError, match=r"^architecture.channels=18: give a multiple of 4"):
        build("pad_net", channels=18)


@pytest.mark.parametrize("architecture, weighting", [
    ("pad_net", "pcgrad"), *[pytest.param(a, w, marks=pytest.mark.slow) for a, w in (
        ("mti_net", "pcgrad"), ("pad_net", "ew"), ("mti_net", "ew"))]])
def test_mtl_train_trains_two_steps(mtl_main, tmp_path, architecture, weighting):
    """With a gradient method (exact per-task gradients through forward_cut, the auxiliary losses through the loop's
    task_losses) in the default run; -m slow adds mti_net (whose step tests/test_configs.py takes) and ew."""
    ok(mtl_main("train", f"architecture={architecture}", f"weighting={weighting}", "architecture.channels=32", *TINY,
                *STEPS, f"hydra.run.dir={tmp_path / 'run'}"))  # (256 channels: 70 times hps's MACs)
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert set(metrics["final"]["metrics"]) == {"segmentation", "depth", "normals", "count"}
