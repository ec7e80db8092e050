"""Every weighting method on badly scaled task gradients (issue 16): row norms spread over 1e-6..1e3, as a small
auxiliary loss next to segmentation gives, in float32 as training runs them and in float64.

That is where absolute tolerances hide: a `+ 1e-8` in a denominator, a ridge relative to |G|_F^2, a cut-off relative
to the largest task. For every config in configs/weighting/ (found from the directory, so a new method is covered
the day its YAML lands; a method reading several batches gets other draws of the same tasks' gradients), on sets of
T = 2, 3, 5 gradients, random, conflicting or near-parallel: the update is finite and not zero, the weights of the
loss-based methods (in the gradient view, the update is their weighted sum of the rows) are finite and positive, and
the methods that promise an update conflicting with no task keep that promise relative to each task's own norm.
Then each method's defining property, against an independent computation in float64 (numpy, scipy's NNLS, torchjd).

Properties already tested on such inputs are not repeated here: MGDA's min-norm KKT conditions, CAGrad's ball and
Nash-MTL's equation (tests/test_solver_methods.py), IMTL-G's equal projections, ConFIG's equal cosines and
Aligned-MTL's orthogonal rows (tests/test_projection_methods.py).
"""

import copy
import functools
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from mtl_cli.build import build_weighting
from mtl_cli.paths import config_dir
from mtl_cli.weighting.base import GradientWeighting
from mtl_cli.weighting.pcgrad import project_conflicts
from mtl_cli.weighting.upgrad import UPGrad

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread, or the cores fight over them

F64 = torch.float64
OPTIONS = sorted(p.stem for p in (config_dir() / "weighting").glob("*.yaml"))
KINDS = ("random", "conflicting", "parallel")
SETS = [(tasks, kind) for tasks in (2, 3, 5) for kind in KINDS]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(F64, id="float64")]
DIMS = 48

# The methods whose update conflicts with no task (on these sets, whose rows are independent, so that 0 is not in
# their convex hull): each task's cosine with it is >= -conflict_tolerance(method).
CONFLICT_FREE = {"mgda", "mgda_ub", "nash_mtl", "fairgrad", "config", "upgrad", "dualproj"}
# Loss-based methods whose weights may be negative by design (every other one's must be positive).
SIGNED_WEIGHTS = {"pbi"}  # d2's penalty pushes a loss back up toward the preference's ray (pbi.py)


def badly_scaled(tasks, kind, seed, dtype, draw=None):
    """[tasks, DIMS] gradients with norms log-evenly over 1e-6..1e3 and losses over 1e-4..1e2, each in a seeded order.

    kind: `random` directions (cosines ~ +-0.15), `conflicting` (a centred simplex, pairwise cosines -0.7 for two
    tasks, -0.1 for five, lifted by a shared component so that the rows stay independent), or `parallel` (cosines
    ~ 0.999). `draw` k: another batch's gradients of the same tasks, the same directions with independent noise."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        directions = torch.randn(tasks, DIMS, dtype=F64, generator=generator)
    elif kind == "conflicting":
        directions = 0.05 * torch.randn(tasks, DIMS, dtype=F64, generator=generator)
        directions[:, :tasks] += torch.eye(tasks, dtype=F64) - 1 / tasks
        directions[:, tasks] += 0.3
    else:
        common = torch.randn(1, DIMS, dtype=F64, generator=generator)
        directions = common + 0.02 * torch.randn(tasks, DIMS, dtype=F64, generator=generator)
    norms = torch.logspace(3, -6, tasks, dtype=F64)[torch.randperm(tasks, generator=generator)]
    losses = torch.logspace(-4, 2, tasks, dtype=F64)[torch.randperm(tasks, generator=generator)]
    directions = directions / directions.norm(dim=1, keepdim=True)
    if draw is not None:
        noise = torch.Generator().manual_seed(10_000 * seed + draw)
        directions = directions + 0.1 * torch.randn(tasks, DIMS, dtype=F64, generator=noise)
        directions = directions / directions.norm(dim=1, keepdim=True)
    return (directions * norms[:, None]).to(dtype), losses.to(dtype)


def _seed(tasks, kind, base=0):
    return 100 * base + 10 * tasks + KINDS.index(kind)


def _names(tasks):
    return [f"t{i}" for i in range(tasks)]


@functools.cache
def _train_config():
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train")


@functools.cache
def _options(option):
    return OmegaConf.load(config_dir() / "weighting" / f"{option}.yaml")


@functools.cache
def _built(option, tasks, overrides):
    cfg = _train_config().copy()
    with open_dict(cfg):
        cfg.weighting = OmegaConf.merge(_options(option), dict(overrides))
    return build_weighting(cfg, dict.fromkeys(_names(tasks)))


def build(option, tasks, **overrides):
    """A fresh method of configs/weighting/<option>.yaml, as `mtl train weighting=<option>` builds it (in the
    composed train config, which its interpolations, such as ${seed}, read), with `overrides` of its options."""
    return copy.deepcopy(_built(option, tasks, tuple(sorted(overrides.items()))))


def _loss_weights(method, losses, positive):
    """A loss-based method's weights after several steps and epochs (past DWA's two epochs and STCH's warm-up), the
    losses falling by a factor 0.9 per epoch; every step's weights must be finite (and positive if asked)."""
    names = method.tasks
    for epoch in range(7):
        values = losses * 0.9**epoch
        weights = method.weights({t: values[i] for i, t in enumerate(names)})
        weights = torch.stack([weights[t].detach() for t in names]).double()
        assert torch.isfinite(weights).all() and (not positive or (weights > 0).all()), (epoch, weights)
        method.epoch_end()
    return weights


def update_of(option, tasks, kind, seed, dtype, **overrides):
    """(method, grads, losses, update, weights): one step of the method on a badly scaled set, seeded."""
    grads, losses = badly_scaled(tasks, kind, seed, dtype)
    method = build(option, tasks, **overrides)
    method.train()
    torch.manual_seed(seed)
    if isinstance(method, GradientWeighting):
        others = [badly_scaled(tasks, kind, seed, dtype, draw=k)[0] for k in range(method.batches_per_step - 1)]
        update, weights = method.combine(grads, losses, list(range(tasks)), *others)
        assert update.dtype == dtype and update.shape == (DIMS,)
    else:
        weights = _loss_weights(method, losses, positive=option not in SIGNED_WEIGHTS)
        update = weights.to(dtype) @ grads
    return method, grads, losses, update, weights


def conflict_tolerance(method):
    """Rounding, or for UPGrad and DualProj the sqrt(reg_eps) by which their capped ridge lets a task conflict
    (upgrad.py)."""
    return method.reg_eps ** 0.5 if isinstance(method, UPGrad) else 1e-6


def cosines(grads, update):
    """cos(g_t, d) for every row, in float64."""
    grads, update = grads.double(), update.double()
    return grads @ update / (grads.norm(dim=1) * update.norm())


# --------------------------------------------------------------------------------------------------- every method


def _check_every_set(option, dtype, seeds):
    for tasks, kind in SETS:
        for base in seeds:
            seed = _seed(tasks, kind, base)
            method, grads, losses, update, weights = update_of(option, tasks, kind, seed, dtype)
            where = f"{option} T={tasks} {kind} seed={seed}"
            assert torch.isfinite(update).all() and torch.isfinite(weights).all(), where
            # not zero: below the smallest task's scale, the update would be zero to every task
            smallest = float(grads.double().norm(dim=1).min())
            assert float(update.double().norm()) > 1e-3 * smallest, where
            for parameter in method.parameters():  # a learned weighting's own gradient (GradNorm's) too
                assert parameter.grad is None or torch.isfinite(parameter.grad).all(), where
            if option == "gradnorm":  # learned loss weights, T softmax(theta)
                assert (weights > 0).all(), (where, weights)
            if option in CONFLICT_FREE:
                cos = cosines(grads, update)
                assert float(cos.min()) >= -conflict_tolerance(method), (where, cos)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_every_method_gives_a_finite_nonzero_update(option, dtype):
    _check_every_set(option, dtype, seeds=[0])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_every_method_gives_a_finite_nonzero_update_on_more_draws(option, dtype):
    _check_every_set(option, dtype, seeds=range(1, 6))


def test_the_methods_named_here_are_configs():
    assert CONFLICT_FREE | SIGNED_WEIGHTS <= set(OPTIONS)


# ---------------------------------------------------------------------------------------------- UPGrad, DualProj


def _dual_cone_projection(grads, target):
    """argmin |d - target| over the dual cone {d: G d >= 0}, exactly: d = target + G^T mu with mu >= 0 minimising
    |target + G^T mu| (Moreau's decomposition), an NNLS problem solved on the unit rows, which scaling leaves
    well-conditioned."""
    optimize = pytest.importorskip("scipy.optimize")
    units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    mu, _ = optimize.nnls(units.T, -target, maxiter=10_000)
    return target + units.T @ mu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", ["upgrad", "dualproj"])
def test_upgrad_and_dualproj_project_onto_the_dual_cone(option, dtype):
    """UPGrad sums the projections of g_k / T onto the dual cone of the rows, DualProj projects their mean. Against the
    exact projections (scipy's NNLS, no ridge) and torchjd's on the unit rows u_k with preferences |g_k| / T (the
    same projections: the dual cone does not change when a row is scaled, and |g_k| u_k / T = g_k / T), where its
    trace-relative ridge is relative to every task's own size: every task's cosine with the update agrees to the
    capped ridge's sqrt(reg_eps). On the raw rows torchjd's ridge swamps the small tasks, as ours did: cos -0.5."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    for tasks, kind in SETS:
        seed = _seed(tasks, kind)
        method, grads, _, update, _ = update_of(option, tasks, kind, seed, dtype)
        exact_rows = grads.double().numpy()
        targets = exact_rows / tasks if option == "upgrad" else exact_rows.mean(0, keepdims=True)
        exact = sum(_dual_cone_projection(exact_rows, target) for target in targets)
        norms = grads.double().norm(dim=1)
        reference = aggregation.UPGrad if option == "upgrad" else aggregation.DualProj
        theirs = reference(pref_vector=norms / tasks)(grads.double() / norms[:, None])
        where, tolerance = f"{option} T={tasks} {kind}", conflict_tolerance(method)
        ours = cosines(grads, update)
        torch.testing.assert_close(ours, cosines(grads, torch.from_numpy(exact)), rtol=0, atol=tolerance, msg=where)
        torch.testing.assert_close(ours, cosines(grads, theirs), rtol=0, atol=tolerance, msg=where)
        assert float((update.double() - theirs).norm()) <= tolerance * float(theirs.norm()), where
        assert int(method.solver_failures) == 0, where


# ------------------------------------------------------------------------------------------------ PCGrad, GradVac


def _orders(tasks, seed, skip_self):
    """The visiting orders both methods draw from torch's global generator: one permutation per task, in task order
    (PCGrad: of all the tasks; GradVac: of the others)."""
    torch.manual_seed(seed)
    if not skip_self:
        return [torch.randperm(tasks).tolist() for _ in range(tasks)]
    orders = []
    for i in range(tasks):
        others = [j for j in range(tasks) if j != i]
        orders.append([others[k] for k in torch.randperm(tasks - 1).tolist()])
    return orders


def _pcgrad_reference(rows, orders):
    """PCGrad on the vectors themselves, float64: g_i loses its component along each g_j it conflicts with, in order;
    just after, g_i' . g_j = 0."""
    projected = []
    for i, order in enumerate(orders):
        g = rows[i].copy()
        for j in order:
            if j != i and g @ rows[j] < 0:
                g -= (g @ rows[j]) / (rows[j] @ rows[j]) * rows[j]
                assert abs(g @ rows[j]) <= 1e-9 * np.linalg.norm(g) * np.linalg.norm(rows[j])
        projected.append(g)
    return np.stack(projected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pcgrad_projects_out_every_conflict(dtype):
    """Against PCGrad on the vectors in float64 (same orders), every task's cosine with the update agrees; with two
    tasks the update conflicts with neither (the paper's Theorem 1 setting); in float64 it equals torchjd's."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    for tasks, kind in SETS:
        seed = _seed(tasks, kind)
        _, grads, _, update, _ = update_of("pcgrad", tasks, kind, seed, dtype)
        rows = grads.double().numpy()
        projected = _pcgrad_reference(rows, _orders(tasks, seed, skip_self=False))
        reference = torch.from_numpy(projected.sum(0))
        where = f"T={tasks} {kind}"
        torch.testing.assert_close(cosines(grads, update), cosines(grads, reference), rtol=0, atol=1e-5, msg=where)
        assert float((update.double() - reference).norm()) <= 1e-5 * float(reference.norm()), where
        if tasks == 2:
            assert float(cosines(grads, update).min()) >= -1e-6, where
        if dtype == F64:
            torch.manual_seed(seed)
            theirs = aggregation.PCGrad()(grads)
            assert float((update - theirs).norm()) <= 1e-9 * float(theirs.norm()), where
    # the rows themselves, as `project_conflicts` gives them: each g_i' just after its last projection
    grads, _ = badly_scaled(2, "conflicting", 1, dtype)
    rows = project_conflicts(grads.double() @ grads.double().T, [[1], [0]]) @ grads.double()
    assert float(cosines(grads[[1]], rows[0])) == pytest.approx(0.0, abs=1e-9)
    assert float(cosines(grads[[0]], rows[1])) == pytest.approx(0.0, abs=1e-9)


def _gradvac_reference(rows, targets, orders, beta):
    """GradVac on the vectors, float64: when cos(g_i', g_j) < target, g_i' += w g_j with w such that the cosine
    becomes the target exactly (the paper's eq. 3 solved for w); the target then moves by beta toward the cosine
    seen. Returns the adjusted rows and the new targets."""
    targets = targets.copy()
    adjusted = []
    for i, order in enumerate(orders):
        g = rows[i].copy()
        for j in order:
            phi, target = g @ rows[j] / (np.linalg.norm(g) * np.linalg.norm(rows[j])), targets[i, j]
            if phi < target:
                w = (np.linalg.norm(g) * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2))
                     / (np.linalg.norm(rows[j]) * math.sqrt(1 - target**2)))
                g = g + w * rows[j]
                assert g @ rows[j] / (np.linalg.norm(g) * np.linalg.norm(rows[j])) == pytest.approx(target, abs=1e-9)
            targets[i, j] = (1 - beta) * target + beta * phi
        adjusted.append(g)
    return np.stack(adjusted), targets


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradvac_raises_every_cosine_to_its_target(dtype):
    """With targets 0.3 (as an EMA of past cosines might be), each g_i' reaches cos 0.3 with every g_j it was below,
    as the vector computation in float64 does (same orders); the targets move by beta toward the cosines seen. With
    two tasks each adjusted row is recovered from the coefficients: c = (1 + w_21, 1 + w_12)."""
    for tasks, kind in SETS:
        seed = _seed(tasks, kind)
        grads, losses = badly_scaled(tasks, kind, seed, dtype)
        method = build("gradvac", tasks)
        method.targets.fill_(0.3)
        orders = _orders(tasks, seed, skip_self=True)
        torch.manual_seed(seed)
        update, coefficients = method.combine(grads, losses, list(range(tasks)))
        rows = grads.double().numpy()
        adjusted, targets = _gradvac_reference(rows, np.full((tasks, tasks), 0.3), orders, method.beta)
        reference = torch.from_numpy(adjusted.sum(0))
        where = f"T={tasks} {kind}"
        torch.testing.assert_close(cosines(grads, update), cosines(grads, reference), rtol=0, atol=1e-5, msg=where)
        assert float((update.double() - reference).norm()) <= 1e-5 * float(reference.norm()), where
        off_diagonal = ~torch.eye(tasks, dtype=torch.bool)
        torch.testing.assert_close(method.targets[off_diagonal], torch.from_numpy(targets)[off_diagonal], rtol=0,
                                   atol=1e-6, msg=where)
        if tasks == 2:
            first = grads[0].double() + (float(coefficients[1]) - 1) * grads[1].double()
            second = grads[1].double() + (float(coefficients[0]) - 1) * grads[0].double()
            for row, other in ((first, grads[1]), (second, grads[0])):
                cos = float(cosines(other[None], row))
                assert cos >= 0.3 - 1e-5, (where, cos)


# ----------------------------------------------------------------------------------------------------- FairGrad


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fairgrad_solves_its_equation(dtype, alpha):
    """(G G^T w)_t = w_t^(-1/alpha), every task getting g_t . d = w_t^(-1/alpha) > 0 from d = w @ G: checked in
    float64 on the rows as given (weights over as many decades as the norms), to 1e-6, and in float32 to the rounding
    of the weights it returns, eps/2 of each term of (G G^T w)_t and of w_t^(-1/alpha): with alpha = 2 those terms
    cancel down to 2e-5 of their size. alpha 1.0 is the config's, 2.0 the official CelebA and QM9 scripts'."""
    for tasks, kind in SETS:
        method, grads, _, update, weights = update_of("fairgrad", tasks, kind, _seed(tasks, kind), dtype, alpha=alpha)
        rows, w = grads.double(), weights.double()
        gram = rows @ rows.T
        assert (w > 0).all() and int(method.solver_failures) == 0
        residual, wanted = gram @ w - w ** (-1 / alpha), w ** (-1 / alpha)
        allowed = 1e-6 * wanted + torch.finfo(dtype).eps * (gram.abs() @ w)
        assert (residual.abs() <= allowed).all(), (f"T={tasks} {kind}", residual / wanted)


# ------------------------------------------------------------------------------------------------------- DB-MTL


@pytest.mark.parametrize("dtype", DTYPES)
def test_db_mtl_scales_every_averaged_row_to_the_largest_norm(dtype):
    """After one step the averages are (1 - beta) g_t / (L_t + eps); each is scaled to the largest's norm, so the
    update is max_s |ghat_s| * sum_t ghat_t / |ghat_t|, whatever the rows' sizes (computed here in float64)."""
    for tasks, kind in SETS:
        method, grads, losses, update, alpha = update_of("db_mtl", tasks, kind, _seed(tasks, kind), dtype)
        averages = (1 - method.beta) * grads.double() / (losses.double() + method.eps)[:, None]
        norms = averages.norm(dim=1)
        where = f"T={tasks} {kind}"
        # to sqrt(eps), the most its guard of a zero norm adds to a small one (db_mtl.py)
        torch.testing.assert_close(alpha.double() * norms, norms.max().expand(tasks), rtol=2e-4, atol=0, msg=where)
        reference = norms.max() * (averages / norms[:, None]).sum(0)
        assert float((update.double() - reference).norm()) <= 2e-4 * float(norms.max()), where


# ------------------------------------------------------------------------------------------------------ GradDrop


@pytest.mark.parametrize("dtype", DTYPES)
def test_graddrop_keeps_one_sign_per_coordinate(dtype):
    """At every coordinate the update is the sum of the positive entries or of the negative ones (one sign kept,
    whatever the rows' sizes), and each task's logged weight is the share of its squared norm on the coordinates
    where its sign was kept. In float64 it equals torchjd's GradDrop (same uniform draws)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    for tasks, kind in SETS:
        seed = _seed(tasks, kind)
        _, grads, _, update, kept = update_of("graddrop", tasks, kind, seed, dtype)
        rows, d = grads.double(), update.double()
        positive, negative = rows.clamp(min=0).sum(0), rows.clamp(max=0).sum(0)
        took_positive = (d - positive).abs() <= (d - negative).abs()
        chosen = torch.where(took_positive, positive, negative)
        where = f"T={tasks} {kind}"
        torch.testing.assert_close(d, chosen, rtol=1e-5, atol=0, msg=where)
        mask = torch.where(took_positive, rows > 0, rows < 0)
        share = (mask * rows.square()).sum(1) / rows.square().sum(1)
        torch.testing.assert_close(kept.double(), share, rtol=1e-5, atol=1e-7, msg=where)
        if dtype == F64:
            torch.manual_seed(seed)
            torch.testing.assert_close(update, aggregation.GradDrop()(grads), rtol=1e-12, atol=0, msg=where)
