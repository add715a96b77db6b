"""Uniform: the same choice (column) for every unit, the most expensive one that fits the budget.

The baseline "RTN / GPTQ / HQQ at one bit-width". Its feasible range is narrower than the mixed
problem's (the cheapest *column* may cost more than every unit's cheapest choice), so it has its own
check, `check_feasible`, which raises InfeasibleBudgetError with the range of the uniform plans.
"""
from __future__ import annotations

import numpy as np

from .problem import AllocationResult, BudgetFormat, InfeasibleBudgetError, fits


def check_feasible(cost: np.ndarray, budget: float, budget_format: BudgetFormat | None = None) -> None:
    col_cost = cost.sum(axis=0)
    if not any(fits(c, budget) for c in col_cost):
        raise InfeasibleBudgetError(budget, col_cost.min(), col_cost.max(), budget_format, what="uniform plan")


def solve(loss: np.ndarray, cost: np.ndarray, budget: float) -> AllocationResult:
    """Assumes `check_feasible` passed (`allocate` calls it)."""
    col_cost = cost.sum(axis=0)
    col_loss = loss.sum(axis=0)
    ok = np.array([fits(c, budget) for c in col_cost])
    # most expensive fitting column; among equal costs the lower loss
    cand = np.flatnonzero(ok)
    j = int(cand[np.lexsort((col_loss[cand], -col_cost[cand]))[0]])
    idx = np.full(len(loss), j, dtype=np.int64)
    return AllocationResult(idx, float(col_loss[j]), float(col_cost[j]), budget, "uniform", info={"column": j})
