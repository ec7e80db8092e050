"""ExcessMTL, MoCo, CR-MOGM, COSMOS and PBI (mtl_cli/weighting/{excess_mtl,moco,cr_mogm,cosmos,pbi}.py).

Each is checked against torchjd where torchjd has it (ExcessMTLWeighting, CRMOGMWeighting, the COSMOS and PBI
scalarizers; dev only: skipped without it), in float32 and float64, against a hand or numpy computation of its
defining formula or property, on badly scaled gradients (row norms 1e-6..1e3) for the gradient methods, and through
a state_dict round trip for the stateful ones. G [T, P] is the task-gradient matrix, the update c @ G.
"""

import io

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from test_cli import TINY, ok
from test_projection_methods import TASKS, _backward, _logged, _reference_gradients
from test_solver_methods import _badly_scaled

from mtl_cli.build import build_weighting
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.weighting import solvers
from mtl_cli.weighting.cagrad import CAGrad
from mtl_cli.weighting.cosmos import COSMOS
from mtl_cli.weighting.cr_mogm import CRMOGM, combinable_methods
from mtl_cli.weighting.excess_mtl import ExcessMTL
from mtl_cli.weighting.mgda import MGDA
from mtl_cli.weighting.moco import MoCo
from mtl_cli.weighting.pbi import PenaltyBoundaryIntersection

F64 = torch.float64
FOUR = ["a", "b", "c", "d"]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
TOL = {torch.float32: 1e-5, F64: 1e-10}


def _grads(rows, cols, seed, dtype=F64):
    return torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _combine(method, grads, losses=None, index=None):
    index = list(range(len(grads))) if index is None else index
    losses = torch.ones(len(grads), dtype=grads.dtype) if losses is None else losses
    return method.combine(grads, losses, index)


def _round_trip(method, fresh):
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _close(actual, expected, tol):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), rtol=tol,
                               atol=tol)


def _weights(method, losses):
    """A loss-based method's weights for the losses {task: value}, in task order, float64."""
    weights = method.weights({t: torch.tensor(v, dtype=F64) for t, v in losses.items()})
    return torch.stack([weights[t] for t in losses]).double()


# ------------------------------------------------------------------------------------------------- ExcessMTL


@DTYPES
@pytest.mark.parametrize("warmup", [1, 3])
def test_excess_mtl_matches_torchjd_over_several_steps(dtype, warmup):
    """torchjd's n_warmup_steps = k is our warmup_steps = k (it adds 1e-7 to the baseline: ~1e-9 apart)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    ours = ExcessMTL(FOUR, robust_step_size=1.0, warmup_steps=warmup)
    theirs = aggregation.ExcessMTLWeighting(robust_step_size=1.0, n_warmup_steps=warmup)
    for step in range(warmup + 4):
        grads = _grads(4, 9, seed=step, dtype=dtype)
        weights = ours.aggregate(grads, torch.ones(4, dtype=dtype), [0, 1, 2, 3])
        assert weights.dtype == dtype
        _close(weights, theirs(grads), max(TOL[dtype], 1e-8))
        moved = not torch.allclose(weights, torch.full_like(weights, 0.25))
        assert moved == (step >= warmup)  # uniform through the warm-up, then moving


def _excess(grads_so_far):
    """The official code's estimate for the last step: sum_p g^2 / sqrt(sum over the steps of g^2 + 1e-7)."""
    squares = sum(g**2 for g in grads_so_far)
    return (grads_so_far[-1] ** 2 / np.sqrt(squares + 1e-7)).sum(1)


def test_excess_mtl_weights_move_by_exp_of_the_excess_ratio_computed_by_hand():
    """w_k / w_{k-1} = exp(eta r) / normaliser with r = E_k / E_0 (numpy), from uniform weights; step 1 sets the
    baseline and leaves the weights uniform (the official code's first step)."""
    eta, method, seen = 0.5, ExcessMTL(FOUR, robust_step_size=0.5), []
    weights = np.full(4, 0.25)
    for step in range(5):
        grads = _grads(4, 6, seed=40 + step) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=F64)[:, None]
        seen.append(grads.numpy())
        ours = method.aggregate(grads, torch.ones(4, dtype=F64), [0, 1, 2, 3]).numpy()
        if step == 0:
            baseline = _excess(seen)
        else:
            weights = weights * np.exp(eta * _excess(seen) / baseline)
            weights = weights / weights.sum()
        np.testing.assert_allclose(ours, weights, rtol=1e-12, atol=0)
    assert not np.allclose(weights, 0.25)


def test_excess_mtl_ratios_do_not_depend_on_each_tasks_gradient_scale():
    """Scale processing (the paper's section 3.2): multiplying one task's gradients by a constant at every step
    leaves its excess ratio, hence the weights, unchanged (up to the 1e-7 under the square root)."""
    plain, scaled = ExcessMTL(FOUR, robust_step_size=1.0), ExcessMTL(FOUR, robust_step_size=1.0)
    factors = torch.tensor([10.0, 1.0, 0.1, 1.0], dtype=F64)[:, None]
    for step in range(4):
        grads = _grads(4, 30, seed=50 + step)
        a = plain.aggregate(grads, torch.ones(4, dtype=F64), [0, 1, 2, 3])
        b = scaled.aggregate(factors * grads, torch.ones(4, dtype=F64), [0, 1, 2, 3])
        _close(b, a, 1e-4)


@DTYPES
@pytest.mark.parametrize("seed", range(3))
def test_excess_mtl_on_badly_scaled_gradients_keeps_every_task(dtype, seed):
    """Row norms over 1e-6..1e3: every ratio stays of order 1, so no task is dropped for being small; the weights
    are finite, positive, on the simplex, float32 as float64, and the update is not zero."""
    method, in_f64 = ExcessMTL(FOUR, robust_step_size=1.0), ExcessMTL(FOUR, robust_step_size=1.0)
    for step in range(4):
        grads = _badly_scaled(10 * seed + step, dtype)
        weights = method.aggregate(grads, torch.ones(4, dtype=dtype), [0, 1, 2, 3])
        reference = in_f64.aggregate(grads.double(), torch.ones(4, dtype=F64), [0, 1, 2, 3])
        assert torch.isfinite(weights).all() and (weights > 0.05).all()
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
        _close(weights, reference, 1e-5)
        update = weights @ grads
        assert torch.isfinite(update).all() and float(update.norm()) > 0


def test_excess_mtl_absent_task_keeps_its_statistics_and_share():
    method = ExcessMTL(FOUR, robust_step_size=1.0)
    for step in range(2):
        method.aggregate(_grads(4, 5, seed=60 + step), torch.ones(4, dtype=F64), [0, 1, 2, 3])
    saved = {k: v.clone() for k, v in method.state_dict().items()}
    weights = method.aggregate(_grads(3, 5, seed=62), torch.ones(3, dtype=F64), [0, 2, 3])
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for name in ("squares", "seen", "baseline_sums", "log_weights"):
        assert torch.equal(method.state_dict()[name][1], saved[name][1]), name
    assert float(method.log_weights.exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert int(method.seen[1]) == 2 and int(method.seen[0]) == 3


def test_excess_mtl_state_dict_round_trip_sizes_the_buffer_and_gives_the_same_next_weights():
    _round_trip(ExcessMTL(FOUR), ExcessMTL(FOUR))  # an unsized state loads too
    method = ExcessMTL(FOUR, robust_step_size=1.0)
    for step in range(3):
        method.aggregate(_grads(4, 7, seed=70 + step), torch.ones(4, dtype=F64), [0, 1, 2, 3])
    fresh = _round_trip(method, ExcessMTL(FOUR, robust_step_size=1.0))
    assert fresh.squares.shape == (4, 7)
    grads = _grads(4, 7, seed=73)
    _close(fresh.aggregate(grads, torch.ones(4, dtype=F64), [0, 1, 2, 3]),
           method.aggregate(grads, torch.ones(4, dtype=F64), [0, 1, 2, 3]), 0)


def test_excess_mtl_rejects_bad_settings_and_the_representation_target():
    with pytest.raises(UserError, match="robust_step_size"):
        ExcessMTL(FOUR, robust_step_size=0.0)
    with pytest.raises(UserError, match="warmup_steps"):
        ExcessMTL(FOUR, warmup_steps=0)
    with pytest.raises(UserError, match="representation"):
        ExcessMTL(FOUR, grad_target="representation")


# ------------------------------------------------------------------------------------------------------ MoCo


def _onto_simplex_np(v):
    """The Euclidean projection onto the simplex by bisection on the threshold (independent of solvers.py)."""
    low, high = v.min() - 1, v.max()
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if np.maximum(v - middle, 0).sum() > 1 else (low, middle)
    return np.maximum(v - (low + high) / 2, 0)


def _moco_reference(steps, beta, beta_sigma, gamma, gamma_sigma, rho, normalize):
    """The paper's Algorithm 1 in numpy (no projection of Y onto a ball); normalize: LibMTL's g / |g| * L."""
    tracked, lam, updates = np.zeros_like(steps[0][0]), np.full(len(steps[0][0]), 1 / len(steps[0][0])), []
    for k, (grads, losses) in enumerate(steps, start=1):
        if normalize:
            grads = grads / (np.linalg.norm(grads, axis=1, keepdims=True) + 1e-8) * losses[:, None]
        tracked = tracked - beta / k**beta_sigma * (tracked - grads)
        gram = tracked @ tracked.T
        lam = _onto_simplex_np(lam - gamma / k**gamma_sigma * (gram @ lam + rho * lam))
        updates.append((lam @ tracked, lam))
    return updates


@DTYPES
@pytest.mark.parametrize("settings", [{}, {"rho": 0.3, "gamma": 0.5, "gamma_sigma": 0.0},
                                      {"normalization": "loss", "beta": 0.9, "beta_sigma": 1.0}],
                         ids=["defaults", "rho", "loss-normalised"])
def test_moco_follows_algorithm_1_computed_in_numpy(dtype, settings):
    full = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0, **settings}
    steps = [(_grads(3, 8, seed=80 + s).numpy(), np.array([0.5, 2.0, 1.0]) * (s + 1)) for s in range(6)]
    expected = _moco_reference(steps, *(full[k] for k in ("beta", "beta_sigma", "gamma", "gamma_sigma", "rho")),
                               normalize=settings.get("normalization") == "loss")
    method = MoCo(TASKS, **settings)
    for (grads, losses), (update, lam) in zip(steps, expected):
        ours_update, ours_lam = _combine(method, torch.tensor(grads).to(dtype), torch.tensor(losses).to(dtype))
        assert ours_update.dtype == dtype and float(ours_lam.sum()) == pytest.approx(1.0, abs=1e-6)
        _close(ours_lam, lam, max(TOL[dtype], 1e-9))
        _close(ours_update, update, max(TOL[dtype], 1e-9))


@pytest.mark.parametrize("grads", [
    torch.tensor([[1.0, 0.2, 0.0, 0.5, 0.0], [-0.3, 1.0, 0.4, 0.0, 0.1], [0.2, -0.4, 1.2, 0.0, 0.3]], dtype=F64),
    torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=F64),  # MGDA's optimum on an edge: (1/2, 1/2, 0)
], ids=["interior", "edge"])
def test_moco_on_a_constant_gradient_tracks_it_and_reaches_the_mgda_weights(grads):
    """With the same G at every step, Y -> G and the projected steps on lambda converge to MGDA's min-norm point
    (the exact solver), so the update becomes MGDA's."""
    method = MoCo(TASKS, beta_sigma=0.0, gamma=0.3, gamma_sigma=0.0)
    for _ in range(300):
        update, lam = _combine(method, grads)
    mgda, _ = solvers.min_norm_point(grads @ grads.T)
    _close(method.tracked, grads, 1e-12)
    _close(lam, mgda, 1e-8)
    _close(update, mgda @ grads, 1e-8)


@DTYPES
@pytest.mark.parametrize("seed", range(3))
def test_moco_on_badly_scaled_gradients_stays_on_the_simplex_and_moves(dtype, seed):
    """Row norms over 1e-6..1e3 (gamma_k Y Y^T up to 1e5): lambda stays on the simplex, the update is lambda @ Y,
    finite and not zero, and float32 gives float64's weights."""
    method, in_f64 = MoCo(FOUR), MoCo(FOUR)
    for step in range(4):
        grads = _badly_scaled(10 * seed + step, dtype)
        update, lam = _combine(method, grads)
        reference, reference_lam = _combine(in_f64, grads.double())
        assert torch.isfinite(update).all() and float(update.norm()) > 0
        assert (lam >= 0).all() and float(lam.sum()) == pytest.approx(1.0, abs=1e-6)
        _close(update, lam @ method.tracked, 1e-6)
        _close(lam, reference_lam, 1e-5)
        torch.testing.assert_close(update.double(), reference, rtol=1e-4, atol=1e-4 * float(reference.norm()))


def test_moco_absent_task_keeps_its_tracked_gradient_and_share():
    method = MoCo(FOUR)
    _combine(method, _grads(4, 5, seed=90))
    tracked, lambdas = method.tracked.clone(), method.lambdas.clone()
    update, lam = _combine(method, _grads(3, 5, seed=91), index=[0, 1, 3])
    assert torch.equal(method.tracked[2], tracked[2]) and method.lambdas[2] == lambdas[2]
    assert float(lam.sum()) == pytest.approx(1.0, abs=1e-12)
    _close(method.lambdas[[0, 1, 3]], lam * (1 - lambdas[2]), 1e-12)
    _close(update, lam @ method.tracked[[0, 1, 3]], 1e-12)


def test_moco_heads_get_their_own_gradient():
    model, logs = _backward(MoCo(TASKS))
    _, rows, heads = _reference_gradients()
    lam = _logged(logs).double()
    _close(model.theta.grad, lam @ (0.5 * rows), 1e-6)  # the first step tracks Y = beta G, beta_1 = 0.5
    for t in TASKS:
        _close(model.heads[t].grad, heads[t], 1e-6)


def test_moco_state_dict_round_trip_sizes_the_buffer_and_gives_the_same_next_update():
    _round_trip(MoCo(FOUR), MoCo(FOUR))  # an unsized state loads too
    method = MoCo(FOUR)
    for step in range(3):
        _combine(method, _grads(4, 6, seed=100 + step))
    fresh = _round_trip(method, MoCo(FOUR))
    assert fresh.tracked.shape == (4, 6) and int(fresh.updates) == 3
    grads = _grads(4, 6, seed=103)
    _close(_combine(fresh, grads)[0], _combine(method, grads)[0], 0)


def test_moco_rejects_bad_settings_and_the_representation_target():
    with pytest.raises(UserError, match="none, loss"):
        MoCo(FOUR, normalization="l2")
    with pytest.raises(UserError, match="beta"):
        MoCo(FOUR, beta=0.0)
    with pytest.raises(UserError, match="representation"):
        MoCo(FOUR, grad_target="representation")


# --------------------------------------------------------------------------------------------------- CR-MOGM


@DTYPES
@pytest.mark.parametrize("method, theirs", [("upgrad", "UPGradWeighting"), ("dualproj", "DualProjWeighting")])
def test_cr_mogm_matches_torchjd_over_several_steps(dtype, method, theirs):
    """Ours with norm_eps=1e-4 is torchjd's UPGrad / DualProj; CRMOGMWeighting averages their weights."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    ours = CRMOGM(FOUR, method=method, options={"norm_eps": 1e-4}, alpha=0.7)
    reference = aggregation.CRMOGMWeighting(getattr(aggregation, theirs)(), alpha=0.7)
    for step in range(4):
        grads = _grads(4, 9, seed=110 + step, dtype=dtype)
        ours_weights = ours.aggregate(grads, torch.ones(4, dtype=dtype), [0, 1, 2, 3])
        assert ours_weights.dtype == dtype
        _close(ours_weights, reference(grads @ grads.T), 1e-5 if dtype == torch.float32 else 1e-9)


def test_cr_mogm_is_the_moving_average_of_the_methods_coefficients_by_hand():
    """lambda_1 = lambda_hat_1, then alpha lambda_{k-1} + (1 - alpha) lambda_hat_k per task; a task absent keeps
    its average, one seen for the first time starts at its lambda_hat."""
    alpha, wrapped, alone = 0.8, CRMOGM(FOUR, method="cagrad", alpha=0.8), CAGrad(FOUR)
    average = torch.full((4,), torch.nan, dtype=F64)
    for step, index in enumerate([[0, 1, 3], [0, 1, 2, 3], [1, 2], [0, 1, 2, 3]]):
        grads = _grads(len(index), 7, seed=120 + step)
        ones = torch.ones(len(index), dtype=F64)
        fresh = alone.aggregate(grads, ones, index)
        previous = torch.where(average[index].isnan(), fresh, average[index])
        average[index] = alpha * previous + (1 - alpha) * fresh
        update, logged = wrapped.combine(grads, ones, index)
        _close(logged, average[index], 1e-12)
        _close(update, average[index] @ grads, 1e-12)
    assert not wrapped.loss_weights and wrapped.grad_target == "params"


@pytest.mark.parametrize("target", ["params", "representation"])
def test_cr_mogm_heads_follow_the_methods_kind_of_coefficients(target):
    """MGDA's coefficients are loss weights: the heads get the averaged ones; PCGrad's are not: raw gradients."""
    _, rows, heads = _reference_gradients()
    for method, weighted in (("mgda", True), ("pcgrad", False)):
        wrapper = CRMOGM(TASKS, method=method, grad_target=target)
        assert wrapper.grad_target == wrapper.inner.grad_target == target and wrapper.loss_weights == weighted
        model, logs = _backward(wrapper)
        weights = _logged(logs).double()
        for i, t in enumerate(TASKS):
            _close(model.heads[t].grad, heads[t] * (weights[i] if weighted else 1.0), 1e-6)
        _close(model.theta.grad, weights @ rows, 1e-6)  # the coefficients from feature gradients apply exactly


def test_cr_mogm_keeps_the_methods_state_in_its_own_and_a_round_trip_gives_the_same_next_update():
    method = CRMOGM(FOUR, method="gradvac", options={"beta": 0.3})
    assert method.inner.beta == 0.3
    for step in range(3):
        torch.manual_seed(step)  # GradVac's random orders
        _combine(method, _grads(4, 6, seed=130 + step))
    state = method.state_dict()
    assert {"averages", "started", "inner.targets"} <= set(state) and state["inner.targets"].abs().sum() > 0
    fresh = _round_trip(method, CRMOGM(FOUR, method="gradvac", options={"beta": 0.3}))
    updates = []
    for m in (method, fresh):
        torch.manual_seed(3)
        updates.append(_combine(m, _grads(4, 6, seed=133))[0])
    _close(updates[1], updates[0], 0)


def test_cr_mogm_counts_the_methods_solver_failures():
    method = CRMOGM(FOUR, method="nash_mtl")
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=F64)  # 0 in the hull: no solution
    _combine(method, grads)
    assert int(method.inner.solver_failures) == int(method.solver_failures) == 1


def test_cr_mogm_refuses_an_unknown_or_unfit_method_and_misplaced_keys():
    allowed = combinable_methods()
    assert {"mgda", "pcgrad", "cagrad", "upgrad", "nash_mtl"} <= set(allowed)
    assert not {"moco", "db_mtl", "graddrop", "imtl", "cr_mogm", "ew", "uw"} & set(allowed)
    with pytest.raises(UserError, match=r"'mgdaa'.*did you mean 'mgda'.*allowed: aligned_mtl, "):
        CRMOGM(FOUR, method="mgdaa")
    with pytest.raises(UserError, match="'db_mtl' is not a method whose coefficients can be averaged"):
        CRMOGM(FOUR, method="db_mtl")
    with pytest.raises(UserError, match="weighting.grad_target"):
        CRMOGM(FOUR, options={"grad_target": "representation"})
    with pytest.raises(UserError, match="GradVac does not support grad_target='representation'"):
        CRMOGM(FOUR, method="gradvac", grad_target="representation")
    with pytest.raises(UserError, match="grad_every=2 must be 1"):
        CRMOGM(FOUR, method="pcgrad", grad_every=2)
    with pytest.raises(UserError, match="weighting.method=mgda cannot be built"):
        CRMOGM(FOUR, options={"normalisation": "l2"})
    with pytest.raises(UserError, match="alpha"):
        CRMOGM(FOUR, alpha=1.5)


@pytest.mark.slow  # ~4 s: the message itself is checked above; this is the command line's exit and output
def test_cr_mogm_wrong_method_on_the_command_line_is_one_clear_error(mtl_main):
    result = mtl_main("train", "weighting=cr_mogm", "weighting.method=pcgard", *TINY)
    assert result.status == 2 and "Traceback" not in result.err
    assert "did you mean 'pcgrad'" in result.err and "allowed: aligned_mtl" in result.err


# ---------------------------------------------------------------------------------------------------- COSMOS


def _autograd(scalarizer, values):
    values = values.clone().requires_grad_()
    scalarizer(values).backward()
    return values.grad


LOSS_SETS = [[0.5, 2.0, 1.2], [3.0, 0.01, 0.7], [1e-3, 2e-3, 5e-4]]


@DTYPES
@pytest.mark.parametrize("values", LOSS_SETS)
@pytest.mark.parametrize("lambda_", [0.0, 2.0, 8.0])
def test_cosmos_weights_are_torchjds_gradient(dtype, values, lambda_):
    scalarization = pytest.importorskip("torchjd.scalarization")
    preference = {"seg": 2.0, "depth": 5.0, "cls": 3.0}
    losses = dict(zip(TASKS, torch.tensor(values, dtype=dtype)))
    ours = COSMOS(TASKS, lambda_=lambda_, preference=preference).weights(losses)
    a = torch.tensor([0.2, 0.5, 0.3], dtype=dtype)
    expected = _autograd(scalarization.COSMOS(lambda_, a), torch.tensor(values, dtype=dtype))
    _close(torch.stack([ours[t] for t in TASKS]), expected, 2e-5 * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("values", LOSS_SETS)
def test_cosmos_weights_are_the_gradient_by_finite_differences_and_keep_the_linear_part(values):
    """w = d/dL [a.L - lambda cos(a, L)] (central differences in numpy), and sum_t w_t L_t = a . L since the
    cosine does not change when L is scaled."""
    a, lam, L = np.array([0.2, 0.5, 0.3]), 2.0, np.array(values)

    def total(x):
        return a @ x - lam * (a @ x) / (np.linalg.norm(a) * np.linalg.norm(x))

    step = 1e-6 * np.linalg.norm(L)
    numeric = np.array([(total(L + step * e) - total(L - step * e)) / (2 * step) for e in np.eye(3)])
    w = _weights(COSMOS(TASKS, lambda_=lam, preference={"seg": 0.2, "depth": 0.5, "cls": 0.3}),
                 dict(zip(TASKS, map(float, L))))
    np.testing.assert_allclose(w.numpy(), numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max())
    assert float(w @ torch.tensor(L)) == pytest.approx(a @ L, rel=1e-6)


def test_cosmos_uniform_preference_on_the_ray_is_equal_weighting_and_absent_tasks_renormalise():
    method = COSMOS(TASKS)
    _close(_weights(method, {"seg": 0.7, "depth": 0.7, "cls": 0.7}), torch.full((3,), 1 / 3), 1e-7)
    a = torch.tensor([2.0, 1.0], dtype=F64)
    method = COSMOS(TASKS, preference={"seg": 2.0, "cls": 1.0})
    _close(_weights(method, {"seg": 1.0, "cls": 0.5}), a / 3, 1e-7)  # on its ray: the cosine's gradient is 0


def test_cosmos_draws_preferences_from_its_own_generator_and_resumes_the_stream():
    before = torch.get_rng_state()
    method = COSMOS(TASKS, concentration=1.2, seed=7)
    draws = torch.stack([method.draw() for _ in range(3)])
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    assert (draws > 0).all() and torch.allclose(draws.sum(1), torch.ones(3, dtype=F64))
    again = COSMOS(TASKS, concentration=1.2, seed=7)
    assert torch.equal(torch.stack([again.draw() for _ in range(3)]), draws)  # seeded
    assert not torch.equal(COSMOS(TASKS, concentration=1.2, seed=8).draw(), draws[0])
    fresh = _round_trip(method, COSMOS(TASKS, concentration=1.2, seed=0))
    assert torch.equal(fresh.draw(), method.draw())  # the stream goes on where the checkpoint left it


def test_cosmos_draws_follow_the_dirichlet_mean_and_give_the_weights_of_the_drawn_preference():
    method = COSMOS(TASKS, concentration={"seg": 1.0, "depth": 2.0, "cls": 3.0}, seed=1)
    draws = torch.stack([method.draw() for _ in range(800)])
    _close(draws.mean(0), [1 / 6, 2 / 6, 3 / 6], 0.03)  # the mean a_t = c_t / sum c, to 4.5 standard errors
    state = method.generator_state.clone()
    losses = {"seg": 0.5, "depth": 1.0, "cls": 2.0}
    weights = _weights(method, losses)
    method.generator_state.copy_(state)
    a = method.draw()
    expected = a - 2.0 * (a / (a.norm() * torch.tensor([0.5, 1.0, 2.0], dtype=F64).norm()))
    L = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    expected = expected + 2.0 * (a @ L) * L / (a.norm() * L.norm() ** 3)
    _close(weights, expected, 1e-6)


def test_cosmos_rejects_bad_settings():
    with pytest.raises(UserError, match="not both"):
        COSMOS(TASKS, preference={"seg": 1.0}, concentration=1.2)
    with pytest.raises(UserError, match="segmentaton"):
        COSMOS(TASKS, preference={"segmentaton": 1.0})
    with pytest.raises(UserError, match="positive"):
        COSMOS(TASKS, concentration=0.0)
    with pytest.raises(UserError, match="lambda_"):
        COSMOS(TASKS, lambda_=-1.0)


# ------------------------------------------------------------------------------------------------------- PBI


@DTYPES
@pytest.mark.parametrize("values", LOSS_SETS)
@pytest.mark.parametrize("theta", [0.0, 5.0])
def test_pbi_weights_are_torchjds_gradient(dtype, values, theta):
    scalarization = pytest.importorskip("torchjd.scalarization")
    losses = dict(zip(TASKS, torch.tensor(values, dtype=dtype)))
    ours = PenaltyBoundaryIntersection(TASKS, theta=theta, preference={"seg": 1.0, "depth": 3.0, "cls": 2.0},
                                       reference={"depth": -0.1}).weights(losses)
    reference = torch.tensor([0.0, -0.1, 0.0], dtype=dtype)
    pbi = scalarization.PBI(theta, torch.tensor([1.0, 3.0, 2.0], dtype=dtype), reference)
    expected = _autograd(pbi, torch.tensor(values, dtype=dtype))
    _close(torch.stack([ours[t] for t in TASKS]), expected, 1e-5 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("values", LOSS_SETS)
def test_pbi_weights_are_the_gradient_of_d1_plus_theta_d2_by_hand(values):
    """d1 = (L - z).r/|r|, d2 = |L - z - d1 r/|r||: w by central differences (numpy); sum_t w_t (L_t - z_t) =
    d1 + theta d2 (the total is homogeneous in L - z) and w . r/|r| = 1."""
    r, z, theta, L = np.array([1.0, 3.0, 2.0]), np.array([0.0, -0.1, 0.0]), 5.0, np.array(values)
    unit = r / np.linalg.norm(r)

    def total(x):
        d1 = (x - z) @ unit
        return d1 + theta * np.linalg.norm(x - z - d1 * unit)

    step = 1e-6 * np.linalg.norm(L)
    numeric = np.array([(total(L + step * e) - total(L - step * e)) / (2 * step) for e in np.eye(3)])
    w = _weights(PenaltyBoundaryIntersection(TASKS, preference={"seg": 1.0, "depth": 3.0, "cls": 2.0},
                                             reference={"depth": -0.1}), dict(zip(TASKS, map(float, L))))
    np.testing.assert_allclose(w.numpy(), numeric, rtol=1e-5, atol=1e-6)
    assert float(w @ torch.tensor(L - z)) == pytest.approx(total(L), rel=1e-9)
    assert float(w @ torch.tensor(unit)) == pytest.approx(1.0, abs=1e-12)


def test_pbi_on_the_ray_weighs_by_the_unit_preference_and_absent_tasks_renormalise():
    method = PenaltyBoundaryIntersection(TASKS, preference={"seg": 1.0, "depth": 2.0, "cls": 2.0})
    unit = torch.tensor([1.0, 2.0, 2.0], dtype=F64) / 3
    _close(_weights(method, {"seg": 0.5, "depth": 1.0, "cls": 1.0}), unit, 1e-6)  # d2 = 0 there
    _close(_weights(method, {"depth": 0.25, "cls": 0.25}), torch.full((2,), 2**-0.5), 1e-6)


def test_pbi_rejects_bad_settings():
    with pytest.raises(UserError, match="theta"):
        PenaltyBoundaryIntersection(TASKS, theta=-1.0)
    with pytest.raises(UserError, match="non-negative"):
        PenaltyBoundaryIntersection(TASKS, preference={"seg": -1.0})
    with pytest.raises(UserError, match="segmentaton"):
        PenaltyBoundaryIntersection(TASKS, reference={"segmentaton": 0.0})


# ----------------------------------------------------------------------------------------------------- configs


def _build(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["tasks=[segmentation,depth]", *overrides])
    return build_weighting(cfg, {"segmentation": None, "depth": None})


DEFAULTS = {
    "excess_mtl": (ExcessMTL, {"robust_step_size": 0.01, "warmup_steps": 1, "grad_target": "params"}),
    "moco": (MoCo, {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0,
                    "normalization": "none", "grad_target": "params"}),
    "cr_mogm": (CRMOGM, {"method": "mgda", "alpha": 0.9, "grad_target": "params", "loss_weights": True}),
    "cosmos": (COSMOS, {"lambda_": 2.0, "concentration": None}),
    "pbi": (PenaltyBoundaryIntersection, {"theta": 5.0}),
}


@pytest.mark.parametrize("option", sorted(DEFAULTS))
def test_every_option_builds_from_its_config_with_the_papers_defaults(option):
    cls, defaults = DEFAULTS[option]
    weighting = _build([f"weighting={option}"])
    assert type(weighting) is cls and weighting.tasks == ["segmentation", "depth"]
    for name, value in defaults.items():
        assert getattr(weighting, name) == value, name


def test_config_options_reach_the_wrapped_method():
    wrapper = _build(["weighting=cr_mogm", "weighting.method=cagrad", "weighting.options={c:0.2}",
                      "weighting.grad_target=representation"])
    assert isinstance(wrapper.inner, CAGrad) and wrapper.inner.c == 0.2
    assert wrapper.grad_target == "representation" and not wrapper.loss_weights
    mgda_ub = _build(["weighting=cr_mogm", "weighting.method=mgda_ub"])
    assert isinstance(mgda_ub.inner, MGDA) and mgda_ub.grad_target == "representation"


def test_config_options_reach_the_loss_based_methods():
    cosmos = _build(["weighting=cosmos", "weighting.concentration=1.2", "seed=3"])
    assert torch.equal(cosmos.generator_state, torch.Generator().manual_seed(3).get_state())
    assert _build(["weighting=pbi", "weighting.preference={depth:2.0}"]).preference.tolist() == [1.0, 2.0]


# ------------------------------------------------------------------------------------------------------ resume


@pytest.mark.slow  # three short runs each (~40 s); the state_dict round trips above check the same state cheaply
@pytest.mark.parametrize("overrides", [["weighting=moco"], ["weighting=excess_mtl"],
                                       ["weighting=cr_mogm", "weighting.method=gradvac"],
                                       ["weighting=cosmos", "weighting.concentration=1.2"]],
                         ids=["moco", "excess_mtl", "cr_mogm", "cosmos"])
def test_resuming_gives_the_uninterrupted_run(mtl_main, tmp_path, overrides):
    """As test_weighting_cli's check of the stateful methods: the weighting's buffers (MoCo's and ExcessMTL's
    sized at the first step, the wrapped method's, the preference generator's) and the model come out equal."""
    args = [*TINY, *overrides, "trainer.limit_train_batches=2", "logger=console"]
    ok(mtl_main("train", *args, f"hydra.run.dir={tmp_path / 'straight'}"))
    ok(mtl_main("train", *args, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'short'}"))
    ok(mtl_main("train", f"resume={tmp_path / 'short' / 'checkpoints' / 'last.pt'}", "trainer.max_epochs=2",
                f"hydra.run.dir={tmp_path / 'resumed'}"))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
            for run in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2 and a["weighting"].keys() == b["weighting"].keys()
    for part in ("weighting", "model"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name}"
