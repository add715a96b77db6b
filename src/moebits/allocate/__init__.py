"""Allocators: choose one choice per unit to minimise the frequency-weighted loss under a budget.

    min sum_u loss[u, c_u]  s.t.  sum_u cost[u, c_u] <= budget      (a multiple-choice knapsack)

One entry point, `allocate`, dispatches to a solver module with the same contract:

    ilp         exact, HiGHS via scipy.optimize.milp (MxMoE, BT-MoE)
    lagrangian  bisection on lambda + greedy fill (FRI-MxMoE; `fill=False` is the paper exactly)
    freq        MPQ-Freq: the most frequently routed units get the most bits
    uniform     one column for every unit
    rl          DMPQ: PPO over raise/lower moves (optional extra `rl`); options `objectives` ([U, C] per
                name) and `features` ([U, F]) are summed over groups like loss and cost

`extra` adds more knapsack rows `(cost_k [U, C], budget_k)` (e.g. the average activation bits of a W-A
allocation, budget.ActBitsBudget); only `ilp` takes them -- the Lagrangian's single multiplier and
the greedy heuristics have no second constraint, and a plan that ignored it would be wrong.

`groups` ties units to one choice (see `groups.py`); the budget is checked against the feasible range
first (`check_budget`), so every solver may assume it is feasible.

From a sensitivity table and a `budget.Budget` to a `Plan` in one call: `plan_under_budget` (planning.py),
used by the pipeline, `moebits allocate` and the benchmarks.
"""
from __future__ import annotations

import time

import numpy as np

from . import freq, ilp, lagrangian, rl, uniform
from .groups import combine_groups, expert_level, layer_uniform, reduce_groups, tie_gate_up
from .planning import plan_under_budget, to_plan
from .problem import AllocationResult, BudgetFormat, InfeasibleBudgetError, check_feasible, check_problem, totals

SOLVERS = {"ilp": ilp.solve, "lagrangian": lagrangian.solve, "freq": freq.solve, "uniform": uniform.solve,
           "rl": rl.solve}

__all__ = ["allocate", "AllocationResult", "InfeasibleBudgetError", "SOLVERS", "to_plan", "plan_under_budget",
           "check_budget", "tie_gate_up", "expert_level", "layer_uniform", "combine_groups"]


def _check_reduced(cost_g: np.ndarray, budget: float, solver: str, budget_format) -> None:
    if solver == "uniform":  # one column for every unit: a narrower range than the mixed problem's
        uniform.check_feasible(cost_g, budget, budget_format)
    else:
        check_feasible(cost_g, budget, budget_format)


def check_budget(cost, budget: float, solver: str, groups=None, budget_format: BudgetFormat | None = None) -> None:
    """Raise InfeasibleBudgetError (with the feasible range) when `solver` has no plan within `budget`
    under the structure `groups`. The same check `allocate` makes, available before any loss is known."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    cost = np.asarray(cost, dtype=np.float64)
    if groups is not None:
        cost = reduce_groups(cost, cost, groups)[1]
    _check_reduced(cost, float(budget), solver, budget_format)


EXTRA_CONSTRAINT_SOLVERS = ("ilp",)


def allocate(loss, cost, budget: float, solver: str = "lagrangian", groups=None, frequency=None,
             budget_format: BudgetFormat | None = None, extra=(), **options) -> AllocationResult:
    """Solve the allocation. `loss` [U, C] is f_u * l_u(c), `cost` [U, C] >= 0 in the budget's unit.

    `groups` [U] ints: units with equal ids take the same choice. `frequency` [U]: needed by `freq`.
    `budget_format` turns a cost into words for error messages (e.g. `cost.avg_bits_formatter(shapes)`).
    `options` go to the solver (`fill`, `rtol` for lagrangian; `time_limit`, `mip_rel_gap` for ilp).
    Raises InfeasibleBudgetError (a ValueError) with the feasible range when no plan fits.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    loss, cost, budget = check_problem(loss, cost, budget)
    extra = [(np.asarray(c, dtype=np.float64), float(b)) for c, b in extra]
    if extra and solver not in EXTRA_CONSTRAINT_SOLVERS:
        raise ValueError(f"solver {solver!r} takes one budget; a second constraint (average activation bits of a "
                         f"joint weight/activation allocation) needs --solver {' or '.join(EXTRA_CONSTRAINT_SOLVERS)}")
    for c, _ in extra:
        if c.shape != loss.shape:
            raise ValueError(f"extra constraint cost has shape {c.shape}, expected {loss.shape}")
    if frequency is not None:
        frequency = np.asarray(frequency, dtype=np.float64)
        if frequency.shape != (loss.shape[0],) or not np.all(np.isfinite(frequency)):
            raise ValueError(f"frequency must be finite with shape ({loss.shape[0]},), got shape {frequency.shape}")
    if solver == "freq":
        if frequency is None:
            raise ValueError("solver 'freq' needs `frequency` (routed-token frequency per unit)")
        options["frequency"] = frequency
    t0 = time.perf_counter()
    inverse = None
    if groups is not None:
        loss_g, cost_g, freq_g, inverse = reduce_groups(loss, cost, groups, frequency)
        if solver == "freq":
            options["frequency"] = freq_g
        extra_g = [(reduce_groups(c, c, groups)[0], b) for c, b in extra]
        if options.get("objectives"):  # rl: per-unit cost matrices of the reward, summed like cost
            options["objectives"] = {k: reduce_groups(m, m, groups)[0] for k, m in options["objectives"].items()}
        if options.get("features") is not None:  # rl: per-unit statistics, summed over the group
            feats = np.asarray(options["features"], dtype=np.float64)
            options["features"] = reduce_groups(feats, feats, groups)[0]
    else:
        loss_g, cost_g, extra_g = loss, cost, extra
    _check_reduced(cost_g, budget, solver, budget_format)
    if extra_g:
        options["extra"] = extra_g
    res = SOLVERS[solver](loss_g, cost_g, budget, **options)
    if inverse is not None:
        res.choice_index = res.choice_index[inverse]
        res.total_loss, res.total_cost = totals(loss, cost, res.choice_index)
        res.info["groups"] = int(len(loss_g))
    res.choice_index = np.asarray(res.choice_index, dtype=np.int64)
    res.seconds = time.perf_counter() - t0
    return res
