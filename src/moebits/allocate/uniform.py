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


def explain(cost: np.ndarray, budget: float, choices, column: int, shapes, describe=None,
            zero_points: str = "packed") -> str:
    """One line saying which uniform setting a budget bought, why, and what the next one would cost.

    `cost [U, C]` in the budget's unit, `choices` the columns, `column` the chosen one, `shapes` the
    `(out, in)` of each unit (rows of `cost`). Users expect `--bits 3.25` to mean "3-bit g128"; when
    rows are narrower than (or not a multiple of) the group, a group pays its full metadata (a 16-bit
    scale and a zero stored as `zero_points` says) and the same codes cost more, which silently drops
    uniform to a narrower width.
    """
    fmt = describe or (lambda c: f"{c:.6g}")
    col_cost = cost.sum(axis=0)
    chosen = choices[column]
    line = (f"uniform chose {chosen.label} for every unit: the widest setting whose exact storage "
            f"({fmt(col_cost[column])}) fits the budget ({fmt(budget)})")
    dearer = [j for j in np.argsort(col_cost) if col_cost[j] > col_cost[column] + 1e-9 and not choices[j].is_fp]
    if dearer:
        nxt = int(dearer[0])
        line += f"; {choices[nxt].label} would need {fmt(col_cost[nxt])}"
    if not chosen.is_fp and chosen.group_size > 0:
        odd = [s for s in shapes if s[1] % chosen.group_size]
        if odd:
            worst = max(odd, key=lambda s: chosen.bits_per_weight(*s, zero_points))
            line += (f". {len(odd)} of {len(shapes)} units have rows not a multiple of the group size "
                     f"(e.g. {worst[1]} wide at g{chosen.group_size}), so there {chosen.bits}-bit codes cost "
                     f"{chosen.bits_per_weight(*worst, zero_points):.3f} bits per weight instead of "
                     f"{chosen.nominal_bits(zero_points):g}; "
                     f"use --wbits {chosen.bits + 1} for {chosen.bits + 1}-bit codes whatever the storage")
    return line
