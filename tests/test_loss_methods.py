"""gls, rlw, famo, stch and gradnorm (mtl_cli/weighting/) against hand computations of their defining formulas.

gls: total = (prod_t L_t)^(1/T). rlw: w = softmax(z), z ~ N(0, I). famo: w_t = z_t / (c D_t), z = softmax(xi),
D_t = L_t - min + eps, c = sum z / D; xi takes Adam steps on the gradient of delta . softmax(xi), delta the drop
of log D between consecutive steps. stch: log-loss warm-up, then total = T mu logsumexp(log(L / nadir) / mu).
gradnorm: w = T softmax(theta), theta.grad = d/dtheta sum_t |w_t |g_t| - mean(w |g|) r_t^alpha| (target constant).
"""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mtl_cli.build import build_weighting
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.weighting.famo import FastAdaptiveMultitaskOptimization
from mtl_cli.weighting.gls import GeometricLossStrategy
from mtl_cli.weighting.gradnorm import GradNorm
from mtl_cli.weighting.rlw import RandomLossWeighting
from mtl_cli.weighting.scale_invariant import ScaleInvariant
from mtl_cli.weighting.stch import SmoothTchebycheff

TASKS = ["seg", "depth", "cls"]
SUBSETS = pytest.mark.parametrize("present", [TASKS, ["cls", "seg"]], ids=["all", "depth-absent"])


class TinyModel(nn.Module):
    """Three parameters; each task's loss is a distinct positive polynomial of them."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))

    def losses(self, present=TASKS):
        a, b, c = self.theta
        every = {"seg": a**2 + b**2, "depth": 3 * b**2 + 0.1, "cls": (a * c) ** 2 + 0.25}
        return {t: every[t] for t in present}


def _scaler(enabled=False, scale=1.0):
    return torch.amp.GradScaler("cpu", enabled=enabled, init_scale=scale)


def _floats(weights, order=None):
    return np.array([float(weights[t]) for t in (order or weights)])


def _weighted_grad(weighting, present):
    """d/dtheta sum_t w_t L_t with the method's (detached) weights."""
    model = TinyModel()
    losses = model.losses(present)
    weights = weighting.weights(losses)
    assert all(not w.requires_grad for w in weights.values())
    sum(weights[t].double() * losses[t] for t in losses).backward()
    return model.theta.grad.numpy()


def _grad_of(objective, present):
    """d/dtheta objective(stacked losses of the present tasks), by autograd."""
    model = TinyModel()
    objective(torch.stack(list(model.losses(present).values()))).backward()
    return model.theta.grad.numpy()


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


# ---------------------------------------------------------------------------------------------------------- gls


@SUBSETS
def test_gls_weights_are_the_geometric_mean_over_t_times_the_loss(present):
    values = np.array([2.0, 0.5, 8.0])[: len(present)]
    weights = GeometricLossStrategy(TASKS).weights({t: torch.tensor(v) for t, v in zip(present, values)})
    assert list(weights) == present
    gm = np.prod(values) ** (1 / len(values))
    np.testing.assert_allclose(_floats(weights), gm / (len(values) * values), rtol=1e-6)


@SUBSETS
def test_gls_weighted_loss_has_the_gradient_of_the_product_form(present):
    expected = _grad_of(lambda l: l.prod() ** (1 / len(l)), present)
    np.testing.assert_allclose(_weighted_grad(GeometricLossStrategy(TASKS), present), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- scaleinvls


@SUBSETS
def test_scale_invariant_weighted_loss_has_the_gradient_of_the_sum_of_log_losses(present):
    expected = _grad_of(lambda l: l.log().sum(), present)
    np.testing.assert_allclose(_weighted_grad(ScaleInvariant(TASKS), present), expected, rtol=1e-12)


def test_scale_invariant_is_invariant_to_rescaling_a_loss_and_guards_a_zero_loss():
    losses = {"seg": torch.tensor(2.0, dtype=torch.float64, requires_grad=True),
              "depth": torch.tensor(1e-6, dtype=torch.float64, requires_grad=True)}
    weighting = ScaleInvariant(TASKS)
    weighted = sum(w * losses[t] for t, w in weighting.weights(losses).items())
    rescaled = {t: (1e4 if t == "depth" else 1.0) * loss for t, loss in losses.items()}
    weighted_rescaled = sum(w * rescaled[t] for t, w in weighting.weights(rescaled).items())
    (a,) = torch.autograd.grad(weighted, [losses["depth"]])
    (b,) = torch.autograd.grad(weighted_rescaled, [losses["depth"]])
    assert float(a) == pytest.approx(1e6, rel=1e-12) and float(b) == pytest.approx(float(a), rel=1e-12)
    assert float(weighting.weights({"seg": torch.tensor(0.0)})["seg"]) == pytest.approx(1e8)


# ---------------------------------------------------------------------------------------------------------- rlw


@SUBSETS
@pytest.mark.parametrize("sum_to", ["one", "tasks"])
def test_rlw_weights_are_a_softmax_of_standard_normal_draws_from_the_global_generator(present, sum_to):
    weighting = RandomLossWeighting(TASKS, sum_to=sum_to)
    losses = {t: torch.tensor(1.0) for t in present}
    torch.manual_seed(7)
    given = [_floats(weighting.weights(losses)) for _ in range(3)]
    torch.manual_seed(7)
    draws = [torch.randn(len(TASKS)).numpy() for _ in range(3)]  # one draw per task, present or not
    columns = [TASKS.index(t) for t in present]
    scale = 1.0 if sum_to == "one" else len(present)
    for got, z in zip(given, draws):
        np.testing.assert_allclose(got, scale * _softmax(z[columns]), rtol=1e-6)
        assert got.sum() == pytest.approx(scale, rel=1e-6)
    assert not np.allclose(given[0], given[1])


def test_rlw_rejects_an_unknown_normalisation():
    with pytest.raises(UserError, match="sum_to"):
        RandomLossWeighting(TASKS, sum_to="two")


# --------------------------------------------------------------------------------------------------------- famo


def _famo_losses(values, present=TASKS):
    return {t: torch.tensor(v) for t, v in zip(present, values)}


@SUBSETS
def test_famo_weights_follow_the_formula(present):
    weighting = FastAdaptiveMultitaskOptimization(TASKS, min_loss=0.1)
    xi = np.array([0.3, -0.7, 0.2])
    weighting.logits.copy_(torch.tensor(xi))
    weighting.eval()  # no logit update: only the formula
    values = np.array([1.5, 0.4, 2.5])[: len(present)]
    z = _softmax(xi[[TASKS.index(t) for t in present]])
    gaps = values - 0.1 + 1e-8
    expected = z / (np.sum(z / gaps) * gaps)
    np.testing.assert_allclose(_floats(weighting.weights(_famo_losses(values, present))), expected, rtol=1e-6)


@SUBSETS
def test_famo_weighted_loss_has_the_gradient_of_its_log_objective(present):
    weighting = FastAdaptiveMultitaskOptimization(TASKS)
    weighting.logits.copy_(torch.tensor([0.3, -0.7, 0.2]))
    weighting.eval()
    z = torch.softmax(weighting.logits[[TASKS.index(t) for t in present]].double(), dim=0)

    def objective(losses):
        gaps = losses + 1e-8
        return (z * gaps.log()).sum() / (z / gaps.detach()).sum()

    np.testing.assert_allclose(_weighted_grad(weighting, present), _grad_of(objective, present), rtol=1e-6)


class OfficialFAMO:
    """The official algorithm, written with torch.optim.Adam and autograd: the reference for the logits."""

    def __init__(self, n, w_lr, gamma):
        self.w = torch.zeros(n, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def update(self, prev, now):
        delta = (prev + 1e-8).log() - (now + 1e-8).log()
        (grad,) = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = grad
        self.opt.step()


STEPS = [[2.0, 1.0, 0.5], [1.6, 0.9, 0.45], [1.1, 0.85, 0.44], [0.9, 0.7, 0.40], [0.5, 0.69, 0.30], [0.4, 0.6, 0.2]]


@pytest.mark.parametrize("gamma", [0.01, 0.001])
def test_famo_logits_take_the_official_adam_steps(gamma):
    weighting = FastAdaptiveMultitaskOptimization(TASKS, w_lr=0.025, gamma=gamma)
    weighting.train()
    reference = OfficialFAMO(len(TASKS), 0.025, gamma)
    for k, values in enumerate(STEPS):
        weights = weighting.weights(_famo_losses(values))
        if k > 0:
            reference.update(torch.tensor(STEPS[k - 1]), torch.tensor(values))
        np.testing.assert_allclose(weighting.logits.numpy(), reference.w.detach().numpy(), rtol=1e-5, atol=1e-7)
        z = torch.softmax(reference.w.detach(), -1).numpy()
        gaps = np.array(values) + 1e-8
        np.testing.assert_allclose(_floats(weights), z / (np.sum(z / gaps) * gaps), rtol=1e-5)
    assert int(weighting.adam_steps) == len(STEPS) - 1


def test_famo_moves_weight_toward_the_task_whose_loss_fell_least():
    weighting = FastAdaptiveMultitaskOptimization(TASKS)
    weighting.train()
    weighting.weights(_famo_losses([1.0, 1.0, 1.0]))
    first = _floats(weighting.weights(_famo_losses([0.5, 0.9, 0.99])))  # seg fell most, cls least
    xi = weighting.logits.numpy()
    assert xi[2] > xi[1] > xi[0]
    # the same losses again: the weights (their share relative to log-loss weights) keep shifting to cls
    again = _floats(weighting.weights(_famo_losses([0.5, 0.9, 0.99])))
    assert again[2] > first[2] and again[0] < first[0]


def test_famo_updates_only_on_the_tasks_present_in_both_steps():
    weighting = FastAdaptiveMultitaskOptimization(TASKS)
    weighting.train()
    weighting.weights(_famo_losses([1.0, 1.0, 1.0]))
    weighting.weights({"cls": torch.tensor(0.9), "seg": torch.tensor(0.5)})  # depth absent: seg and cls compared
    reference = OfficialFAMO(2, 0.025, 0.01)
    reference.update(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.9]))
    np.testing.assert_allclose(weighting.logits.numpy()[[0, 2]], reference.w.detach().numpy(), rtol=1e-5)
    assert float(weighting.logits[1]) == 0.0

    # only depth in common with the last step (depth absent there): nothing to compare, no update
    state = {k: v.clone() for k, v in weighting.state_dict().items()}
    weighting.weights({"depth": torch.tensor(0.3)})
    weighting.weights({"depth": torch.tensor(0.2), "cls": torch.tensor(0.5)})
    assert torch.equal(weighting.logits, state["logits"]) and int(weighting.adam_steps) == 1
    assert torch.equal(weighting.exp_avg, state["exp_avg"])


def test_famo_does_not_learn_in_eval_mode():
    weighting = FastAdaptiveMultitaskOptimization(TASKS)
    weighting.eval()
    for values in STEPS[:3]:
        weighting.weights(_famo_losses(values))
    assert not weighting.logits.any() and int(weighting.adam_steps) == 0


@pytest.mark.parametrize("saved_after", [1, 3])
def test_famo_state_dict_round_trip(saved_after):
    weighting = FastAdaptiveMultitaskOptimization(TASKS)
    weighting.train()
    for values in STEPS[:saved_after]:
        weighting.weights(_famo_losses(values))
    fresh = FastAdaptiveMultitaskOptimization(TASKS)
    fresh.load_state_dict(weighting.state_dict())
    fresh.train()
    for values in STEPS[saved_after:]:
        assert _floats(fresh.weights(_famo_losses(values))).tolist() == \
            _floats(weighting.weights(_famo_losses(values))).tolist()
    assert torch.equal(fresh.logits, weighting.logits) and torch.equal(fresh.exp_avg_sq, weighting.exp_avg_sq)


# --------------------------------------------------------------------------------------------------------- stch

# Three epochs of steps (the tasks present in each); with warmup_epochs=2, the nadir is the mean of epoch 1.
EPOCHS = [
    [{"seg": 2.0, "depth": 1.0, "cls": 0.5}, {"seg": 1.6, "depth": 0.8, "cls": 0.7}],
    [{"seg": 1.2, "depth": 0.9, "cls": 0.6}, {"seg": 1.0, "cls": 0.2}, {"seg": 0.8, "depth": 0.5, "cls": 0.4}],
    [{"seg": 0.7, "depth": 0.4, "cls": 0.3}, {"seg": 0.6, "depth": 0.45}],
]


def _feed(weighting, steps):
    given = []
    for step in steps:
        weights = weighting.weights({t: torch.tensor(v) for t, v in step.items()})
        assert list(weights) == list(step)
        given.append({t: float(w) for t, w in weights.items()})
    return given


def _stch_reference(values, nadir, mu):
    """d/dL_t of T mu logsumexp(log(L / nadir) / mu): T softmax_t(log(L / nadir) / mu) / L_t."""
    return len(values) * _softmax(np.log(values / nadir) / mu) / values


@pytest.mark.parametrize("mu", [1.0, 0.2])
def test_stch_warms_up_on_the_log_loss_then_scalarises_against_the_last_warmup_epoch(mu):
    weighting = SmoothTchebycheff(TASKS, mu=mu, warmup_epochs=2)
    weighting.train()
    for epoch in EPOCHS[:2]:
        for step, weights in zip(epoch, _feed(weighting, epoch)):
            np.testing.assert_allclose(list(weights.values()), [1 / v for v in step.values()], rtol=1e-6)
        weighting.epoch_end()
    nadir = np.array([np.mean([s[t] for s in EPOCHS[1] if t in s]) for t in TASKS])
    np.testing.assert_allclose(weighting.nadir.numpy(), nadir, rtol=1e-6)
    for step, weights in zip(EPOCHS[2], _feed(weighting, EPOCHS[2])):
        columns = [TASKS.index(t) for t in step]
        expected = _stch_reference(np.array(list(step.values())), nadir[columns], mu)
        np.testing.assert_allclose(list(weights.values()), expected, rtol=1e-5)


@SUBSETS
@pytest.mark.parametrize("mu", [1.0, 0.2])
def test_stch_weighted_loss_has_the_gradient_of_the_smooth_tchebycheff_scalarisation(present, mu):
    weighting = SmoothTchebycheff(TASKS, mu=mu, warmup_epochs=0)
    nadir = torch.tensor([0.3, 5.0, 1.2], dtype=torch.float64)
    weighting.nadir.copy_(nadir)
    columns = [TASKS.index(t) for t in present]

    def objective(losses):
        return len(losses) * mu * torch.logsumexp((losses / nadir[columns]).log() / mu, dim=0)

    np.testing.assert_allclose(_weighted_grad(weighting, present), _grad_of(objective, present), rtol=1e-5)
    # and during the warm-up, the gradient of sum_t log L_t
    weighting.warmup_epochs = 1
    np.testing.assert_allclose(_weighted_grad(weighting, present), _grad_of(lambda l: l.log().sum(), present),
                               rtol=1e-6)


def test_stch_nadir_of_a_task_absent_from_the_last_warmup_epoch_or_from_the_whole_warmup():
    weighting = SmoothTchebycheff(TASKS, warmup_epochs=2)
    weighting.train()
    _feed(weighting, [{"seg": 2.0, "depth": 1.0}, {"seg": 1.0, "depth": 3.0}])
    weighting.epoch_end()
    _feed(weighting, [{"seg": 0.5}])  # depth absent from the last warm-up epoch, cls from the whole warm-up
    weighting.epoch_end()
    np.testing.assert_allclose(weighting.nadir.numpy()[:2], [0.5, 2.0])
    assert np.isnan(weighting.nadir.numpy()[2])
    weights = _feed(weighting, [{"seg": 0.25, "depth": 1.0, "cls": 4.0}])[0]
    np.testing.assert_allclose([weights["seg"], weights["depth"]], _stch_reference(np.array([0.25, 1.0]),
                                                                                   np.array([0.5, 2.0]), 1.0))
    assert weights["cls"] == pytest.approx(1 / 4.0)  # log loss until it has a nadir
    weighting.epoch_end()
    assert weighting.nadir.numpy()[2] == pytest.approx(4.0)
    np.testing.assert_allclose(weighting.nadir.numpy()[:2], [0.5, 2.0])  # fixed after the warm-up


def test_stch_ignores_evaluation_calls():
    weighting = SmoothTchebycheff(TASKS, warmup_epochs=1)
    weighting.eval()
    _feed(weighting, EPOCHS[0])
    weighting.epoch_end()
    assert np.isnan(weighting.nadir.numpy()).all()


@pytest.mark.parametrize("saved_after_steps", [0, 2])
def test_stch_state_dict_round_trip(saved_after_steps):
    weighting = SmoothTchebycheff(TASKS, warmup_epochs=2)
    weighting.train()
    _feed(weighting, EPOCHS[0])
    weighting.epoch_end()
    _feed(weighting, EPOCHS[1][:saved_after_steps])
    fresh = SmoothTchebycheff(TASKS, warmup_epochs=2)
    fresh.load_state_dict(weighting.state_dict())
    fresh.train()
    for w in (weighting, fresh):
        _feed(w, EPOCHS[1][saved_after_steps:])
        w.epoch_end()
    assert _feed(fresh, EPOCHS[2]) == _feed(weighting, EPOCHS[2])
    assert not np.isnan(fresh.nadir.numpy()).any()


# ----------------------------------------------------------------------------------------------------- gradnorm

GRADS = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.1, 0.3, -0.2, 0.4], [3.0, 1.0, 1.0, -1.0]])


def _gradnorm_reference(theta, grads, losses, first, alpha):
    """(weights, dL_grad/dtheta) from the paper's formulas, with autograd on a fresh copy of theta."""
    theta = theta.detach().clone().requires_grad_(True)
    w = len(losses) * torch.softmax(theta, 0)
    norms = torch.linalg.vector_norm(grads, dim=1)
    ratio = losses / first
    target = (w * norms).mean().detach() * (ratio / ratio.mean()) ** alpha
    (w * norms - target).abs().sum().backward()
    return w.detach(), theta.grad


def test_gradnorm_aggregate_returns_softmax_weights_and_sets_the_gradient_of_l_grad():
    weighting = GradNorm(TASKS, alpha=1.5)
    with torch.no_grad():
        weighting.logits.copy_(torch.tensor([0.4, -0.3, 0.1]))
    first, later = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 0.9, 0.2])

    weights = weighting.aggregate(GRADS, first, [0, 1, 2])  # the first losses: every rate is 1
    ref_w, ref_grad = _gradnorm_reference(weighting.logits, GRADS, first, first, 1.5)
    np.testing.assert_allclose(weights.numpy(), ref_w.numpy(), rtol=1e-6)
    np.testing.assert_allclose(weighting.logits.grad.numpy(), ref_grad.numpy(), rtol=1e-5, atol=1e-7)
    assert not weights.requires_grad and weights.sum() == pytest.approx(3.0)
    np.testing.assert_allclose(weighting.initial_losses.numpy(), first.numpy())

    weighting.logits.grad = None
    weighting.aggregate(GRADS, later, [0, 1, 2])
    _, ref_grad = _gradnorm_reference(weighting.logits, GRADS, later, first, 1.5)
    np.testing.assert_allclose(weighting.logits.grad.numpy(), ref_grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weighting.initial_losses.numpy(), first.numpy())  # L(0) stays the first loss

    weighting.aggregate(GRADS, later, [0, 1, 2])  # accumulates into an existing gradient
    np.testing.assert_allclose(weighting.logits.grad.numpy(), 2 * ref_grad.numpy(), rtol=1e-5, atol=1e-7)


def test_gradnorm_normalises_over_the_tasks_present():
    weighting = GradNorm(TASKS, alpha=0.5)
    with torch.no_grad():
        weighting.logits.copy_(torch.tensor([0.4, -0.3, 0.1]))
    weighting.aggregate(GRADS, torch.tensor([2.0, 1.0, 0.5]), [0, 1, 2])
    weighting.logits.grad = None
    rows, losses = GRADS[[0, 2]], torch.tensor([1.0, 0.4])
    weights = weighting.aggregate(rows, losses, [0, 2])
    ref_w, ref_grad = _gradnorm_reference(weighting.logits[[0, 2]], rows, losses, torch.tensor([2.0, 0.5]), 0.5)
    np.testing.assert_allclose(weights.numpy(), ref_w.numpy(), rtol=1e-6)
    assert weights.sum() == pytest.approx(2.0)
    np.testing.assert_allclose(weighting.logits.grad.numpy()[[0, 2]], ref_grad.numpy(), rtol=1e-5, atol=1e-7)
    assert float(weighting.logits.grad[1]) == 0.0


def test_gradnorm_first_loss_is_recorded_per_task_when_first_seen():
    weighting = GradNorm(TASKS)
    weighting.aggregate(GRADS[[0, 2]], torch.tensor([2.0, 0.5]), [0, 2])
    assert np.isnan(weighting.initial_losses.numpy()[1])
    weighting.aggregate(GRADS, torch.tensor([1.0, 0.7, 0.4]), [0, 1, 2])
    np.testing.assert_allclose(weighting.initial_losses.numpy(), [2.0, 0.7, 0.5])


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_gradnorm_backward_applies_its_weights_and_leaves_theta_grad_for_the_optimizer(scale):
    weighting, model = GradNorm(TASKS), TinyModel()
    with torch.no_grad():
        weighting.logits.copy_(torch.tensor([0.4, -0.3, 0.1]))
    weighting.initial_losses.copy_(torch.tensor([1.0, 2.0, 3.0]))
    losses = model.losses()
    values = torch.stack([l.detach().float() for l in losses.values()])
    rows = torch.stack([torch.autograd.grad(l, model.theta, retain_graph=True)[0] for l in losses.values()]).float()
    logs = weighting.backward(losses, model, _scaler(enabled=scale != 1.0, scale=scale))
    ref_w, ref_grad = _gradnorm_reference(weighting.logits, rows, values, torch.tensor([1.0, 2.0, 3.0]), 1.5)
    np.testing.assert_allclose([float(logs[f"train/weight/{t}"]) for t in TASKS], ref_w.numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.theta.grad.numpy() / scale, (ref_w.double() @ rows.double()).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(weighting.logits.grad.numpy() / scale, ref_grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(weighting.last_weights.numpy(), ref_w.numpy(), rtol=1e-6)


def _gradnorm_steps(weighting, steps):
    """aggregate, then a plain SGD step on theta, per step; returns the weights given."""
    given = []
    for values in steps:
        weighting.logits.grad = None
        given.append(weighting.aggregate(GRADS, torch.tensor(values), [0, 1, 2]).tolist())
        with torch.no_grad():
            weighting.logits -= 0.1 * weighting.logits.grad
    return given


def test_gradnorm_state_dict_round_trip():
    weighting = GradNorm(TASKS)
    _gradnorm_steps(weighting, STEPS[:3])
    fresh = GradNorm(TASKS)
    fresh.load_state_dict(weighting.state_dict())
    assert _gradnorm_steps(fresh, STEPS[3:]) == _gradnorm_steps(weighting, STEPS[3:])
    assert torch.equal(fresh.logits.grad, weighting.logits.grad)


# ------------------------------------------------------------------------------------------------------ configs


def _build(option, **expected):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["tasks=[segmentation,depth]", f"weighting={option}"])
    weighting = build_weighting(cfg, {"segmentation": None, "depth": None})
    assert weighting.tasks == ["segmentation", "depth"]
    for name, value in expected.items():
        assert getattr(weighting, name) == value, (option, name)
    return weighting


@pytest.mark.parametrize("option, cls, defaults", [
    ("gls", GeometricLossStrategy, {}),
    ("rlw", RandomLossWeighting, {"sum_to": "one"}),
    ("famo", FastAdaptiveMultitaskOptimization, {"w_lr": 0.025, "gamma": 0.01, "min_loss": 0.0}),
    ("stch", SmoothTchebycheff, {"mu": 1.0, "warmup_epochs": 5}),
    ("gradnorm", GradNorm, {"alpha": 1.5, "grad_target": "params", "grad_every": 1}),
])
def test_every_new_weighting_builds_from_its_config_with_the_papers_defaults(option, cls, defaults):
    weighting = _build(option, **defaults)
    assert isinstance(weighting, cls)
    weighting.train()
    weights = weighting.weights({"segmentation": torch.tensor(1.5), "depth": torch.tensor(0.5)})
    assert set(weights) == {"segmentation", "depth"} and all(float(w) > 0 for w in weights.values())
    assert set(weighting.state_dict()) == set(cls(["segmentation", "depth"]).state_dict())


def test_famo_same_batch_learns_from_the_step_batch_after_the_update():
    """The official variant: the logits step on (losses before, losses on the same batch after the update), and
    the next step's losses (another batch) are not compared with this one's."""
    weighting = FastAdaptiveMultitaskOptimization(TASKS, update="same_batch")
    weighting.train()
    reference = OfficialFAMO(len(TASKS), 0.025, 0.01)
    asked = []
    for before, after in zip(STEPS, STEPS[1:]):
        weights = weighting.weights(_famo_losses(before))
        z = torch.softmax(reference.w.detach(), -1).numpy()  # the weights use the logits before this step's update
        np.testing.assert_allclose(_floats(weights), z / (np.sum(z / np.array(before)) * np.array(before)), rtol=1e-5)
        weighting.after_step(lambda after=after: asked.append(1) or _famo_losses([v * 0.9 for v in after]))
        reference.update(torch.tensor(before), torch.tensor([v * 0.9 for v in after]))
        np.testing.assert_allclose(weighting.logits.numpy(), reference.w.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert len(asked) == len(STEPS) - 1 and int(weighting.adam_steps) == len(STEPS) - 1


def test_famo_next_batch_does_not_ask_for_the_losses_after_the_step():
    weighting = FastAdaptiveMultitaskOptimization(TASKS)
    weighting.after_step(lambda: pytest.fail("an extra forward pass"))
    with pytest.raises(UserError, match="update='same_bach' is not one of next_batch, same_batch"):
        FastAdaptiveMultitaskOptimization(TASKS, update="same_bach")
