"""The small optimisation problems of the gradient methods, solved on the T x T Gramian M = G G^T (float64, CPU).

Every solver returns (solution, failure): failure is None when the solution passed its optimality check (KKT
conditions or duality gap, to TOL on a trace-normalised M), else a sentence saying what failed, the solution being
then the best point found. The methods hand that sentence to `GradientWeighting.solver_failed`.

The quadratic programs (MGDA's min-norm point, UPGrad's projections, CAGrad's dual) are solved exactly for up to
EXACT_TASKS tasks: the optimum solves the KKT system of its active set, so one batched linear solve over all 2^T
active sets, keeping the feasible candidate of least objective, finds it. Beyond that, accelerated projected gradient
finds the active set and its KKT system is then solved exactly. The equations of Nash-MTL and FairGrad are the
optimality conditions of a strictly convex problem, solved by damped Newton.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

EXACT_TASKS = 10  # 2^10 linear systems of size 11 in one batch: about a millisecond
TOL = 1e-9  # on each problem's optimality measure, M normalised to trace 1
FEASIBLE = 1e-12  # how far below a bound a candidate may be and still count as on it
TIE = 1e-12  # candidates this close to the least objective, relative to the size of their terms, are optima too
F64 = torch.float64


def gramian(grads: torch.Tensor, other: torch.Tensor | None = None, chunk: int = 1 << 15) -> torch.Tensor:
    """G G^T (or G H^T, H = `other`, the rows of another batch) in float64 on the CPU, accumulated over column
    chunks (no float64 copy of G, and no TF32)."""
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=F64, device=grads.device)
    others = grads.split(chunk, dim=1) if other is None else other.split(chunk, dim=1)
    for part, right in zip(grads.split(chunk, dim=1), others):
        part = part.to(F64)
        gram += part @ (part if other is None else right.to(F64)).T
    return gram.cpu()


# ------------------------------------------------------------------------------------------------ min-norm point


def min_norm_point(gram: torch.Tensor, max_iters: int = 10_000) -> tuple[torch.Tensor, str | None]:
    """c = argmin_{c in simplex} c^T M c: the min-norm point of the convex hull of the rows of G is c @ G.

    When the optimum is not unique (duplicated or zero rows) the mean of the optimal vertices of the enumeration is
    returned, so that duplicated tasks share their weight. Checked by the Frank-Wolfe duality gap."""
    tasks, scale = gram.shape[0], gram.trace()
    if tasks == 1 or scale <= 0:
        return torch.full((tasks,), 1 / tasks, dtype=F64), None
    a = gram / scale

    if tasks <= EXACT_TASKS:
        c = _least(*_min_norm_candidates(a, _subsets(tasks)))
    else:
        def polish(x):
            exact = _simplex_kkt(a, (x > 0)[None].to(F64), _unit(tasks), least_squares=True)[0, :, 0]
            return _certified([project_to_simplex(exact.nan_to_num(-1.0)), x], lambda p: _simplex_gap(a, p))

        c, _ = _fista(lambda x: x @ a @ x, lambda x: 2 * a @ x, project_to_simplex,
                      torch.full((tasks,), 1 / tasks, dtype=F64), polish, max_iters)
    c = project_to_simplex(c) if c is not None else torch.full((tasks,), 1 / tasks, dtype=F64)
    return c, _check("the min-norm point's duality gap", _simplex_gap(a, c))


def _min_norm_candidates(a, masks):
    c = _simplex_kkt(a, masks, _unit(a.shape[0]))[..., 0]
    return c, _quad(c, a), _quad(c.abs(), a.abs())


def _simplex_gap(a, c):
    """c^T A c - min_i (A c)_i: half the Frank-Wolfe gap, an upper bound on the suboptimality."""
    ac = a @ c
    return float(c @ ac - ac.min())


# ------------------------------------------------------------------------------------------------ box QP (UPGrad)


def dual_cone_projections(gram: torch.Tensor, lower: torch.Tensor, max_iters: int = 10_000
                          ) -> tuple[torch.Tensor, str | None]:
    """V[k] = argmin_{v >= lower[k]} v^T M v for each row of `lower` [K, T], M positive definite: in weights, the
    projection of lower[k] @ G onto the dual cone of the rows of G (UPGrad). Checked by the LCP residual
    |min(v - lower, M v)|, zero exactly at the optimum."""
    tasks = gram.shape[0]
    if tasks <= EXACT_TASKS:
        free = _subsets(tasks, empty=True)  # every free set, for every problem: [sets, K, T]
        v = _box_kkt(gram, free, (1 - free)[:, :, None] * lower.T).transpose(1, 2)
        values = torch.where((v >= lower - FEASIBLE).all(-1), torch.einsum("nki,ij,nkj->nk", v, gram, v), math.inf)
        v = v[values.argmin(0), torch.arange(lower.shape[0])]  # the problem is strictly convex: one optimum
    else:
        def polish(x):
            free = (x > lower).to(F64)  # each problem's own free set
            exact = _box_kkt(gram, free, ((1 - free) * lower)[:, :, None])[..., 0]
            return _certified([torch.maximum(exact.nan_to_num(-1.0), lower), x],
                              lambda p: _box_residual(gram, lower, p))

        v, _ = _fista(lambda x: (x @ gram * x).sum(), lambda x: 2 * x @ gram, lambda x: torch.maximum(x, lower),
                      lower.clone(), polish, max_iters)
    v = torch.maximum(torch.nan_to_num(v, nan=0.0), lower)
    return v, _check("the dual-cone projection's KKT residual", _box_residual(gram, lower, v))


def _box_kkt(gram, free, rhs):
    """For each free set (a row of `free`) and its right-hand sides [T, R] (the lower bounds off the set, 0 on
    it): (M v)_i = 0 on the set, v_i = lower_i off it. -> [sets, T, R], NaN where singular."""
    system = torch.where(free[:, :, None] > 0, gram, torch.eye(gram.shape[0], dtype=F64))
    v, info = torch.linalg.solve_ex(system, rhs)
    v[info != 0] = math.nan
    return v


def _box_residual(gram, lower, v):
    return float(torch.minimum(v - lower, v @ gram).abs().max())


# --------------------------------------------------------------------------------------------- CAGrad's dual


def cagrad_dual(gram: torch.Tensor, c: float, max_iters: int = 10_000) -> tuple[torch.Tensor, str | None]:
    """w = argmin_{w in simplex} w^T M 1/T + c |g0| sqrt(w^T M w), |g0|^2 = 1^T M 1 / T^2 (Liu et al. 2021, eq. 4).

    On a support S the stationarity conditions with x = w / |g_w| are linear, phi M_S x - lam 1 = -b_S and
    1^T x = 1 / |g_w|, so x = x0 + sigma x1, and x^T M x = 1 fixes sigma: two candidates per support (the second
    one, x1, is the limit |g_w| -> 0). Checked by the gap between this dual and CAGrad's primal,
    max_{|d - g0| <= c|g0|} min_i g_i^T d, evaluated at d = g0 + c |g0| g_w / |g_w|."""
    tasks, scale = gram.shape[0], gram.trace()
    if tasks == 1 or scale <= 0 or c == 0:
        return torch.full((tasks,), 1 / tasks, dtype=F64), None
    a = gram / scale
    b, phi = a.mean(1), c * float(a.mean().clamp(min=0).sqrt())
    if phi == 0:
        return torch.full((tasks,), 1 / tasks, dtype=F64), None

    if tasks <= EXACT_TASKS:
        w = _least(*_cagrad_candidates(a, b, phi, _subsets(tasks)))
    else:
        def objective(w):
            return w @ b + phi * float((w @ a @ w).clamp(min=0).sqrt())

        def grad(w):
            norm = float((w @ a @ w).clamp(min=0).sqrt())
            return b + phi * (a @ w) / norm if norm > 0 else b

        def polish(x):
            exact = _least(*_cagrad_candidates(a, b, phi, (x > 0)[None].to(F64), least_squares=True))
            return _certified([x] if exact is None else [project_to_simplex(exact), x],
                              lambda p: _cagrad_gap(a, b, phi, p))

        start = torch.full((tasks,), 1 / tasks, dtype=F64)
        w, _ = _fista(objective, grad, project_to_simplex, start, polish, max_iters)
    w = project_to_simplex(w) if w is not None else torch.full((tasks,), 1 / tasks, dtype=F64)
    return w, _check("the CAGrad duality gap", _cagrad_gap(a, b, phi, w))


def _cagrad_candidates(a, b, phi, masks, least_squares=False):
    rhs = torch.zeros(a.shape[0] + 1, 2, dtype=F64)
    rhs[:-1, 0], rhs[-1, 1] = -b, 1.0
    x = _simplex_kkt(phi * a, masks, rhs, least_squares)
    x0, x1 = x[..., 0], x[..., 1]
    sigma = ((1 - _quad(x0, a)) / _quad(x1, a)).sqrt()  # NaN where there is no such root: filtered out
    w = torch.cat([x1 + x0 / sigma[:, None], x1])
    return w, w @ b + phi * _quad(w, a).clamp(min=0).sqrt(), w.abs() @ b.abs() + phi * _quad(w.abs(), a.abs()).sqrt()


def _cagrad_gap(a, b, phi, w):
    aw = a @ w
    norm = float((w @ aw).clamp(min=0).sqrt())
    primal = (b + phi * aw / norm).min() if norm > 0 else b.min()  # at d = g0 when g_w = 0
    return float(w @ b + phi * norm - primal)


# ------------------------------------------------------------------------------------- Nash-MTL and FairGrad


def positive_solution(gram: torch.Tensor, alpha: float = 1.0, max_iters: int = 100
                      ) -> tuple[torch.Tensor, str | None]:
    """w > 0 with M w = w^(-1/alpha): Nash-MTL's bargaining solution (alpha = 1), FairGrad's alpha-fair one.

    w minimises the strictly convex 1/2 w^T M w - sum_i u(w_i) with u'(w) = w^(-1/alpha), found by Newton's method
    with a step that keeps w > 0 and decreases that objective (or the residual, where rounding hides the decrease).
    M is scaled to trace 1 for the solve and w scaled back. A zero row (a task without gradient) can satisfy no
    equation: it gets weight 0. When 0 is in the convex hull of the gradients there is no solution (the iterates
    diverge): the failure is reported and the iterate of least residual max_i |(M w)_i w_i^(1/alpha) - 1| returned."""
    diagonal = gram.diagonal()
    live = diagonal > 1e-20 * diagonal.max().clamp(min=0)
    w = torch.zeros(gram.shape[0], dtype=F64)
    if not live.any():
        return w, None
    a = gram[live][:, live]
    scale, p = a.trace(), 1 / alpha
    a = a / scale

    def objective(x):
        utility = x.log().sum() if p == 1 else (x ** (1 - p)).sum() / (1 - p)
        return 0.5 * x @ a @ x - utility

    def residual(x):
        return float(((a @ x) * x**p - 1).abs().max())

    x = a.diagonal() ** (-alpha / (alpha + 1))  # the solution when the gradients are orthogonal
    best, best_residual, start, failure = x, residual(x), x.max(), None
    for _ in range(max_iters):
        if best_residual <= TOL:
            break
        grad = a @ x - x ** (-p)
        step, info = torch.linalg.solve_ex(a + torch.diag(p * x ** (-p - 1)), -grad)
        if info != 0 or not step.isfinite().all():
            failure = "Newton's system became singular"
            break
        shrinking = step < 0
        t = min(1.0, 0.99 * float((-x[shrinking] / step[shrinking]).min())) if shrinking.any() else 1.0
        value, slope, now = objective(x), float(grad @ step), residual(x)
        while objective(x + t * step) > value + 1e-4 * t * slope and residual(x + t * step) >= now:
            t /= 2
            if t < 1e-12:
                failure = "Newton's line search stalled"
                break
        if failure:
            break
        x = x + t * step
        if residual(x) < best_residual:
            best, best_residual = x, residual(x)
        if x.max() > 1e12 * start:
            failure = "the weights diverge"
            break
    w[live] = best * scale ** (-alpha / (alpha + 1))
    if failure is None and best_residual > TOL:
        failure = f"Newton's method stopped after {max_iters} iterations"
    if failure is None:
        return w, None
    hull, _ = min_norm_point(a)
    if hull @ a @ hull <= TOL:
        failure += ": 0 is in the convex hull of the task gradients, so there is no solution"
    return w, f"{failure} (residual {best_residual:.1e}, tolerance {TOL:.0e})"


# --------------------------------------------------------------------------------------------------- helpers


@functools.cache
def _subsets(tasks: int, empty: bool = False) -> torch.Tensor:
    """Every subset of range(tasks) (the empty one only if asked), as rows of 0/1."""
    codes = torch.arange(0 if empty else 1, 2**tasks)
    return ((codes[:, None] >> torch.arange(tasks)) & 1).to(F64)


def _unit(tasks: int) -> torch.Tensor:
    rhs = torch.zeros(tasks + 1, 1, dtype=F64)
    rhs[-1] = 1.0
    return rhs


def _simplex_kkt(a, masks, rhs, least_squares=False):
    """For each support S (a row of masks) and right-hand side r [T+1, R]: [[A_SS, -1], [1^T, 0]] [x_S; lam] = r
    restricted to S, x = 0 off S. The KKT matrix of a minimal-support optimum is non-singular. -> x [S, T, R], NaN
    where singular, unless least_squares (a minimum-norm solution then, for a support that may not be minimal)."""
    count, tasks = masks.shape
    system = torch.zeros(count, tasks + 1, tasks + 1, dtype=F64)
    system[:, :tasks, :tasks] = a * masks[:, :, None] * masks[:, None, :] + torch.diag_embed(1 - masks)
    system[:, :tasks, tasks], system[:, tasks, :tasks] = -masks, masks
    right = rhs.expand(count, -1, -1).clone()
    right[:, :tasks] *= masks[:, :, None]
    if least_squares:
        return torch.linalg.lstsq(system, right, driver="gelsd").solution[:, :tasks]
    x, info = torch.linalg.solve_ex(system, right)
    x = x[:, :tasks]
    x[info != 0] = math.nan
    return x


def _quad(x, a):
    return torch.einsum("ni,ij,nj->n", x, a, x)


def _least(points, values, sizes):
    """The mean of the feasible (non-negative) points of least value, or None if none is feasible. A point ties
    with the least when the values differ by less than TIE of the size of their terms (`sizes`: the value with every
    term taken positive), not of the problem's: where one task's gradient is 1e-6 of another's, the optimum's value
    is itself ~1e-18 of the trace, and an absolute tie would average it with points that are not optima."""
    values = torch.where((points >= -FEASIBLE).all(1) & values.isfinite(), values, math.inf)
    if not values.min().isfinite():
        return None
    best = values.argmin()
    return points[values <= values[best] + TIE * torch.maximum(sizes, sizes[best])].mean(0)


def project_to_simplex(x):
    """Euclidean projection onto the probability simplex (Held, Wolfe and Crowder 1974)."""
    if not torch.isfinite(x).all():
        raise ValueError(f"project_to_simplex: the point is not finite: {x.tolist()}")
    ordered = x.sort(descending=True).values
    excess = ordered.cumsum(0) - 1
    last = int((ordered - excess / torch.arange(1, len(x) + 1, dtype=F64) > 0).nonzero().max())
    return (x - excess[last] / (last + 1)).clamp(min=0)


def _certified(points, measure):
    """The first of the (feasible) points whose optimality measure is within TOL, or None."""
    return next((p for p in points if measure(p) <= TOL), None)


def _check(what, value):
    return None if value <= TOL else f"{what} is {value:.1e} > {TOL:.0e}"


def _fista(f: Callable, grad: Callable, project: Callable, x: torch.Tensor, polish: Callable, max_iters: int
           ) -> tuple[torch.Tensor, bool]:
    """Accelerated projected gradient with backtracking (Beck and Teboulle 2009) and gradient restart (O'Donoghue
    and Candes 2015). Every 10 steps `polish` may turn the iterate's active set into an exact, checked optimum,
    which ends the search; else the iterate of least f after max_iters, with False."""
    y, t, lipschitz, best = x, 1.0, 1.0, x
    for k in range(max_iters):
        g, fy = grad(y), f(y)
        while True:
            step = project(y - g / lipschitz)
            d = step - y
            if f(step) <= fy + (g * d).sum() + lipschitz / 2 * (d * d).sum() + 1e-15 * abs(fy):
                break
            lipschitz *= 2
        if ((y - step) * (step - x)).sum() > 0:  # the momentum points uphill: restart it
            t_next, y = 1.0, step
        else:
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = step + (t - 1) / t_next * (step - x)
        x, t = step, t_next
        best = x if f(x) < f(best) else best
        if k % 10 == 9 and (exact := polish(x)) is not None:
            return exact, True
    return best, False
