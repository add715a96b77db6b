"""Lagrangian relaxation with bisection on lambda: FRI-MxMoE's allocator (seed 000, Eq. 7-8, Alg. 1).

For a fixed lambda >= 0 the relaxed problem decouples: each unit takes
`argmin_c loss[u, c] + lambda * cost[u, c]` (Eq. 8), a single vectorised argmin over `[U, C]`. The
total cost is non-increasing in lambda, so bisection finds the smallest lambda whose plan fits.

Two details the paper leaves open, chosen here:

* **Bisection in log-space between exact brackets.** The breakpoints (slopes of the units' loss-cost
  hulls) span many decades once losses are frequency-weighted, so a midpoint bisection from a
  "lambda_large" wastes its iterations. We bracket with the largest and smallest breakpoint (computed
  exactly) and bisect the geometric mean to a relative width of `rtol`: ~40 argmins.
* **Greedy fill (ours, on top of the paper).** The plan at the final lambda leaves budget unused: the
  LP optimum has one fractional unit, and every unit whose breakpoint equals lambda* sits at its cheaper
  vertex. After bisection we repeatedly upgrade the units whose best affordable step has the largest
  loss decrease per unit cost, while the budget allows (`fill=True`, the default; an improvement over
  the paper, not part of it). `fill=False` is Algorithm 1 exactly (`--solver lagrangian --no-fill`;
  `tests/test_adaptive.py` checks it against an independent midpoint-bisection implementation).
  `benchmarks/bench_solvers.py` and `bench_fri_rules.py` (results/fri_rules_ppl.md) measure both.

The relaxation also gives a proven lower bound (the Lagrangian dual, `sum_u min_c(loss + lambda cost)
- lambda budget` at any lambda), so the result reports how far from optimal it can be at most.
"""
from __future__ import annotations

import numpy as np

from .problem import AllocationResult, fits, relative_gap, totals

_TIE = 1e-12  # relative nudge past a breakpoint so the bracket ends are strictly on one side


def _sort_rows_by_cost(loss: np.ndarray, cost: np.ndarray):
    """Sort every unit's choices by cost: argmin's first-index tie-break then picks the cheaper choice,
    which keeps the total cost monotone in lambda. Returns the order (None if already sorted)."""
    if np.all(np.diff(cost, axis=1) >= 0):
        return loss, cost, None
    order = np.argsort(cost, axis=1, kind="stable")
    return np.take_along_axis(loss, order, 1), np.take_along_axis(cost, order, 1), order


def _pick(loss: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    return np.argmin(loss + lam * cost, axis=1)


def _breakpoint_bracket(loss: np.ndarray, cost: np.ndarray) -> tuple[float, float]:
    """(smallest, largest) positive breakpoint over all units: below the smallest every unit is at its
    minimum-loss choice, above the largest every unit is at its minimum-cost choice."""
    r = np.arange(len(loss))
    # largest breakpoint: the steepest step out of each unit's cheapest choice
    v0 = np.argmin(np.where(cost == cost.min(axis=1, keepdims=True), loss, np.inf), axis=1)
    dk = cost - cost[r, v0][:, None]
    dl = loss[r, v0][:, None] - loss
    ok = (dk > 0) & (dl > 0)
    hi = float(np.max(np.where(ok, dl / np.where(ok, dk, 1.0), 0.0), initial=0.0))
    # smallest breakpoint: the flattest step into each unit's minimum-loss choice
    v1 = _pick(loss, cost, 0.0)
    dk = cost[r, v1][:, None] - cost
    dl = loss - loss[r, v1][:, None]
    ok = (dk > 0) & (dl > 0)
    lo = float(np.min(np.where(ok, dl / np.where(ok, dk, 1.0), np.inf), initial=np.inf))
    return lo, hi


def _fill(loss, cost, idx, budget, max_rounds):
    """Upgrade units along their best affordable step (largest loss decrease per cost) while the budget
    allows. Each round ranks one step per unit and takes the longest prefix that fits."""
    r = np.arange(len(idx))
    remaining = budget - cost[r, idx].sum()
    upgrades = rounds = 0
    active = r  # units that may still have an affordable improving step
    while rounds < max_rounds and len(active):
        rounds += 1
        cur = idx[active]
        dk = cost[active] - cost[active, cur][:, None]
        dl = loss[active, cur][:, None] - loss[active]
        ok = (dk > 0) & (dl > 0) & (dk <= remaining)
        ratio = np.where(ok, dl / np.where(ok, dk, 1.0), -np.inf)
        best = np.argmax(ratio, axis=1)
        rows = np.arange(len(active))
        best_ratio, step = ratio[rows, best], dk[rows, best]
        has = np.isfinite(best_ratio)
        if not has.any():
            break
        active, best, best_ratio, step = active[has], best[has], best_ratio[has], step[has]
        order = np.argsort(-best_ratio, kind="stable")
        take = order[np.cumsum(step[order]) <= remaining]
        if len(take) == 0:  # cannot happen: the first step fits by construction; guard against rounding
            break
        idx[active[take]] = best[take]
        remaining -= step[take].sum()
        upgrades += len(take)
    return idx, upgrades, rounds


def dual(loss: np.ndarray, cost: np.ndarray, lam: float, budget: float) -> tuple[float, np.ndarray]:
    """Lagrangian dual value `D(lam) = sum_u min_c (loss + lam cost) - lam budget` (a lower bound on the
    optimum for every lam >= 0) and the reduced costs `rc[u, c] = (loss + lam cost)[u, c] - min_c (...)`.

    Any plan x with cost <= budget has `loss(x) >= D(lam) + sum_u rc[u, x_u]`; the ILP uses this to fix
    variables whose reduced cost alone exceeds the gap to an incumbent."""
    v = loss + lam * cost
    m = v.min(axis=1)
    return float(m.sum() - lam * budget), v - m[:, None]


def solve(loss: np.ndarray, cost: np.ndarray, budget: float, *, fill: bool = True, rtol: float = 1e-10,
          max_iter: int = 200, max_fill_rounds: int = 10_000) -> AllocationResult:
    """Bisection on lambda (+ greedy fill unless `fill=False`). Assumes the budget is feasible."""
    L, K, order = _sort_rows_by_cost(loss, cost)
    r = np.arange(len(L))

    def cost_of(lam):
        idx = _pick(L, K, lam)
        return idx, float(K[r, idx].sum())

    idx, c = cost_of(0.0)
    iters = 1
    lam_lo = lam_hi = 0.0
    if not fits(c, budget):  # the budget binds: bracket by the extreme breakpoints, bisect in log-space
        b_lo, b_hi = _breakpoint_bracket(L, K)
        lam_lo, lam_hi = b_lo * (1 - _TIE), b_hi * (1 + _TIE)
        if not 0 < lam_lo < np.inf:  # unreachable when cost(0) > budget; keep the loop well-defined
            lam_lo = min(lam_hi, 1.0) * 1e-300
        idx, c = cost_of(lam_hi)
        iters += 1
        while not fits(c, budget):  # rounding at the top breakpoint: push further
            lam_hi *= 2
            idx, c = cost_of(lam_hi)
            iters += 1
        while iters < max_iter and lam_hi / lam_lo - 1 > rtol and c != budget:
            mid = float(np.sqrt(lam_lo * lam_hi))
            idx_m, c_m = cost_of(mid)
            iters += 1
            if fits(c_m, budget):
                lam_hi, idx, c = mid, idx_m, c_m
            else:
                lam_lo = mid
    # the dual bound is best at lambda*, which lies in [lam_lo, lam_hi]
    (bound, _), lam_bound = dual(L, K, lam_hi, budget), lam_hi
    if 0 < lam_lo < lam_hi:
        b_lo = dual(L, K, lam_lo, budget)[0]
        if b_lo > bound:
            bound, lam_bound = b_lo, lam_lo
    pre_loss, pre_cost = totals(L, K, idx)
    upgrades = rounds = 0
    if fill:
        idx, upgrades, rounds = _fill(L, K, idx.copy(), budget, max_fill_rounds)
    if order is not None:
        idx = order[r, idx]
    total_loss, total_cost = totals(loss, cost, idx)
    gap = relative_gap(total_loss, bound)
    return AllocationResult(
        idx, total_loss, total_cost, budget, "lagrangian" if fill else "lagrangian-pure", lambda_=lam_hi,
        optimal=True if gap == 0.0 else None, gap=gap, lower_bound=bound,
        info={"iterations": iters, "lambda_lo": lam_lo, "lambda_bound": lam_bound, "bisection_loss": pre_loss,
              "bisection_cost": pre_cost, "fill_upgrades": upgrades, "fill_rounds": rounds},
    )
