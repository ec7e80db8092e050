"""Task weighting methods (mtl_cli/weighting/) against formulas computed here by hand.

ew: w_t = 1. static: w_t from the config, 1.0 for unlisted tasks. uw (Kendall et al. 2018): s_t = log sigma_t^2,
w_t = exp(-s_t) / 2 and total = sum_t exp(-s_t) / 2 L_t + s_t / 2, so d total / d s_t = -exp(-s_t) / 2 L_t + 1/2.
dwa (Liu et al. 2019): w_t = 1 for the first two epochs, then w_t = T softmax_t(r / temperature) with
r_t = mean L_t over epoch e-1 / mean L_t over epoch e-2 (means over the steps where the task was present).
"""

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mtl_cli.build import build_weighting
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.weighting.base import Weighting
from mtl_cli.weighting.dwa import DynamicWeightAverage
from mtl_cli.weighting.ew import EqualWeighting
from mtl_cli.weighting.static import StaticWeighting
from mtl_cli.weighting.uw import UncertaintyWeighting

TASKS = ["seg", "depth", "cls"]


def _scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


class TinyModel(nn.Module):
    """Three scalar parameters; task t's loss is a distinct polynomial of them, so its gradient is known."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))

    def losses(self, present=TASKS):
        a, b, c = self.theta
        every = {"seg": a**2 + b, "depth": 3 * b**2, "cls": (a * c) ** 2 + 0.25}
        return {t: every[t] for t in present}


def _loss_values_and_grads(present=TASKS):
    """L_t and dL_t/dtheta at theta = (0.5, -1.5, 2.0), by hand."""
    a, b, c = 0.5, -1.5, 2.0
    values = {"seg": a**2 + b, "depth": 3 * b**2, "cls": (a * c) ** 2 + 0.25}
    grads = {"seg": np.array([2 * a, 1.0, 0.0]), "depth": np.array([0.0, 6 * b, 0.0]),
             "cls": np.array([2 * a * c**2, 0.0, 2 * c * a**2])}
    return {t: values[t] for t in present}, {t: grads[t] for t in present}


def _floats(weights):
    return {t: float(w.detach()) for t, w in weights.items()}


def _used(logs):
    """The weights a backward call reports: its `train/weight/<task>` logs."""
    return {tag.removeprefix("train/weight/"): w for tag, w in logs.items() if tag.startswith("train/weight/")}


# ---------------------------------------------------------------------------------------------------- ew, static


def test_equal_weighting_is_all_ones_and_backpropagates_the_plain_sum():
    weighting, model = EqualWeighting(TASKS), TinyModel()
    losses = model.losses()
    assert _floats(weighting.weights(losses)) == {"seg": 1.0, "depth": 1.0, "cls": 1.0}
    used = _used(weighting.backward(losses, model, _scaler()))
    assert _floats(used) == {"seg": 1.0, "depth": 1.0, "cls": 1.0}
    _, grads = _loss_values_and_grads()
    np.testing.assert_allclose(model.theta.grad.numpy(), sum(grads.values()), rtol=1e-12)


def test_static_weighting_takes_the_configured_weights_and_one_for_unlisted_tasks():
    weighting, model = StaticWeighting(TASKS, {"seg": 2.0, "cls": 0.25}), TinyModel()
    assert _floats(weighting.weights(model.losses())) == {"seg": 2.0, "depth": 1.0, "cls": 0.25}
    weighting.backward(model.losses(), model, _scaler())
    _, grads = _loss_values_and_grads()
    np.testing.assert_allclose(model.theta.grad.numpy(), 2.0 * grads["seg"] + grads["depth"] + 0.25 * grads["cls"],
                               rtol=1e-6)


def test_static_weighting_rejects_a_weight_for_an_unknown_task():
    with pytest.raises(UserError, match="segmentaton"):
        StaticWeighting(TASKS, {"seg": 2.0, "segmentaton": 0.5})


def _compose(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_static_weighting_from_the_config():
    cfg = _compose(["tasks=[segmentation,depth,normals]", "weighting=static",
                    "+weighting.weights={segmentation:2.0,depth:0.5}"])
    weighting = build_weighting(cfg, {"segmentation": None, "depth": None, "normals": None})
    assert isinstance(weighting, StaticWeighting)
    losses = {"segmentation": torch.tensor(1.0), "depth": torch.tensor(1.0), "normals": torch.tensor(1.0)}
    assert _floats(weighting.weights(losses)) == {"segmentation": 2.0, "depth": 0.5, "normals": 1.0}

    bad = _compose(["tasks=[segmentation]", "weighting=static", "+weighting.weights={depth:0.5}"])
    with pytest.raises(UserError, match="depth"):
        build_weighting(bad, {"segmentation": None})


def test_static_weighting_accepts_the_override_its_config_documents():
    """configs/weighting/static.yaml documents `weighting.weights={segmentation:1.0,depth:0.5}` (no `+`)."""
    assert "weighting.weights={segmentation:1.0,depth:0.5}" in (config_dir() / "weighting" / "static.yaml").read_text()
    cfg = _compose(["tasks=[segmentation,depth]", "weighting=static", "weighting.weights={segmentation:1.0,depth:0.5}"])
    weighting = build_weighting(cfg, {"segmentation": None, "depth": None})
    losses = {"segmentation": torch.tensor(1.0), "depth": torch.tensor(1.0)}
    assert _floats(weighting.weights(losses)) == {"segmentation": 1.0, "depth": 0.5}
    # and without any weights, every task counts once
    plain = build_weighting(_compose(["tasks=[segmentation,depth]", "weighting=static"]), {"segmentation": None,
                                                                                          "depth": None})
    assert _floats(plain.weights(losses)) == {"segmentation": 1.0, "depth": 1.0}


# ---------------------------------------------------------------------------------------------------------- uw


def test_uncertainty_weights_are_one_over_twice_the_variance():
    weighting = UncertaintyWeighting(TASKS, init_log_var=0.7)
    losses = {t: torch.tensor(1.0) for t in TASKS}
    for w in weighting.weights(losses).values():
        assert float(w.detach()) == pytest.approx(math.exp(-0.7) / 2, rel=1e-6)
    s = [0.3, -1.2, 2.0]
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor(s))
    got = _floats(weighting.weights(losses))
    for t, s_t in zip(TASKS, s):
        sigma2 = math.exp(s_t)
        assert got[t] == pytest.approx(1 / (2 * sigma2), rel=1e-6)
        assert got[t] == pytest.approx(math.exp(-s_t) / 2, rel=1e-6)


@pytest.mark.parametrize("present", [TASKS, ["cls", "seg"]], ids=["all", "depth-absent"])
def test_uncertainty_weighting_backward_matches_the_analytic_gradients(present):
    weighting, model = UncertaintyWeighting(TASKS), TinyModel()
    s = {"seg": 0.3, "depth": -1.2, "cls": 2.0}
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([s[t] for t in TASKS]))
    values, grads = _loss_values_and_grads(present)

    # The total it back-propagates: sum over present tasks of exp(-s)/2 L + s/2.
    losses = model.losses(present)
    total = sum(weighting.weights(losses)[t] * losses[t] for t in losses) + weighting.regularizer(losses)
    expected_total = sum(math.exp(-s[t]) / 2 * values[t] + s[t] / 2 for t in present)
    assert float(total.detach()) == pytest.approx(expected_total, rel=1e-6)

    used = _used(weighting.backward(model.losses(present), model, _scaler()))
    assert set(used) == set(present)
    assert all(not w.requires_grad for w in used.values())
    for t in present:
        assert float(used[t]) == pytest.approx(math.exp(-s[t]) / 2, rel=1e-6)
    # d total / d s_t = -exp(-s_t)/2 L_t + 1/2 for a present task, 0 for an absent one.
    expected = [(-math.exp(-s[t]) / 2 * values[t] + 0.5) if t in present else 0.0 for t in TASKS]
    np.testing.assert_allclose(weighting.log_vars.grad.numpy(), expected, rtol=1e-5, atol=1e-7)
    # d total / d theta = sum_t exp(-s_t)/2 dL_t/dtheta.
    expected_theta = sum(math.exp(-s[t]) / 2 * grads[t] for t in present)
    np.testing.assert_allclose(model.theta.grad.numpy(), expected_theta, rtol=1e-5)


def test_uncertainty_weighting_state_dict_round_trip():
    weighting = UncertaintyWeighting(TASKS)
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.3, -1.2, 2.0]))
    fresh = UncertaintyWeighting(TASKS)
    losses = {t: torch.tensor(2.0) for t in TASKS}
    assert _floats(fresh.weights(losses)) != _floats(weighting.weights(losses))
    fresh.load_state_dict(weighting.state_dict())
    assert _floats(fresh.weights(losses)) == _floats(weighting.weights(losses))
    assert list(fresh.parameters())[0] is fresh.log_vars and fresh.log_vars.requires_grad


# --------------------------------------------------------------------------------------------------------- dwa

# Losses of three epochs: a list of steps per epoch, each a dict of the tasks present in that step. The number of
# steps differs per epoch and a task is missing from some steps, so a mean over the wrong count would show.
EPOCHS = [
    [{"seg": 2.0, "depth": 1.0, "cls": 0.5}, {"seg": 1.6, "depth": 0.8, "cls": 0.7}, {"seg": 1.4, "cls": 0.9}],
    [{"seg": 1.2, "depth": 0.9, "cls": 0.6}, {"depth": 0.5, "cls": 0.2}],
    [{"seg": 1.1, "depth": 0.2, "cls": 0.5}, {"seg": 0.7, "depth": 0.4, "cls": 0.4},
     {"seg": 0.9, "depth": 0.3}, {"seg": 0.5, "cls": 0.8}],
]


def _epoch_means(epoch):
    return np.array([np.mean([step[t] for step in epoch if t in step]) for t in TASKS])


def _dwa_reference(mean_older, mean_newer, temperature):
    r = mean_newer / mean_older
    e = np.exp(r / temperature)
    return len(TASKS) * e / e.sum()


def _feed(weighting, epoch):
    """One training epoch of `weighting.weights` calls; returns the weights it gave at each step."""
    given = []
    for step in epoch:
        losses = {t: torch.tensor(v, requires_grad=True) for t, v in step.items()}
        weights = weighting.weights(losses)
        assert set(weights) == set(step)
        given.append(_floats(weights))
    return given


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_weights_follow_the_loss_ratios_of_the_last_two_epochs(temperature):
    weighting = DynamicWeightAverage(TASKS, temperature=temperature)
    weighting.train()
    means = [_epoch_means(epoch) for epoch in EPOCHS]

    for epoch in EPOCHS[:2]:  # the first two epochs: every weight is 1
        for weights in _feed(weighting, epoch):
            assert set(weights.values()) == {1.0}
        weighting.epoch_end()

    expected = _dwa_reference(means[0], means[1], temperature)
    assert not np.allclose(expected, 1.0)
    for weights in _feed(weighting, EPOCHS[2]):
        np.testing.assert_allclose([weights[t] for t in TASKS if t in weights],
                                   [w for t, w in zip(TASKS, expected) if t in weights], rtol=1e-6)
    assert expected.sum() == pytest.approx(len(TASKS))
    weighting.epoch_end()

    expected = _dwa_reference(means[1], means[2], temperature)
    weights = _floats(weighting.weights({t: torch.tensor(1.0) for t in TASKS}))
    np.testing.assert_allclose([weights[t] for t in TASKS], expected, rtol=1e-6)
    assert sum(weights.values()) == pytest.approx(len(TASKS), rel=1e-6)


def test_dwa_ignores_the_order_of_the_losses_and_evaluation_calls():
    """A losses dict in another order than the tasks, and weights() in eval mode (validation), change nothing."""
    weighting = DynamicWeightAverage(TASKS)
    for epoch in EPOCHS[:2]:
        weighting.train()
        for step in epoch:
            weighting.weights({t: torch.tensor(step[t]) for t in reversed(TASKS) if t in step})
        weighting.eval()
        weighting.weights({t: torch.tensor(100.0) for t in TASKS})
        weighting.epoch_end()
    means = [_epoch_means(epoch) for epoch in EPOCHS]
    weights = _floats(weighting.weights({t: torch.tensor(1.0) for t in TASKS}))
    np.testing.assert_allclose([weights[t] for t in TASKS], _dwa_reference(means[0], means[1], 2.0), rtol=1e-6)


def test_dwa_backward_uses_its_weights():
    weighting, model = DynamicWeightAverage(TASKS), TinyModel()
    weighting.train()
    for epoch in EPOCHS[:2]:
        _feed(weighting, epoch)
        weighting.epoch_end()
    w = dict(zip(TASKS, _dwa_reference(_epoch_means(EPOCHS[0]), _epoch_means(EPOCHS[1]), 2.0)))
    used = _used(weighting.backward(model.losses(), model, _scaler()))
    np.testing.assert_allclose([float(used[t]) for t in TASKS], [w[t] for t in TASKS], rtol=1e-6)
    _, grads = _loss_values_and_grads()
    np.testing.assert_allclose(model.theta.grad.numpy(), sum(w[t] * grads[t] for t in TASKS), rtol=1e-5)


@pytest.mark.parametrize("saved_after_steps", [0, 2])
def test_dwa_state_dict_round_trip(saved_after_steps):
    """A fresh instance loaded mid-training (after whole epochs, or mid-epoch) gives the same next weights."""
    weighting = DynamicWeightAverage(TASKS, temperature=2.0)
    weighting.train()
    _feed(weighting, EPOCHS[0])
    weighting.epoch_end()
    _feed(weighting, EPOCHS[1][:saved_after_steps])

    fresh = DynamicWeightAverage(TASKS, temperature=2.0)
    fresh.load_state_dict(weighting.state_dict())
    fresh.train()
    for w in (weighting, fresh):
        _feed(w, EPOCHS[1][saved_after_steps:])
        w.epoch_end()
    probe = {t: torch.tensor(1.0) for t in TASKS}
    expected = _dwa_reference(_epoch_means(EPOCHS[0]), _epoch_means(EPOCHS[1]), 2.0)
    np.testing.assert_allclose([float(fresh.weights(probe)[t]) for t in TASKS], expected, rtol=1e-6)
    assert _floats(fresh.weights(probe)) == _floats(weighting.weights(probe))


@pytest.mark.slow  # test_configs builds every weighting option in the default run; this also probes its weights
def test_every_weighting_option_is_a_weighting_that_builds_from_its_config():
    """A new weighting config gets built and gives one positive weight per present task."""
    options = sorted(p.stem for p in (config_dir() / "weighting").glob("*.yaml"))
    assert {"ew", "static", "uw", "dwa"} <= set(options)
    for option in options:
        cfg = _compose(["tasks=[segmentation,depth]", f"weighting={option}"])
        weighting = build_weighting(cfg, {"segmentation": None, "depth": None})
        assert isinstance(weighting, Weighting), option
        weighting.train()
        weights = weighting.weights({"depth": torch.tensor(1.0)})
        assert set(weights) == {"depth"}, option
        assert float(weights["depth"].detach()) > 0, option
