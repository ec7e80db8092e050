"""The per-task gradient plumbing (mtl_cli/weighting/gradients.py) and the GradientWeighting base, on the real
default model and data, against plain autograd on an uncut forward pass as the reference."""

import logging

import pytest
import torch
from hydra import compose, initialize_config_dir

from mtl_cli.build import build_dataset, build_loader, build_model, build_tasks, build_weighting
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.weighting.base import GradientWeighting
from mtl_cli.weighting.gradients import FeatureCut, task_gradients


@pytest.fixture(scope="module")
def setup():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["data.batch_size=4", "data.dataset.scenes.train=8", "data.dataset.image_size=32"])
    torch.manual_seed(0)
    tasks = build_tasks(cfg)
    batch = next(iter(build_loader(cfg, build_dataset(cfg, "train"))))
    model = build_model(cfg, tasks).train()
    return cfg, tasks, model, batch


def cut_forward(model, tasks, batch, present=None):
    cut = FeatureCut(model.encode(batch["image"]))
    outputs = model.decode(cut.leaves, batch["image"].shape[-2:])
    return cut, {n: t.loss(outputs[n], batch[t.target]) for n, t in tasks.items() if present is None or n in present}


def reference_grads(model, tasks, batch, weights):
    """Parameter gradients of sum_t weights[t] * L_t from one ordinary uncut forward and backward (the
    model's current gradients are left as they were)."""
    saved = {p: p.grad for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    outputs = model(batch["image"])
    sum(w * tasks[n].loss(outputs[n], batch[tasks[n].target]) for n, w in weights.items()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for param, grad in saved.items():
        param.grad = grad
    return grads


def close(a, b, tol=1e-5):
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max())


class Fixed(GradientWeighting):
    """A test method with fixed coefficients, counting its calls."""

    def __init__(self, tasks, coefficients, loss_weights=True, **kwargs):
        type(self).loss_weights = loss_weights
        super().__init__(tasks, **kwargs)
        self.coefficients, self.calls = coefficients, 0

    def aggregate(self, grads, losses, index):
        self.calls += 1
        return torch.tensor([self.coefficients[self.tasks[i]] for i in index])


@pytest.mark.parametrize("backend", ["loop", "batched"])
def test_rows_are_each_tasks_exact_gradient_of_the_shared_parameters(setup, backend):
    _, tasks, model, batch = setup
    cut, losses = cut_forward(model, tasks, batch)
    jacobian = task_gradients(list(losses.values()), model, cut, "params", backend=backend)
    shared = list(model.shared_parameters())
    for row, name in zip(jacobian.matrix, tasks):
        outputs = model(batch["image"])
        loss = tasks[name].loss(outputs[name], batch[tasks[name].target])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared)])
        assert close(row, expected)


def test_the_cut_keeps_nested_feature_maps_from_counting_twice(setup):
    """The default backbone's feature maps feed one another; trunk gradients from the cut equal the uncut ones."""
    _, _, model, batch = setup
    features = model.encode(batch["image"])
    assert features[1].grad_fn is not None and len(features) > 1
    test_rows_are_each_tasks_exact_gradient_of_the_shared_parameters(setup, "loop")


@pytest.mark.parametrize("target", ["params", "representation"])
def test_loss_weights_update_equals_the_weighted_loss_backward(setup, target):
    _, tasks, model, batch = setup
    weights = {"segmentation": 0.5, "depth": 2.0, "normals": 1.0, "count": 0.25}
    method = Fixed(list(tasks), weights, grad_target=target)
    model.zero_grad(set_to_none=True)
    cut, losses = cut_forward(model, tasks, batch)
    logs = method.backward(losses, model, torch.amp.GradScaler("cpu", enabled=False), cut)
    expected = reference_grads(model, tasks, batch, weights)
    for name, p in model.named_parameters():
        assert p.grad is not None and close(p.grad, expected[name]), name
    assert {t: float(logs[f"train/weight/{t}"]) for t in tasks} == weights


def test_direction_methods_give_each_head_its_raw_task_gradient(setup):
    _, tasks, model, batch = setup
    weights = {"segmentation": 0.5, "depth": 2.0, "normals": 1.0, "count": 0.25}
    method = Fixed(list(tasks), weights, loss_weights=False)
    model.zero_grad(set_to_none=True)
    cut, losses = cut_forward(model, tasks, batch)
    method.backward(losses, model, torch.amp.GradScaler("cpu", enabled=False), cut)
    weighted = reference_grads(model, tasks, batch, weights)
    raw = reference_grads(model, tasks, batch, dict.fromkeys(tasks, 1.0))
    for name, p in model.named_parameters():
        assert close(p.grad, weighted[name] if name.startswith("backbone.") else raw[name]), name


def test_a_task_without_labels_is_left_out_of_the_step(setup):
    _, tasks, model, batch = setup
    present = ["segmentation", "count"]
    method = Fixed(list(tasks), {"segmentation": 1.0, "count": 3.0})
    model.zero_grad(set_to_none=True)
    cut, losses = cut_forward(model, tasks, batch, present)
    logs = method.backward(losses, model, torch.amp.GradScaler("cpu", enabled=False), cut, log_grads=True)
    expected = reference_grads(model, tasks, batch, {"segmentation": 1.0, "count": 3.0})
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in expected) or float(p.grad.abs().max()) == 0.0
        if name in expected:
            assert p.grad is not None and close(p.grad, expected[name]), name
    assert set(logs) == {"train/weight/segmentation", "train/weight/count", "grad/norm/segmentation",
                         "grad/norm/count", "grad/cos/segmentation-count", "grad/solver_failures"}


def test_loss_scaling_is_undone_for_the_method_and_kept_for_the_scaler(setup):
    _, tasks, model, batch = setup
    weights = dict.fromkeys(tasks, 1.0)
    seen = {}

    class Spy(Fixed):
        def aggregate(self, grads, losses, index):
            seen["grads"] = grads.clone()
            return super().aggregate(grads, losses, index)

    method, scaler = Spy(list(tasks), weights), torch.amp.GradScaler("cpu", init_scale=1024.0)
    model.zero_grad(set_to_none=True)
    cut, losses = cut_forward(model, tasks, batch)
    method.backward(losses, model, scaler, cut)
    cut, losses = cut_forward(model, tasks, batch)
    unscaled = task_gradients(list(losses.values()), model, cut, "params")
    expected = reference_grads(model, tasks, batch, weights)
    assert close(seen["grads"], unscaled.matrix, 1e-4)
    for name, p in model.named_parameters():
        assert close(p.grad, 1024.0 * expected[name], 1e-4), name


def test_measured_loss_weighting_gives_the_same_update_and_logs_conflicts(setup):
    _, tasks, model, batch = setup
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["weighting=uw", "weighting.init_log_var=0.3"])
    grads = {}
    for measure in (False, True):
        weighting = build_weighting(cfg, tasks)
        model.zero_grad(set_to_none=True)
        cut, losses = cut_forward(model, tasks, batch)
        logs = weighting.backward(losses, model, torch.amp.GradScaler("cpu", enabled=False), cut,
                                  log_grads=True, measure=measure)
        grads[measure] = [p.grad.clone() for p in [*model.parameters(), *weighting.parameters()]]
    assert all(close(a, b) for a, b in zip(grads[False], grads[True]))
    assert "grad/cos/segmentation-depth" in logs and -1 <= float(logs["grad/cos/segmentation-depth"]) <= 1


def test_grad_every_reuses_the_last_weights_in_between(setup):
    _, tasks, model, batch = setup
    method = Fixed(list(tasks), {"segmentation": 0.5, "depth": 2.0, "normals": 1.0, "count": 0.25}, grad_every=3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(5):
        model.zero_grad(set_to_none=True)
        cut, losses = cut_forward(model, tasks, batch)
        logs = method.backward(losses, model, scaler, cut)
        assert float(logs["train/weight/depth"]) == 2.0
    assert method.calls == 2  # steps 0 and 3
    expected = reference_grads(model, tasks, batch, method.coefficients)
    model.zero_grad(set_to_none=True)
    cut, losses = cut_forward(model, tasks, batch)
    method.backward(losses, model, scaler, cut)  # step 5: a reuse step, an ordinary backward
    for name, p in model.named_parameters():
        assert p.grad is not None and close(p.grad, expected[name]), name


def test_options_a_method_does_not_allow_are_refused():
    class ParamsOnly(GradientWeighting):
        grad_targets = ("params",)
        loss_weights = False

    with pytest.raises(UserError, match="grad_target='representation'.*allows: params"):
        ParamsOnly(["a", "b"], grad_target="representation")
    with pytest.raises(UserError, match="grad_every=2 must be 1"):
        ParamsOnly(["a", "b"], grad_every=2)


def test_a_solver_failure_warns_once_and_is_counted(caplog):
    method = Fixed(["a", "b"], {"a": 1.0, "b": 1.0})
    with caplog.at_level(logging.WARNING, logger="mtl"):
        for _ in range(3):
            method.solver_failed("the min-norm solver did not converge")
    assert int(method.solver_failures) == 3
    assert sum("did not converge" in r.message for r in caplog.records) == 1
    assert int(type(method)(["a", "b"], {}).solver_failures) == 0
    state = method.state_dict()
    assert int(state["solver_failures"]) == 3


def test_frozen_stages_are_left_out_and_a_fully_frozen_trunk_is_a_clear_error(setup):
    _, tasks, model, batch = setup
    backbone = list(model.backbone.parameters())
    try:
        for param in backbone[:len(backbone) // 2]:
            param.requires_grad_(False)
        cut, losses = cut_forward(model, tasks, batch)
        jacobian = task_gradients(list(losses.values()), model, cut, "params")
        trainable = [p for p in model.shared_parameters() if p.requires_grad]
        outputs = model(batch["image"])
        loss = tasks["depth"].loss(outputs["depth"], batch["depth"])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable)])
        assert close(jacobian.matrix[list(tasks).index("depth")], expected)
        for param in backbone:
            param.requires_grad_(False)
        cut, losses = cut_forward(model, tasks, batch)
        with pytest.raises(UserError, match="every shared parameter is frozen"):
            task_gradients(list(losses.values()), model, cut, "params")
        assert task_gradients(list(losses.values()), model, cut, "representation").matrix.shape[0] == len(tasks)
    finally:
        for param in backbone:
            param.requires_grad_(True)


def test_the_gradscaler_steps_after_a_gradient_method_and_skips_an_overflow(setup):
    _, tasks, model, batch = setup
    weights = {"segmentation": 0.5, "depth": 2.0, "normals": 1.0, "count": 0.25}
    method, scaler = Fixed(list(tasks), weights), torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for overflow in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        cut, losses = cut_forward(model, tasks, batch)
        if overflow:
            losses["depth"] = losses["depth"] * float("inf")
        method.backward(losses, model, scaler, cut)
        scaler.step(optimizer)
        scaler.update()
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert changed != overflow
    assert scaler.get_scale() == 512.0
    assert method.last_weights.tolist() == list(weights.values())  # an overflow step does not overwrite them
