"""Exact multiple-choice knapsack as a 0/1 ILP, solved by HiGHS through `scipy.optimize.milp`.

    min sum_uc loss[u,c] x[u,c]   s.t.  sum_c x[u,c] = 1 (every u),  sum_uc cost[u,c] x[u,c] <= budget,  x binary

This is MxMoE's and BT-MoE's allocator. The constraint matrices are built directly in CSR form (row u
of the assignment block covers columns u*C .. u*C+C-1), so 155,520 x 4 builds in milliseconds. Loss and
cost are rescaled to O(1) for the solver's tolerances; totals are recomputed exactly afterwards.

**Reduced-cost fixing (`reduce=True`, default).** Plain HiGHS needs minutes on 155,520 x 4 (its root
heuristics, not its LP, dominate). We first run the Lagrangian allocator, which gives an incumbent of
loss `UB` and a dual bound `D(lambda)`. Every feasible plan x satisfies
`loss(x) >= D(lambda) + sum_u rc[u, x_u]` (see `lagrangian.dual`), so a variable whose reduced cost
exceeds `UB - D` cannot be part of a plan better than the incumbent and is fixed to 0 -- an exact
reduction, not a heuristic. Units left with one candidate are fixed outright; HiGHS solves the rest.
The optimum and the proven gap are those of the full problem.

**A node limit (`node_limit`, default `DEFAULT_NODE_LIMIT`).** When costs are not multiples of one
quantum (zero points packed at the code width: a 2->3-bit step costs 128*(in+1) bits, not 128*in), the
budget rarely fills exactly and the LP bound sits up to one unit's upgrade below the best plan: on 1,152
units of near-equal sensitivity that is ~0.2 % of the loss, above HiGHS's 1e-4. HiGHS then finds its
best plan within ~50 nodes and spends thousands more (minutes) only proving it. A node limit stops
that deterministically (a time limit would make the plan depend on the machine's speed); the plan is
still the best found, `optimal` is False and `gap` says what was proven.

**More constraints (`extra`).** Further knapsack rows `(cost_k, budget_k)` -- the average activation
bits of a joint W/A allocation -- go to HiGHS as more rows. The Lagrangian incumbent ignores them, so
it may be infeasible and its bound says nothing about them: reduced-cost fixing is then off and HiGHS
solves the whole problem.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from . import lagrangian
from .problem import AllocationResult, fits, relative_gap, totals


def _matrices(cost: np.ndarray, keep: np.ndarray):
    """Assignment rows (one per unit, = 1) and the knapsack row over the kept variables only."""
    U = cost.shape[0]
    counts = keep.sum(axis=1)
    cols = np.arange(int(counts.sum()))
    assign = csr_matrix((np.ones(len(cols)), cols, np.concatenate([[0], np.cumsum(counts)])), shape=(U, len(cols)))
    knap = csr_matrix((cost[keep], cols, np.array([0, len(cols)])), shape=(1, len(cols)))
    return assign, knap


def _milp(loss, cost, keep, budget, options, extra=()):
    """Solve over the kept variables; returns (choice index per unit, HiGHS result)."""
    U = loss.shape[0]
    loss_scale = float(np.abs(loss[keep]).max()) or 1.0
    cost_scale = float(cost[keep].max()) or 1.0
    assign, knap = _matrices(cost / cost_scale, keep)
    rows, cols = np.nonzero(keep)  # row-major: the same order as the columns of `assign`
    cap = budget / cost_scale
    rows_k = []  # (matrix, scale, budget, cap) per extra constraint
    for c_k, b_k in extra:
        scale_k = float(c_k[keep].max()) or 1.0
        rows_k.append([_matrices(c_k / scale_k, keep)[1], scale_k, b_k, b_k / scale_k, c_k])
    for _ in range(3):  # re-solve with a tighter cap if HiGHS's feasibility tolerance let the plan overshoot
        constraints = [LinearConstraint(assign, 1, 1), LinearConstraint(knap, -np.inf, cap)]
        constraints += [LinearConstraint(m, -np.inf, cap_k) for m, _, _, cap_k, _ in rows_k]
        res = milp(loss[keep] / loss_scale, integrality=np.ones(len(rows)), bounds=Bounds(0, 1),
                   constraints=constraints, options=options)
        if res.x is None:  # typically: the time limit came before any incumbent, or no plan meets every row
            return None, res, None
        on = res.x > 0.5
        idx = np.zeros(U, dtype=np.int64)
        idx[rows[on]] = cols[on]
        used = float(cost[np.arange(U), idx].sum())
        used_k = [float(r[4][np.arange(U), idx].sum()) for r in rows_k]
        if fits(used, budget) and all(fits(u_k, r[2]) for u_k, r in zip(used_k, rows_k)):
            bound = float(res.mip_dual_bound) * loss_scale if res.mip_dual_bound is not None else None
            return idx, res, bound
        if not fits(used, budget):
            cap -= 2 * (used - budget) / cost_scale
        for u_k, r in zip(used_k, rows_k):
            if not fits(u_k, r[2]):
                r[3] -= 2 * (u_k - r[2]) / r[1]
    raise RuntimeError(f"HiGHS's plans overshoot the budget ({used:.6g} > {budget:.6g})")


DEFAULT_NODE_LIMIT = 1000  # branch-and-bound nodes; ~5 s on 1,152 units (see the module docstring)


def solve(loss: np.ndarray, cost: np.ndarray, budget: float, *, reduce: bool = True, mip_rel_gap: float = 1e-4,
          time_limit: float | None = None, node_limit: int | None = DEFAULT_NODE_LIMIT, presolve: bool = True,
          disp: bool = False, extra=()) -> AllocationResult:
    """Solve to a proven relative gap of `mip_rel_gap` (HiGHS's default, 1e-4, far below the noise of any
    sensitivity estimate; pass 0 for a strict optimum). Assumes the budget is feasible. `optimal` is
    True when the gap closed -- with `reduce`, possibly by the Lagrangian bound alone, then HiGHS is not
    called -- and False when `time_limit` or `node_limit` (None or 0: none) stopped HiGHS with an incumbent
    (`gap` is what was proven)."""
    options = {"disp": disp, "presolve": presolve, "mip_rel_gap": mip_rel_gap}
    if node_limit:
        options["node_limit"] = int(node_limit)
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    U, C = loss.shape
    if not reduce or extra:
        idx, res, bound = _milp(loss, cost, np.ones((U, C), bool), budget, options, extra)
        if idx is None:
            if extra and res.status == 2:
                raise ValueError("no plan meets the budget and the average-activation-bits budget at "
                                            "once; raise one of them")
            raise RuntimeError(f"HiGHS found no plan (status {res.status}: {res.message}); "
                               "raise time_limit or use reduce=True, which always has the Lagrangian plan")
        total_loss, total_cost = totals(loss, cost, idx)
        return AllocationResult(
            idx, total_loss, total_cost, budget, "ilp", optimal=res.status == 0,
            gap=relative_gap(total_loss, bound) if bound is not None else None, lower_bound=bound,
            info={"status": int(res.status), "message": res.message, "nodes": res.mip_node_count, "variables": U * C},
        )

    inc = lagrangian.solve(loss, cost, budget)
    if inc.gap <= mip_rel_gap:  # the dual bound already proves the incumbent within tolerance
        inc.solver, inc.optimal = "ilp", True
        inc.info = {"variables": 0, "free_units": 0, "incumbent_loss": inc.total_loss, "proved_by": "lagrangian bound"}
        return inc
    lam = inc.info["lambda_bound"]
    d, rc = lagrangian.dual(loss, cost, lam, budget)
    margin = (inc.total_loss - d) + 1e-9 * abs(inc.total_loss) + 1e-300  # slack for float rounding: keeps more
    keep = rc <= margin
    keep[np.arange(U), inc.choice_index] = True  # the incumbent stays representable
    free = keep.sum(axis=1) > 1
    info = {"variables": int(keep[free].sum()), "free_units": int(free.sum()), "incumbent_loss": inc.total_loss}
    best_idx, bound = inc.choice_index.copy(), inc.lower_bound
    optimal, status = not free.any(), None
    if free.any():
        fixed = ~free
        fixed_cost = float(cost[fixed, best_idx[fixed]].sum())
        fixed_loss = float(loss[fixed, best_idx[fixed]].sum())
        sub_idx, res, sub_bound = _milp(loss[free], cost[free], keep[free], budget - fixed_cost, options)
        status, optimal = int(res.status), res.status == 0
        stopped = node_limit and not optimal and (res.mip_node_count or 0) >= node_limit
        info.update(status=status, nodes=res.mip_node_count,
                    message=f"stopped at the node limit ({node_limit} nodes)" if stopped else res.message)
        if sub_idx is not None:
            cand = best_idx.copy()
            cand[free] = sub_idx
            if totals(loss, cost, cand)[0] <= inc.total_loss:
                best_idx = cand
        if sub_bound is not None:  # any plan better than the incumbent lives in the reduced problem
            bound = max(bound, min(inc.total_loss, fixed_loss + sub_bound))
    total_loss, total_cost = totals(loss, cost, best_idx)
    gap = 0.0 if optimal and not free.any() else relative_gap(total_loss, bound)
    return AllocationResult(best_idx, total_loss, total_cost, budget, "ilp", lambda_=lam, optimal=optimal,
                            gap=gap, lower_bound=bound, info=info)
