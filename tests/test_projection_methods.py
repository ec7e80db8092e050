"""Gradient methods (mtl_cli/weighting/): PCGrad, GradVac, GradDrop, IMTL, Aligned-MTL, DB-MTL.

Each is checked on small hand-made matrices against what its paper states, against torchjd where torchjd implements
the same method (dev only: skipped without it), through a backward on a tiny model (shared update, heads, learned
parameters) and, for the stateful ones, through a state_dict round trip. Everything runs in float64, to 1e-10,
except what goes through the trainer's float32 task-gradient matrix (the backward tests, 1e-6) and the comparisons
with torchjd (1e-5, the brief's bound; they agree to ~1e-12 in float64).
"""

import io

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mtl_cli.build import build_weighting
from mtl_cli.errors import UserError
from mtl_cli.paths import config_dir
from mtl_cli.weighting import solvers
from mtl_cli.weighting.aligned_mtl import AlignedMTL, balance_transform
from mtl_cli.weighting.conflict_free import ConFIG
from mtl_cli.weighting.base import GradientWeighting
from mtl_cli.weighting.db_mtl import DBMTL
from mtl_cli.weighting.graddrop import GradDrop
from mtl_cli.weighting.gradients import FeatureCut
from mtl_cli.weighting.gradvac import GradVac, vaccinate
from mtl_cli.weighting.imtl import IMTL, impartial_coefficients
from mtl_cli.weighting.pcgrad import PCGrad, project_conflicts

TASKS = ["seg", "depth", "cls"]
F64 = torch.float64

# Three task gradients over four parameters: g0 conflicts with g1 and g2, g1 and g2 agree.
CONFLICTING = torch.tensor([[1.0, 2.0, 0.0, -1.0],
                            [-1.0, 0.0, 1.0, 0.5],
                            [0.0, -1.0, 2.0, 1.5]], dtype=F64)
AGREEING = torch.tensor([[1.0, 0.0, 2.0, 0.5],
                         [0.5, 1.0, 0.0, 0.0],
                         [0.0, 0.5, 1.0, 1.0]], dtype=F64)


def _random(rows=3, cols=7, seed=0):
    return torch.randn(rows, cols, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _combine(method, grads, losses=None, index=None):
    index = list(range(len(grads))) if index is None else index
    losses = torch.ones(len(grads), dtype=F64) if losses is None else losses
    return method.combine(grads, losses, index)


def _round_trip(method, fresh):
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _close(actual, expected, tol=1e-10):
    expected = torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


class TwoLevelModel(nn.Module):
    """A shared vector theta -> features f = theta * (1, 2, -1); task t's loss is a positive polynomial of f and of
    its own head parameter h_t. `encode` and `shared_parameters` as the trainer's models have them."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.5, -1.5, 2.0], dtype=F64))
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.tensor(v, dtype=F64))
                                       for t, v in zip(TASKS, [0.7, -1.2, 2.0])})

    def shared_parameters(self):
        return [self.theta]

    def encode(self):
        return [self.theta * torch.tensor([1.0, 2.0, -1.0], dtype=F64)]

    def losses(self, features, present=TASKS):
        (a, b, c), h = features[0], self.heads
        every = {"seg": (h["seg"] * a + b) ** 2 + 0.5, "depth": (a - h["depth"] * c) ** 2 + 0.1,
                 "cls": h["cls"] ** 2 * (b + c) ** 2 + 0.3 * a ** 2 + 1.0}
        return {t: every[t] for t in present}


def _reference_gradients(present=TASKS):
    """The losses, the rows dL_t/dtheta and dL_t/dh_t, by plain autograd."""
    model = TwoLevelModel()
    losses = model.losses(model.encode(), present)
    rows = torch.stack([torch.autograd.grad(losses[t], model.theta, retain_graph=True)[0] for t in present])
    heads = {t: torch.autograd.grad(losses[t], model.heads[t], retain_graph=True)[0] for t in present}
    return torch.stack([losses[t].detach() for t in present]), rows, heads


def _backward(method, present=TASKS):
    """One backward as the training loop does it: the heads read the features through a cut. The task-gradient
    matrix is float32 (gradients.py), so what depends on it is compared to 1e-6."""
    model = TwoLevelModel()
    cut = FeatureCut(model.encode())
    logs = method.backward(model.losses(cut.leaves, present), model, torch.amp.GradScaler("cpu", enabled=False), cut)
    return model, logs


def _logged(logs, present=TASKS):
    return torch.stack([logs[f"train/weight/{t}"] for t in present])


# ----------------------------------------------------------------------------------------------------- PCGrad


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    assert (AGREEING @ AGREEING.T >= 0).all()
    update, coefficients = _combine(PCGrad(TASKS), AGREEING)
    _close(coefficients, torch.ones(3))
    _close(update, AGREEING.sum(0))


def test_pcgrad_on_two_conflicting_gradients_matches_the_hand_projection():
    g1, g2 = CONFLICTING[0], CONFLICTING[1]
    assert g1 @ g2 < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    update, _ = _combine(PCGrad(TASKS[:2]), CONFLICTING[:2])
    _close(update, p1 + p2)
    assert abs(float(p1 @ g2)) < 1e-12 and abs(float(p2 @ g1)) < 1e-12  # projected onto the normal plane


@pytest.mark.parametrize("orders", [[[1, 2], [0, 2], [0, 1]], [[2, 1], [2, 0], [1, 0]]])
def test_pcgrad_projections_follow_the_given_order(orders):
    """`project_conflicts` against the projections done on the vectors themselves, in the same orders. Each g_i'
    ends up with a non-negative inner product with every g_j it was projected against when those do not conflict
    with one another (here g_1 . g_2 > 0); in general only with the last one, since a projection onto g_k can undo
    an earlier one onto g_j when g_j . g_k < 0, as the paper's algorithm allows."""
    grads = CONFLICTING
    rows = project_conflicts(grads @ grads.T, orders)
    for i, order in enumerate(orders):
        projected, against = grads[i].clone(), []
        for j in order:
            if projected @ grads[j] < 0:
                projected -= (projected @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
                against.append(j)
        _close(rows[i] @ grads, projected)
        assert all(float(projected @ grads[j]) >= -1e-12 for j in against)
    assert float(grads[1] @ grads[2]) > 0 and rows[0, 1] > 0 and rows[0, 2] > 0  # g_0 was projected on both


def test_pcgrad_draws_its_orders_from_the_global_generator():
    grads = _random(4, 9, seed=3)
    torch.manual_seed(5)
    first, _ = _combine(PCGrad(TASKS + ["x"]), grads)
    torch.manual_seed(5)
    again, _ = _combine(PCGrad(TASKS + ["x"]), grads)
    _close(first, again, tol=0)


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_matches_torchjd(seed):
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _random(4, 9, seed=seed)
    torch.manual_seed(seed)
    ours, _ = _combine(PCGrad(TASKS + ["x"]), grads)
    torch.manual_seed(seed)  # both draw one randperm(T) per task, in task order
    _close(ours, aggregation.PCGrad()(grads), tol=1e-5)


# ---------------------------------------------------------------------------------------------------- GradVac


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("grads", [CONFLICTING, _random(4, 9, seed=1)], ids=["hand", "random"])
def test_gradvac_with_zero_targets_projects_conflicts_like_pcgrad(grads):
    """With phi_hat = 0 (the start) the correction of a conflict is -(g_i' . g_j / |g_j|^2) g_j, PCGrad's."""
    orders = [[j for j in range(len(grads)) if j != i] for i in range(len(grads))]
    targets = torch.zeros(len(grads), len(grads), dtype=F64)
    rows = vaccinate(grads @ grads.T, targets, orders, beta=0.01, eps=1e-8)
    _close(rows, project_conflicts(grads @ grads.T, orders), tol=1e-6)  # up to eps in the cosines


def test_gradvac_raises_a_low_cosine_exactly_to_its_target_and_moves_the_target_by_beta():
    grads = CONFLICTING[1:]  # cosine 0.68 < 0.9
    before = _cos(grads[0], grads[1])
    targets = torch.tensor([[0.0, 0.9], [0.1, 0.0]], dtype=F64)  # g_1 is above its target 0.1 for g_0
    rows = vaccinate(grads @ grads.T, targets, [[1], [0]], beta=0.25, eps=0.0)
    raised = rows[0] @ grads
    assert _cos(raised, grads[1]) == pytest.approx(0.9, abs=1e-12)
    assert rows[0, 0] == 1 and rows[0, 1] > 0  # g_0' = g_0 + w g_1
    _close(rows[1], [0.0, 1.0])  # above target: unchanged
    _close(targets, [[0.0, 0.75 * 0.9 + 0.25 * before], [0.75 * 0.1 + 0.25 * before, 0.0]])


def test_gradvac_keeps_the_targets_of_absent_tasks():
    method = GradVac(TASKS, beta=0.5)
    _combine(method, CONFLICTING)
    saved = method.targets.clone()
    _combine(method, CONFLICTING[[0, 2]], index=[0, 2])
    assert torch.equal(method.targets[1], saved[1]) and torch.equal(method.targets[:, 1], saved[:, 1])
    assert method.targets[0, 2] != saved[0, 2]


@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_gradvac_matches_torchjd_over_several_steps(beta):
    aggregation = pytest.importorskip("torchjd.aggregation")
    ours, theirs = GradVac(TASKS + ["x"], beta=beta), aggregation.GradVac(beta=beta)
    for step in range(4):
        grads = _random(4, 9, seed=10 + step)
        torch.manual_seed(step)  # both draw one randperm(T - 1) of the others per task, in task order
        update, _ = _combine(ours, grads)
        torch.manual_seed(step)
        _close(update, theirs(grads), tol=1e-5)


def test_gradvac_state_dict_round_trip_gives_the_same_next_update():
    method = GradVac(TASKS, beta=0.3)
    for step in range(2):
        torch.manual_seed(step)
        _combine(method, _random(seed=step))
    fresh = _round_trip(method, GradVac(TASKS, beta=0.3))
    updates = []
    for m in (method, fresh):
        torch.manual_seed(2)
        updates.append(_combine(m, _random(seed=2))[0])
    _close(updates[1], updates[0], tol=0)


def test_gradvac_accepts_only_the_parameters_gradients():
    with pytest.raises(UserError, match="representation"):
        GradVac(TASKS, grad_target="representation")


# --------------------------------------------------------------------------------------------------- GradDrop


def test_graddrop_keeps_everything_when_every_gradient_is_positive():
    grads = AGREEING.abs() + 0.1
    update, kept = _combine(GradDrop(TASKS), grads)
    _close(update, grads.sum(0))
    _close(kept, torch.ones(3))


def test_graddrop_with_a_fixed_seed_matches_the_hand_computed_mask():
    grads = CONFLICTING
    torch.manual_seed(11)
    draw = torch.rand(grads.shape[1], dtype=F64)
    torch.manual_seed(11)
    update, kept = _combine(GradDrop(TASKS), grads)
    expected = torch.zeros(grads.shape[1], dtype=F64)
    masked = torch.zeros_like(grads)
    for k in range(grads.shape[1]):
        column = grads[:, k].tolist()
        purity = 0.5 * (1 + sum(column) / sum(abs(v) for v in column))
        for i, v in enumerate(column):
            if (purity > draw[k] and v > 0) or (purity < draw[k] and v < 0):
                masked[i, k] = v
        expected[k] = masked[:, k].sum()
    _close(update, expected)
    _close(kept, (masked * grads).sum(1) / (grads * grads).sum(1))


def _masked_row(grads, seed):
    torch.manual_seed(seed)
    draw = torch.rand(grads.shape[1], dtype=F64)
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0))
    return torch.where(grads > 0, purity > draw, purity < draw) * grads


def test_graddrop_leak_lets_a_share_of_each_gradient_through():
    grads = CONFLICTING
    torch.manual_seed(4)
    plain, kept = _combine(GradDrop(TASKS), grads)
    torch.manual_seed(4)
    leaky, kept_leaky = _combine(GradDrop(TASKS, leak={"depth": 1.0}), grads)
    _close(leaky - plain, grads[1] - _masked_row(grads, 4)[1])
    assert float(kept_leaky[1]) == pytest.approx(1.0)
    _close(kept_leaky[[0, 2]], kept[[0, 2]])


def test_graddrop_rejects_a_leak_for_an_unknown_task_or_out_of_range():
    with pytest.raises(UserError, match="segmentaton"):
        GradDrop(TASKS, leak={"segmentaton": 0.5})
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        GradDrop(TASKS, leak=1.5)


@pytest.mark.parametrize("seed", range(3))
def test_graddrop_matches_torchjd(seed):
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _random(3, 50, seed=seed)
    torch.manual_seed(seed)  # both draw one uniform per coordinate, in the matrix's dtype
    ours, _ = _combine(GradDrop(TASKS, leak={"cls": 0.3}), grads)
    torch.manual_seed(seed)
    _close(ours, aggregation.GradDrop(leak=torch.tensor([0.0, 0.0, 0.3], dtype=F64))(grads), tol=1e-5)


# ------------------------------------------------------------------------------------------------------- IMTL


def _paper_imtl_g(grads):
    """The paper's closed form: alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:T}, with D the
    rows g_1 - g_t and U the rows u_1 - u_t (t >= 2), u_t = g_t / |g_t|."""
    units = grads / grads.norm(dim=1, keepdim=True)
    D, U = grads[:1] - grads[1:], units[:1] - units[1:]
    rest = grads[0] @ U.T @ torch.linalg.inv(D @ U.T)
    return torch.cat([1 - rest.sum()[None], rest])


@pytest.mark.parametrize("grads", [CONFLICTING, _random(4, 9, seed=2)], ids=["hand", "random"])
def test_imtl_g_gives_equal_projections_on_every_unit_gradient_and_sums_to_one(grads):
    method = IMTL(TASKS + ["x"], mode="gradient")
    update, alpha = _combine(method, grads)
    projections = (grads / grads.norm(dim=1, keepdim=True)) @ update
    _close(projections, projections[0].expand_as(projections))
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    _close(alpha, _paper_imtl_g(grads))  # the pinv form agrees with the paper's closed form


def test_imtl_g_with_dependent_rows_still_balances_the_projections():
    grads = torch.cat([CONFLICTING[:2], 2 * CONFLICTING[:1]])  # g_2 = 2 g_0: M is singular
    alpha = impartial_coefficients(grads @ grads.T, rtol=1e-12)
    projections = (grads / grads.norm(dim=1, keepdim=True)) @ (alpha @ grads)
    _close(projections, projections[0].expand_as(projections))


@pytest.mark.parametrize("seed", range(3))
def test_imtl_g_matches_torchjd(seed):
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _random(4, 9, seed=seed)
    update, _ = _combine(IMTL(TASKS + ["x"], mode="gradient"), grads)
    _close(update, aggregation.IMTLG()(grads), tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(3))
def test_imtl_g_balances_badly_scaled_gradients_in_training_precision(dtype, seed):
    """Row norms spread over 1e-6..1e3, as a small-loss task next to segmentation: the update still projects
    equally on every unit gradient (no task is dropped for being small), in float32 as training runs it."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(4, 200, dtype=F64, generator=generator)
    scales = torch.tensor([1e3, 1.0, 1e-3, 1e-6], dtype=F64)
    grads = (directions / directions.norm(dim=1, keepdim=True) * scales[:, None]).to(dtype)
    update, alpha = _combine(IMTL(TASKS + ["x"], mode="gradient"), grads)
    assert update.dtype == dtype and torch.isfinite(update).all() and update.norm() > 0
    units = directions / directions.norm(dim=1, keepdim=True)
    projections = units @ update.double()
    torch.testing.assert_close(projections, projections[0].expand(4), rtol=1e-4, atol=0)
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-9)
    reference, _ = _combine(IMTL(TASKS + ["x"], mode="gradient"), grads.double())
    torch.testing.assert_close(update.double(), reference, rtol=1e-4, atol=1e-9 * float(reference.norm()))


def test_imtl_g_without_a_solution_counts_a_solver_failure_and_leaves_the_shared_update_at_zero():
    grads = torch.stack([CONFLICTING[0], -CONFLICTING[0]])  # no direction has equal projections on both
    method = IMTL(TASKS[:2], mode="gradient")
    update, _ = _combine(method, grads)
    assert int(method.solver_failures) == 1
    _close(update, torch.zeros(4))


def test_imtl_hybrid_backward_balances_the_scaled_gradients_and_trains_the_scales():
    """hybrid: IMTL-G on the rows e^{s_t} g_t, so c_t = alpha_t e^{s_t}; heads get e^{s_t} dL_t/dh_t; s gets
    d/ds sum_t (e^{s_t} L_t - s_t) = e^{s_t} L_t - 1."""
    method = IMTL(TASKS)
    s = torch.tensor([0.3, -0.8, 1.1], dtype=F64)
    with torch.no_grad():
        method.log_scales.copy_(s)
    model, logs = _backward(method)
    losses, rows, heads = _reference_gradients()
    scaled = s.exp()[:, None] * rows
    alpha = _paper_imtl_g(scaled)
    _close(_logged(logs), (alpha * s.exp()).float(), tol=1e-6)
    _close(model.theta.grad, alpha @ scaled, tol=1e-6)
    for i, t in enumerate(TASKS):
        _close(model.heads[t].grad, s.exp()[i] * heads[t], tol=1e-6)
    _close(method.log_scales.grad, (s.exp() * losses - 1).float(), tol=1e-6)


def test_imtl_loss_mode_is_a_loss_weighting_with_learned_scales():
    method = IMTL(TASKS, mode="loss")
    s = torch.tensor([0.3, -0.8, 1.1])
    with torch.no_grad():
        method.log_scales.copy_(s)
    model, logs = _backward(method, present=["seg", "cls"])
    losses, rows, heads = _reference_gradients(["seg", "cls"])
    e = s.double().exp()[[0, 2]]
    _close(_logged(logs, ["seg", "cls"]), e.float(), tol=1e-6)
    _close(model.theta.grad, e @ rows, tol=1e-6)
    _close(model.heads["seg"].grad, e[0] * heads["seg"], tol=1e-6)
    assert model.heads["depth"].grad is None
    _close(method.log_scales.grad, torch.tensor([e[0] * losses[0] - 1, 0.0, e[1] * losses[1] - 1]), tol=1e-6)


def test_imtl_gradient_mode_has_no_scales_and_raw_heads():
    method = IMTL(TASKS, mode="gradient")
    assert list(method.parameters()) == []
    model, _ = _backward(method)
    _, _, heads = _reference_gradients()
    for t in TASKS:
        _close(model.heads[t].grad, heads[t], tol=1e-6)


def test_imtl_state_dict_round_trip_gives_the_same_next_coefficients():
    method = IMTL(TASKS)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    for _ in range(2):
        _backward(method)
        optimizer.step()
        optimizer.zero_grad()
    assert (method.log_scales != 0).all()
    fresh = _round_trip(method, IMTL(TASKS))
    grads = _random(seed=4)
    _close(_combine(fresh, grads)[1], _combine(method, grads)[1], tol=0)


def test_imtl_rejects_an_unknown_mode():
    with pytest.raises(UserError, match="hybrid, gradient, loss"):
        IMTL(TASKS, mode="hybird")


# ----------------------------------------------------------------------------------------------------- ConFIG


@pytest.mark.parametrize("seed", range(3))
def test_config_equals_torchjd(seed):
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _random(4, 9, seed=seed)
    update, _ = _combine(ConFIG(TASKS + ["x"]), grads)
    _close(update, aggregation.ConFIG()(grads), tol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(3))
def test_config_gives_every_task_the_same_positive_cosine_with_badly_scaled_gradients(dtype, seed):
    """ConFIG's defining property: cos(g_i, d) is the same for every task, with gradient norms over 1e-6..1e3 in
    float32 as training runs it; and d's length is the sum of the gradients' projections on its direction."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(4, 200, dtype=F64, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    grads = (directions * torch.tensor([1e3, 1.0, 1e-3, 1e-6], dtype=F64)[:, None]).to(dtype)
    update, _ = _combine(ConFIG(TASKS + ["x"]), grads)
    d = update.double()
    cosines = directions @ d / d.norm()
    assert float(cosines.min()) > 0
    torch.testing.assert_close(cosines, cosines[0].expand(4), rtol=1e-4, atol=0)
    assert float(d.norm()) == pytest.approx(float((grads.double() @ d / d.norm()).sum()), rel=1e-5)


def test_config_is_zero_without_a_common_direction():
    grads = torch.stack([CONFLICTING[0], -CONFLICTING[0]])  # opposite: no direction has equal positive cosines
    update, _ = _combine(ConFIG(TASKS[:2]), grads)
    _close(update, torch.zeros(4))


# ------------------------------------------------------------------------------------------------ Aligned-MTL


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_rows_are_orthogonal_with_equal_norms(scale_mode):
    grads = _random(4, 9, seed=5)
    gram = grads @ grads.T
    aligned = balance_transform(gram, scale_mode, eps=1e-16) @ grads
    eigenvalues = torch.linalg.eigvalsh(gram)
    sigma2 = {"min": eigenvalues.min(), "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[scale_mode]
    _close(aligned @ aligned.T, sigma2 * torch.eye(4, dtype=F64))


def test_aligned_mtl_update_is_the_mean_of_the_aligned_rows_by_default_and_follows_preferences():
    grads = _random(3, 6, seed=6)
    aligned = balance_transform(grads @ grads.T, "min", eps=1e-16) @ grads
    update, _ = _combine(AlignedMTL(TASKS), grads)
    _close(update, aligned.mean(0))
    update, _ = _combine(AlignedMTL(TASKS, preferences={"seg": 2.0}), grads)
    _close(update, (2 * aligned[0] + aligned[1] + aligned[2]) / 4)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_aligned_mtl_matches_torchjd(scale_mode, rank_deficient):
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _random(4, 9, seed=7)
    if rank_deficient:
        grads[3] = grads[0] - 0.5 * grads[1]
    update, _ = _combine(AlignedMTL(TASKS + ["x"], scale_mode=scale_mode), grads)
    _close(update, aggregation.AlignedMTL(scale_mode=scale_mode)(grads), tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_aligns_badly_scaled_gradients_in_training_precision(dtype, scale_mode):
    """Row norms over 1e-6..1e3 make G G^T's condition number 1e18: the aligned rows are still orthogonal with
    equal norms (relative to sigma^2), and float32 gives float64's update (they were 800 times apart)."""
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(4, 200, dtype=F64, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    grads = (directions * torch.tensor([1e3, 1.0, 1e-3, 1e-6], dtype=F64)[:, None]).to(dtype)
    transform = balance_transform(solvers.gramian(grads), scale_mode, torch.finfo(dtype).eps)
    aligned = transform @ grads.double()
    sigma2 = float(aligned.norm(dim=1).square().mean())
    torch.testing.assert_close(aligned @ aligned.T / sigma2, torch.eye(4, dtype=F64), rtol=0, atol=1e-5)
    update, _ = _combine(AlignedMTL(TASKS + ["x"], scale_mode=scale_mode), grads)
    reference, _ = _combine(AlignedMTL(TASKS + ["x"], scale_mode=scale_mode), grads.double())
    torch.testing.assert_close(update.double(), reference, rtol=1e-4, atol=0)


def test_aligned_mtl_rejects_an_unknown_scale_mode_or_task():
    with pytest.raises(UserError, match="min, median, rmse"):
        AlignedMTL(TASKS, scale_mode="max")
    with pytest.raises(UserError, match="segmentaton"):
        AlignedMTL(TASKS, preferences={"segmentaton": 1.0})


# ----------------------------------------------------------------------------------------------------- DB-MTL


def _db_update(averages, eps=1e-8):
    norms = averages.norm(dim=1)
    return (norms.max() / (norms + eps)) @ averages


def test_db_mtl_first_step_is_the_max_norm_scaled_sum_of_normalised_log_loss_gradients():
    grads, losses = _random(seed=8), torch.tensor([0.5, 2.0, 7.0], dtype=F64)
    log_grads = grads / (losses[:, None] + 1e-8)
    norms = log_grads.norm(dim=1)
    update, alpha = _combine(DBMTL(TASKS, beta=0.9), grads, losses)
    # the average starts at 0, so after one step it is (1 - beta) times the log-loss gradient
    _close(update, 0.1 * norms.max() * (log_grads / norms[:, None]).sum(0), tol=1e-7)
    _close(alpha, norms.max() / (norms + 1e-7), tol=1e-12)


def test_db_mtl_averages_over_steps_keeps_absent_tasks_and_decays_the_rate():
    method, beta, sigma = DBMTL(TASKS, beta=0.9, beta_sigma=0.5, eps=0.0), 0.9, 0.5
    steps = [(_random(seed=20), torch.tensor([1.0, 2.0, 3.0], dtype=F64), [0, 1, 2]),
             (_random(2, seed=21), torch.tensor([0.5, 4.0], dtype=F64), [0, 2]),
             (_random(seed=22), torch.tensor([2.0, 1.0, 0.25], dtype=F64), [0, 1, 2])]
    averages, seen = torch.zeros(3, 7, dtype=F64), [0, 0, 0]
    for grads, losses, index in steps:
        update, _ = _combine(method, grads, losses, index)
        for row, t in enumerate(index):
            seen[t] += 1
            rate = beta / seen[t] ** sigma
            averages[t] = rate * averages[t] + (1 - rate) * grads[row] / losses[row]
        _close(update, _db_update(averages[index], eps=0.0))
        _close(method.averages, averages)
    assert method.seen.tolist() == [3, 2, 3]


def test_db_mtl_backward_gives_the_heads_their_log_loss_gradients():
    method = DBMTL(TASKS)
    model, logs = _backward(method)
    losses, rows, heads = _reference_gradients()
    log_grads = rows / (losses[:, None] + 1e-8)
    norms = log_grads.norm(dim=1)
    _close(model.theta.grad, 0.1 * norms.max() * (log_grads / norms[:, None]).sum(0), tol=1e-6)
    for i, t in enumerate(TASKS):
        _close(model.heads[t].grad, heads[t] / (losses[i] + 1e-8), tol=1e-6)
    _close(_logged(logs), (norms.max() / norms).float(), tol=1e-6)


def test_db_mtl_state_dict_round_trip_sizes_the_fresh_buffer_and_gives_the_same_next_update():
    method = DBMTL(TASKS)
    assert DBMTL(TASKS).state_dict()["averages"].shape == (3, 0)
    _round_trip(DBMTL(TASKS), DBMTL(TASKS))  # an unsized state loads too
    for step in range(2):
        _combine(method, _random(seed=30 + step), torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    fresh = _round_trip(method, DBMTL(TASKS))
    assert fresh.averages.shape == (3, 7) and fresh.seen.tolist() == [2, 2, 2]
    grads, losses = _random(seed=32), torch.tensor([0.3, 1.0, 5.0], dtype=F64)
    _close(_combine(fresh, grads, losses)[0], _combine(method, grads, losses)[0], tol=0)
    _round_trip(method, fresh)  # and into an instance already sized


def test_db_mtl_accepts_only_the_parameters_gradients():
    with pytest.raises(UserError, match="representation"):
        DBMTL(TASKS, grad_target="representation")


# ---------------------------------------------------------------------------------------------------- configs


def _compose(overrides):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides)


DEFAULTS = {
    "pcgrad": (PCGrad, {"grad_target": "params"}),
    "gradvac": (GradVac, {"beta": 0.01, "eps": 1e-8, "grad_target": "params"}),
    "graddrop": (GradDrop, {"grad_target": "representation"}),
    "imtl": (IMTL, {"mode": "hybrid", "grad_target": "params"}),
    "aligned_mtl": (AlignedMTL, {"scale_mode": "min", "grad_target": "params"}),
    "db_mtl": (DBMTL, {"beta": 0.9, "beta_sigma": 0.0, "eps": 1e-8, "grad_target": "params"}),
}


@pytest.mark.parametrize("option", sorted(DEFAULTS))
def test_every_new_option_builds_from_its_config_with_its_defaults(option):
    cls, defaults = DEFAULTS[option]
    cfg = _compose(["tasks=[segmentation,depth]", f"weighting={option}"])
    weighting = build_weighting(cfg, {"segmentation": None, "depth": None})
    assert type(weighting) is cls and isinstance(weighting, GradientWeighting)
    assert weighting.tasks == ["segmentation", "depth"] and not weighting.loss_weights
    for name, value in defaults.items():
        assert getattr(weighting, name) == value, name


def test_config_options_reach_the_methods():
    cfg = _compose(["tasks=[segmentation,depth]", "weighting=imtl", "weighting.mode=loss"])
    assert build_weighting(cfg, {"segmentation": None, "depth": None}).mode == "loss"
    cfg = _compose(["tasks=[segmentation,depth]", "weighting=graddrop", "weighting.leak={depth:0.5}"])
    assert build_weighting(cfg, {"segmentation": None, "depth": None}).leak.tolist() == [0.0, 0.5]
    cfg = _compose(["tasks=[segmentation,depth]", "weighting=gradvac", "+weighting.grad_target=representation"])
    with pytest.raises(UserError, match="representation"):
        build_weighting(cfg, {"segmentation": None, "depth": None})
