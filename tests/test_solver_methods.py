"""Gradient methods built on a small optimisation problem (mtl_cli/weighting/{mgda,upgrad,cagrad,nash_mtl,fairgrad}.py,
solved in solvers.py), against the properties their papers state and independent references: a brute-force search of
the simplex, the KKT conditions, random search of CAGrad's primal, and torchjd (dev-only; the UPGrad authors' library,
whose other aggregators port the official code of each paper).

Everything runs on float64 matrices G [T, P]: M = G G^T is the Gramian, c the coefficients (the update is c @ G).
"""

import logging

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from mtl_cli.build import build_weighting
from mtl_cli.paths import config_dir
from mtl_cli.weighting import solvers
from mtl_cli.weighting.cagrad import CAGrad
from mtl_cli.weighting.dualproj import DualProj
from mtl_cli.weighting.fairgrad import FairGrad
from mtl_cli.weighting.mgda import MGDA
from mtl_cli.weighting.nash_mtl import NashMTL
from mtl_cli.weighting.upgrad import UPGrad

F64 = torch.float64
METHODS = [MGDA, UPGrad, CAGrad, NashMTL, FairGrad]


def _names(count):
    return [f"t{i}" for i in range(count)]


def _grads(tasks, dims, seed, scale=1.0):
    return scale * torch.randn(tasks, dims, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _badly_scaled(seed, dtype):
    """Four gradients whose norms spread over 1e-6..1e3 (a small-loss task next to segmentation), in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(4, 200, dtype=F64, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    return (directions * torch.tensor([1e3, 1.0, 1e-3, 1e-6], dtype=F64)[:, None]).to(dtype)


def _coefficients(method, grads, losses=None):
    losses = torch.ones(len(grads), dtype=F64) if losses is None else losses
    c = method.aggregate(grads, losses, list(range(len(grads))))
    assert c.dtype == grads.dtype and c.shape == (len(grads),) and torch.isfinite(c).all()
    return c


# A spread of shapes: full rank (T <= P), rank-deficient (T > P), many tasks (the iterative path beyond
# solvers.EXACT_TASKS is tested separately, by lowering it).
SHAPES = [(2, 3, 0), (3, 5, 1), (3, 2, 2), (4, 30, 3), (5, 3, 4), (6, 20, 5), (8, 8, 6)]
FULL_RANK = [s for s in SHAPES if s[0] <= s[1]]


# ---------------------------------------------------------------------------------------------------------- MGDA


def _simplex_grid(tasks, steps):
    """Every point of the simplex whose coordinates are multiples of 1/steps."""
    if tasks == 2:
        first = torch.arange(steps + 1, dtype=F64) / steps
        return torch.stack([first, 1 - first], 1)
    i, j = torch.meshgrid(torch.arange(steps + 1), torch.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    i, j = i[keep].to(F64) / steps, j[keep].to(F64) / steps
    return torch.stack([i, j, 1 - i - j], 1)


@pytest.mark.parametrize("grads", [
    _grads(2, 4, 10),
    _grads(3, 5, 11),  # an interior optimum
    torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=F64),  # on an edge: c = (1/2, 1/2, 0)
    torch.tensor([[1.0, 0.2], [3.0, 0.1], [2.0, -0.5]], dtype=F64),  # at a vertex: all on the first row
], ids=["T2", "T3-interior", "T3-edge", "T3-vertex"])
def test_mgda_is_the_min_norm_point_found_by_brute_force(grads):
    steps = 100_000 if len(grads) == 2 else 600
    grid = _simplex_grid(len(grads), steps)
    norms = ((grid @ grads) ** 2).sum(1)
    best = grid[norms.argmin()]
    c = _coefficients(MGDA(_names(len(grads))), grads)
    value = float((c @ grads).square().sum())
    assert value <= float(norms.min()) + 1e-12  # never worse than any grid point ...
    assert value >= float(norms.min()) - 2 * float((grads @ grads.T).abs().max()) * len(grads) / steps  # ... and close
    torch.testing.assert_close(c, best, atol=3 / steps, rtol=0)  # each of these optima is unique


@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_mgda_satisfies_the_kkt_conditions(tasks, dims, seed):
    """c in the simplex, (M c)_i >= c^T M c for every i, with equality where c_i > 0."""
    grads = _grads(tasks, dims, seed)
    c = _coefficients(MGDA(_names(tasks)), grads)
    gram = grads @ grads.T
    mc, value, tol = gram @ c, c @ gram @ c, 1e-10 * gram.trace()
    assert (c >= 0).all() and float(c.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (mc >= value - tol).all()
    assert ((mc - value).abs() <= tol)[c > 1e-9].all()


@pytest.mark.parametrize("settings, rtol, atol", [
    pytest.param({}, 0.1, 0.1, id="default"),
    pytest.param({"epsilon": 1e-12, "max_iters": 100_000}, 1e-3, 1e-3, id="long", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tasks,dims,seed", FULL_RANK)
def test_mgda_agrees_with_torchjd(tasks, dims, seed, settings, rtol, atol):
    """torchjd's MGDAWeighting is Sener's Frank-Wolfe (Algorithm 2), which stops once its step size is below epsilon
    (1e-3, at most 100 steps by default) and converges sublinearly: on these problems its norm ends up to 9% above
    the exact optimum (weights up to 0.06 apart), and still up to 4e-4 above with epsilon 1e-12 and 1e5 steps (a
    run of up to 10 s each: -m slow). So ours must never be worse, and close within those measured margins;
    exactness is checked by the brute-force and KKT tests above."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _grads(tasks, dims, seed)
    gram = grads @ grads.T
    ours = _coefficients(MGDA(_names(tasks)), grads)
    theirs = aggregation.MGDAWeighting(**settings)(gram)
    ours_value, their_value = float(ours @ gram @ ours), float(theirs @ gram @ theirs)
    assert ours_value <= their_value * (1 + 1e-12)
    assert their_value == pytest.approx(ours_value, rel=rtol)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)


def test_mgda_degenerate_gradients():
    g = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    mgda = MGDA(_names(3))
    h, zero = torch.tensor([0.0, 1.0, 1.0], dtype=F64), torch.zeros(3, dtype=F64)
    # a zero gradient: the min-norm point is 0, all the weight on it (and shared when several are zero)
    assert torch.equal(_coefficients(mgda, torch.stack([g, zero, h])), torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    # 0 reached several ways (any c with c_0 = c_2 here): one optimum, symmetric between the opposite gradients
    c = _coefficients(mgda, torch.stack([g, zero, -g]))
    assert c[0] == c[2] and float((c @ torch.stack([g, zero, -g])).norm()) < 1e-15
    torch.testing.assert_close(_coefficients(mgda, torch.stack([g, torch.zeros(3, dtype=F64),
                                                                torch.zeros(3, dtype=F64)])),
                               torch.tensor([0.0, 0.5, 0.5], dtype=F64))
    # identical gradients share the weight, the update is that gradient
    same = _coefficients(mgda, torch.stack([g, g, 3 * g]))
    torch.testing.assert_close(same, torch.tensor([0.5, 0.5, 0.0], dtype=F64))
    # a single task, and no gradient at all
    assert torch.equal(_coefficients(MGDA(["a"]), g[None]), torch.ones(1, dtype=F64))
    torch.testing.assert_close(_coefficients(mgda, torch.zeros(3, 3, dtype=F64)), torch.full((3,), 1 / 3, dtype=F64))
    assert mgda.solver_failures == 0


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalizations_solve_on_the_normalised_rows_and_weigh_the_raw_ones(normalization):
    """Sener's code divides each gradient by its norm, its loss or both, solves, and weighs the raw losses (so the
    raw gradients) by the solution: the returned c is the min-norm point of the normalised rows."""
    grads, losses = _grads(3, 6, 20), torch.tensor([0.5, 2.0, 4.0], dtype=F64)
    norms = grads.norm(dim=1)
    divisor = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    normalised = grads / divisor[:, None]
    c = _coefficients(MGDA(_names(3), normalization=normalization), grads, losses)
    torch.testing.assert_close(c, _coefficients(MGDA(_names(3)), normalised))
    assert not torch.allclose(c, _coefficients(MGDA(_names(3)), grads))


def test_mgda_leaves_a_row_that_cannot_be_normalised_as_it_is():
    grads, losses = _grads(3, 6, 20), torch.tensor([0.0, 2.0, 4.0], dtype=F64)  # a zero loss
    kept = torch.cat([grads[:1], grads[1:] / losses[1:, None]])
    torch.testing.assert_close(_coefficients(MGDA(_names(3), normalization="loss"), grads, losses),
                               _coefficients(MGDA(_names(3)), kept))


# -------------------------------------------------------------------------------------------------------- UPGrad


@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_upgrad_update_conflicts_with_no_task(tasks, dims, seed):
    """g_i^T d >= 0 for every task. Exactly so for the regularised Gramian M / tr M + reg_eps I that it projects
    with, hence g_i^T d >= -reg_eps tr(M) c_i on the raw one; with a negligible reg_eps, >= 0."""
    grads = _grads(tasks, dims, seed)
    gram = grads @ grads.T
    for reg_eps in (1e-4, 1e-12):
        c = _coefficients(UPGrad(_names(tasks), reg_eps=reg_eps), grads)
        assert (grads @ (c @ grads) >= -reg_eps * gram.trace() * c - 1e-10 * gram.trace()).all()
        assert (c >= 1 / tasks - 1e-12).all()  # each projection only adds to its e_i / T


def test_upgrad_is_the_mean_when_no_gradients_conflict():
    grads = _grads(4, 6, 30).abs()  # pairwise non-negative inner products
    assert torch.equal(_coefficients(UPGrad(_names(4)), grads), torch.full((4,), 0.25, dtype=F64))


@pytest.mark.parametrize("scale", [1.0, 1e-4], ids=["unit", "tiny"])
@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_upgrad_equals_torchjd(tasks, dims, seed, scale):
    """torchjd's UPGrad solves the same QPs with quadprog on the same normalised, regularised Gramian. With
    |G|_F^2 < norm_eps (the `tiny` case) both zero the Gramian: the update is then the mean gradient."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _grads(tasks, dims, seed, scale)
    ours = _coefficients(UPGrad(_names(tasks), norm_eps=1e-4), grads) @ grads  # torchjd's threshold
    torch.testing.assert_close(ours, aggregation.UPGrad()(grads), atol=1e-5 * scale, rtol=1e-5)
    if scale < 1:
        torch.testing.assert_close(ours, grads.mean(0))


@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_dualproj_equals_torchjd_and_conflicts_with_no_task(tasks, dims, seed):
    """DualProj projects the mean gradient once (UPGrad: each gradient, then sums): torchjd's DualProj solves the
    same QP with quadprog; the update conflicts with no task up to the regularisation, as UPGrad's."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _grads(tasks, dims, seed)
    c = _coefficients(DualProj(_names(tasks), norm_eps=1e-4), grads)
    torch.testing.assert_close(c @ grads, aggregation.DualProj()(grads), atol=1e-5, rtol=1e-5)
    c = _coefficients(DualProj(_names(tasks), reg_eps=1e-12), grads)
    assert (grads @ (c @ grads) >= -1e-10 * (grads @ grads.T).trace()).all() and (c >= 1 / tasks - 1e-12).all()


def test_dualproj_is_the_mean_when_no_gradients_conflict():
    grads = _grads(4, 6, 30).abs()
    assert torch.equal(_coefficients(DualProj(_names(4)), grads), torch.full((4,), 0.25, dtype=F64))


# -------------------------------------------------------------------------------------------------------- CAGrad


@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_cagrad_with_c_zero_is_the_mean_gradient(tasks, dims, seed):
    grads = _grads(tasks, dims, seed).float()
    cagrad = CAGrad(_names(tasks), c=0.0)
    update, weights = cagrad.combine(grads, torch.ones(tasks), list(range(tasks)))
    assert torch.equal(weights, torch.full((tasks,), 1 / tasks))
    torch.testing.assert_close(update, grads.mean(0))


def _cagrad_primal(grads, update, c):
    """min_i g_i^T d, and the ball condition |d - g0| <= c |g0|, CAGrad's primal problem."""
    g0 = grads.mean(0)
    return float((grads @ update).min()), float((update - g0).norm()), c * float(g0.norm())


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_cagrad_update_maximises_the_worst_decrease_in_its_ball(tasks, dims, seed, c):
    """Against random search: no point of the ball |d - g0| <= c |g0| does better than the update (rescale=0)."""
    grads = _grads(tasks, dims, seed)
    update = _coefficients(CAGrad(_names(tasks), c=c, rescale=0), grads) @ grads
    worst, distance, radius = _cagrad_primal(grads, update, c)
    assert distance == pytest.approx(radius, rel=1e-9)  # on the sphere: the worst decrease is linear in d
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(20_000, dims, dtype=F64, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    radii = radius * torch.rand(20_000, 1, dtype=F64, generator=generator) ** (1 / dims)
    samples = grads.mean(0) + radii * directions
    assert float((samples @ grads.T).min(1).values.max()) <= worst + 1e-9 * float((grads @ grads.T).trace())


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
@pytest.mark.parametrize("tasks,dims,seed", SHAPES)
def test_cagrad_agrees_with_torchjd_up_to_the_rescale(tasks, dims, seed, c):
    """torchjd's CAGrad returns g0 + (c |g0| / |g_w|) g_w without the official code's rescale (ours with rescale=0;
    the default rescale=1 is that divided by 1 + c^2, rescale=2 by 1 + c). It solves the dual with Clarabel, whose
    answer has a duality gap up to ~1e-6 (ours is exact to ~1e-15), hence the 1e-4 tolerance on the weights."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _grads(tasks, dims, seed)
    theirs = aggregation.CAGradWeighting(c=c)(grads @ grads.T)
    plain = _coefficients(CAGrad(_names(tasks), c=c, rescale=0), grads)
    torch.testing.assert_close(plain, theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_coefficients(CAGrad(_names(tasks), c=c), grads), plain / (1 + c**2))
    torch.testing.assert_close(_coefficients(CAGrad(_names(tasks), c=c, rescale=2), grads), plain / (1 + c))
    # and ours is at least as good a solution of the primal as theirs
    assert _cagrad_primal(grads, plain @ grads, c)[0] >= _cagrad_primal(grads, theirs @ grads, c)[0] - 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(3))
def test_cagrad_keeps_its_ball_and_lowers_every_loss_with_badly_scaled_gradients(dtype, seed):
    """In float32 as training runs it: the update is never zero for c < 1: it lies on the sphere |d - g0| = c |g0|,
    every task's loss decreases, and the tasks the dual weighs all attain the worst decrease (the max-min's
    complementary slackness). Before, a task 1e-4 of the others' made |g_w| fall under a cut-off relative to |G|_F
    and every update was silently 0, and an absolute tie averaged the dual's optimum with points that were not."""
    grads = _badly_scaled(seed, dtype)
    cagrad = CAGrad(_names(4), c=0.4, rescale=0)
    coefficients = _coefficients(cagrad, grads)
    update, exact = (coefficients @ grads).double(), grads.double()
    g0 = exact.mean(0)
    assert int(cagrad.solver_failures) == 0
    assert float((update - g0).norm()) == pytest.approx(0.4 * float(g0.norm()), rel=1e-5)
    decreases = exact @ update
    assert float(decreases.min()) > 0
    w, _ = solvers.cagrad_dual(exact @ exact.T, 0.4)
    torch.testing.assert_close(decreases[w > 0], decreases.min().expand(int((w > 0).sum())), rtol=1e-4, atol=0)
    reference = _coefficients(CAGrad(_names(4), c=0.4, rescale=0), exact)
    torch.testing.assert_close(coefficients.double(), reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(3))
def test_mgda_finds_the_min_norm_point_of_badly_scaled_gradients(dtype, seed):
    """The min-norm point d of the convex hull satisfies g_i . d >= |d|^2 for every task, with equality on its
    support (KKT); with a gradient 1e-6 of the largest, d is tiny but not zero, and an absolute tie used to average
    the optimal active set with others."""
    grads = _badly_scaled(seed, dtype)
    mgda = MGDA(_names(4))
    coefficients = _coefficients(mgda, grads)
    d, exact = (coefficients.double() @ grads.double()), grads.double()
    assert int(mgda.solver_failures) == 0 and float(d.norm()) > 0
    ratios = exact @ d / (d @ d)
    assert bool((ratios >= 1 - 1e-4).all()), ratios
    support = coefficients > 1e-6 * coefficients.max()
    torch.testing.assert_close(ratios[support], torch.ones(int(support.sum()), dtype=F64), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(3))
def test_nash_mtl_solves_its_equation_for_badly_scaled_gradients(dtype, seed):
    """Nash-MTL's defining equation (G G^T a)_i a_i = 1 (every task gets g_i . d = 1/a_i) holds to 1e-6 in float32,
    with gradient norms over 1e-6..1e3 (weights over as many decades)."""
    grads = _badly_scaled(seed, dtype)
    nash = NashMTL(_names(4))
    a = _coefficients(nash, grads).double()
    exact = grads.double()
    assert int(nash.solver_failures) == 0
    torch.testing.assert_close((exact @ exact.T @ a) * a, torch.ones(4, dtype=F64), rtol=1e-6, atol=0)


def test_cagrad_degenerate_gradients():
    g = torch.tensor([1.0, 2.0, -1.0], dtype=F64)
    cagrad = CAGrad(_names(3), rescale=0)
    # opposite gradients: g0 = 0, the ball is {0}: the mean, 0
    assert torch.equal(_coefficients(CAGrad(_names(2), rescale=0), torch.stack([g, -g])),
                       torch.full((2,), 0.5, dtype=F64))
    # duplicated gradients share the weight; a single task gets (1 + c)
    torch.testing.assert_close(_coefficients(cagrad, torch.stack([g, g, g])), torch.full((3,), 1.4 / 3, dtype=F64))
    torch.testing.assert_close(_coefficients(CAGrad(["a"], rescale=0), g[None]), torch.tensor([1.4], dtype=F64))
    # a zero gradient: the worst decrease is 0 whatever d; no NaN
    _coefficients(cagrad, torch.stack([g, torch.zeros(3, dtype=F64), torch.tensor([0.0, 1.0, 1.0], dtype=F64)]))
    assert torch.equal(_coefficients(cagrad, torch.zeros(3, 3, dtype=F64)), torch.full((3,), 1 / 3, dtype=F64))
    assert cagrad.solver_failures == 0


# ---------------------------------------------------------------------------------------------- Nash-MTL, FairGrad


def _solvable(shape):
    """Shapes whose gradients have no 0 in their convex hull (else these equations have no solution)."""
    grads = _grads(*shape)
    c, _ = solvers.min_norm_point(grads @ grads.T)
    return float((c @ grads).norm()) > 1e-6 * float(grads.norm())


SOLVABLE = [s for s in SHAPES if _solvable(s)]


@pytest.mark.parametrize("scale", [1.0, 1e-3])
@pytest.mark.parametrize("tasks,dims,seed", SOLVABLE)
def test_nash_mtl_weights_solve_the_bargaining_equations(tasks, dims, seed, scale):
    """M a = 1/a on the raw Gramian (what the official code's solution satisfies), so g_i^T (a @ G) = 1 / a_i and
    |a @ G|^2 = T whatever the scale of the gradients (a scales as 1 / scale)."""
    grads = _grads(tasks, dims, seed, scale)
    a = _coefficients(NashMTL(_names(tasks)), grads)
    torch.testing.assert_close((grads @ grads.T) @ a * a, torch.ones(tasks, dtype=F64), atol=1e-6, rtol=0)
    assert float((a @ grads).square().sum()) == pytest.approx(tasks, rel=1e-6)
    torch.testing.assert_close(a * scale, _coefficients(NashMTL(_names(tasks)), grads / scale), rtol=1e-8, atol=0)


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("tasks,dims,seed", [s for s in SOLVABLE if s[0] <= s[1]])
def test_nash_mtl_agrees_with_torchjd(tasks, dims, seed):
    """torchjd's NashMTL ports the official convex-concave iterations (cvxpy/ECOS, stopped at a residual of 1e-3 on
    the Frobenius-normalised Gramian; max_norm=0 turns its norm cap off, our trainer.grad_clip's job). Where it
    converges (full rank here: on rank-deficient Gramians ECOS fails and it keeps its previous weights), it gives
    the same weights."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _grads(tasks, dims, seed)
    theirs = aggregation.NashMTL(n_tasks=tasks, max_norm=0.0, optim_niter=100).weighting(grads)
    torch.testing.assert_close(_coefficients(NashMTL(_names(tasks)), grads), theirs, rtol=1e-4, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("tasks,dims,seed", SOLVABLE)
def test_fairgrad_weights_solve_the_alpha_fair_equations(tasks, dims, seed, alpha):
    grads = _grads(tasks, dims, seed)
    w = _coefficients(FairGrad(_names(tasks), alpha=alpha), grads)
    assert (w > 0).all()
    torch.testing.assert_close((grads @ grads.T) @ w, w ** (-1 / alpha), rtol=1e-6, atol=0)
    if alpha == 1.0:  # proportional fairness is Nash-MTL's bargaining solution
        torch.testing.assert_close(w, _coefficients(NashMTL(_names(tasks)), grads))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("tasks,dims,seed", SOLVABLE)
def test_fairgrad_agrees_with_torchjd(tasks, dims, seed, alpha):
    """torchjd's FairGrad ports the official scipy least_squares solve of the same equations."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = _grads(tasks, dims, seed)
    theirs = aggregation.FairGradWeighting(alpha=alpha)(grads @ grads.T)
    torch.testing.assert_close(_coefficients(FairGrad(_names(tasks), alpha=alpha), grads), theirs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", [NashMTL, FairGrad])
def test_equation_methods_degenerate_gradients(method, caplog):
    g, h = torch.tensor([1.0, 2.0, -1.0], dtype=F64), torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    # a zero gradient gets weight 0; the others solve their own equations
    w = _coefficients(method(_names(3)), torch.stack([g, torch.zeros(3, dtype=F64), h]))
    assert w[1] == 0
    torch.testing.assert_close(w[[0, 2]], _coefficients(method(_names(2)), torch.stack([g, h])))
    assert torch.equal(_coefficients(method(_names(2)), torch.zeros(2, 3, dtype=F64)), torch.zeros(2, dtype=F64))
    # identical gradients share equally; a single task gets 1 / |g|
    same = _coefficients(method(_names(2)), torch.stack([g, g]))
    assert same[0] == same[1]
    torch.testing.assert_close(_coefficients(method(["a"]), g[None]), 1 / g.norm()[None])
    # opposite gradients: 0 is in their convex hull, there is no solution; reported, and finite
    failing = method(_names(2))
    with caplog.at_level(logging.WARNING, logger="mtl"):
        w = _coefficients(failing, torch.stack([g, -2 * g]))
    assert failing.solver_failures == 1 and "convex hull" in caplog.text
    assert (w > 0).all() and float(w.max()) < 10


# ------------------------------------------------------------------------------------ the iterative path, failures


@pytest.mark.parametrize("method", [MGDA, UPGrad, CAGrad])
@pytest.mark.parametrize("tasks,dims,seed", [(3, 5, 40), (12, 40, 41), (16, 6, 42)])
def test_beyond_exact_tasks_the_iterative_solver_finds_the_same_optimum(method, tasks, dims, seed, monkeypatch):
    grads = _grads(tasks, dims, seed)
    monkeypatch.setattr(solvers, "EXACT_TASKS", 16)
    exact = _coefficients(method(_names(tasks)), grads)
    monkeypatch.setattr(solvers, "EXACT_TASKS", 0)
    iterative = method(_names(tasks))
    if method is MGDA and tasks > dims:  # the optimum's weights are not unique: compare the updates
        torch.testing.assert_close(_coefficients(iterative, grads) @ grads, exact @ grads, atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(_coefficients(iterative, grads), exact, atol=1e-6, rtol=0)
    assert iterative.solver_failures == 0


@pytest.mark.parametrize("method", METHODS)
def test_a_solver_failure_is_counted_warned_once_and_finite(method, monkeypatch, caplog):
    monkeypatch.setattr(solvers, "EXACT_TASKS", 0)  # the iterative solvers, so that max_iters=1 fails
    weighting = method(_names(6), max_iters=1)
    with caplog.at_level(logging.WARNING, logger="mtl"):
        for seed in (50, 51):
            _coefficients(weighting, _grads(6, 8, seed) * torch.tensor([[1.0], [3.0], [0.1], [1.0], [10.0], [0.5]]))
    assert int(weighting.solver_failures) == 2
    warnings = [r for r in caplog.records if r.name == "mtl" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and method.__name__ in warnings[0].getMessage()


# ------------------------------------------------------------------------------ the training step, configs, state


class TwoHeads(nn.Module):
    """A shared vector theta and a scalar head per task: L_t = (h_t * a_t . theta - y_t)^2."""

    def __init__(self, tasks):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.theta = nn.Parameter(torch.randn(4, dtype=F64, generator=generator))
        self.heads = nn.ParameterList([nn.Parameter(torch.tensor(1.0 + t, dtype=F64)) for t in range(tasks)])
        self.a = torch.randn(tasks, 4, dtype=F64, generator=generator)

    def shared_parameters(self):
        return [self.theta]

    def losses(self, names):
        return {n: (h * (a @ self.theta) - 0.5) ** 2 for n, h, a in zip(names, self.heads, self.a)}


@pytest.mark.parametrize("method", METHODS)
def test_backward_applies_the_coefficients_and_the_state_round_trips(method):
    """theta gets c @ G; head t gets c_t times its gradient for loss weights (MGDA, Nash-MTL), else its own raw
    gradient. The state (last weights, step and failure counts) survives a state_dict round trip."""
    names = _names(3)
    weighting, model = method(names), TwoHeads(3)
    losses = model.losses(names)
    rows = [torch.autograd.grad(loss, [model.theta, h]) for loss, h in zip(losses.values(), model.heads)]
    grads = torch.stack([r[0] for r in rows])
    c = weighting.aggregate(grads.float(), torch.stack([v.detach() for v in losses.values()]).float(), [0, 1, 2])
    used = weighting.backward(model.losses(names), model, torch.amp.GradScaler("cpu", enabled=False))
    torch.testing.assert_close(torch.stack([used[f"train/weight/{n}"] for n in names]), c)
    torch.testing.assert_close(model.theta.grad, c.double() @ grads, rtol=1e-5, atol=1e-6)
    head = c.double() if method.loss_weights else torch.ones(3, dtype=F64)
    torch.testing.assert_close(torch.stack([h.grad for h in model.heads]),
                               head * torch.stack([r[1] for r in rows]), rtol=1e-5, atol=1e-6)

    weighting.solver_failed("a test failure")
    fresh = method(names)
    fresh.load_state_dict(weighting.state_dict())
    for key, value in weighting.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert int(fresh.steps) == 1 and int(fresh.solver_failures) == 1
    probe = {n: torch.tensor(1.0) for n in names}
    assert {n: float(w) for n, w in fresh.weights(probe).items()} == {n: float(w) for n, w in
                                                                        weighting.weights(probe).items()}


CONFIGS = {
    "mgda": (MGDA, {"grad_target": "params", "normalization": "none"}),
    "mgda_ub": (MGDA, {"grad_target": "representation", "normalization": "none"}),
    "upgrad": (UPGrad, {"grad_target": "params", "norm_eps": 0.0, "reg_eps": 1e-4}),
    "cagrad": (CAGrad, {"grad_target": "params", "c": 0.4, "rescale": 1}),
    "nash_mtl": (NashMTL, {"grad_target": "params"}),
    "fairgrad": (FairGrad, {"grad_target": "params", "alpha": 1.0}),
}


@pytest.mark.parametrize("option", sorted(CONFIGS))
def test_each_config_builds_its_method_with_the_paper_defaults(option):
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["tasks=[segmentation,depth]", f"weighting={option}"])
    weighting = build_weighting(cfg, {"segmentation": None, "depth": None})
    cls, expected = CONFIGS[option]
    assert type(weighting) is cls and weighting.tasks == ["segmentation", "depth"]
    assert {key: getattr(weighting, key) for key in expected} == expected
    grads = _grads(2, 5, 60).float()
    assert torch.isfinite(weighting.aggregate(grads, torch.ones(2), [0, 1])).all()
    text = (config_dir() / "weighting" / f"{option}.yaml").read_text()
    assert text.startswith("# ") and any(str(year) in text for year in range(2018, 2025))  # cites its paper
