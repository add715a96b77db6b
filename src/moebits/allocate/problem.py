"""The allocation problem: input checks, the feasible range, and the result every solver returns.

    min  sum_u loss[u, c_u]   s.t.  sum_u cost[u, c_u] <= budget,   one choice c_u per unit

`loss` is already frequency-weighted (f_u * l_u(c)); `cost` is in the budget's unit (bits, seconds, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

BudgetFormat = Callable[[float], str]

# Relative slack when comparing a plan's cost to the budget: float sums of ~1e5 costs (pairwise summation
# errs by ~1e-15). Below one bit for any budget under 12 TB, so integer storage costs never exceed a storage budget.
BUDGET_RTOL = 1e-14


class InfeasibleBudgetError(ValueError):
    """The budget is below the cheapest plan. Carries the feasible range so a CLI can say what to ask for."""

    def __init__(self, budget: float, min_cost: float, max_cost: float, budget_format: BudgetFormat | None = None,
                 what: str = "plan"):
        self.budget, self.min_cost, self.max_cost = float(budget), float(min_cost), float(max_cost)
        msg = (f"budget {budget:.6g} is below the cheapest {what} ({min_cost:.6g}); "
               f"feasible: {min_cost:.6g} – {max_cost:.6g} (above {max_cost:.6g} the budget no longer binds)")
        if budget_format is not None:
            msg += (f"; in the budget's unit: asked {budget_format(budget)}, "
                    f"feasible: {budget_format(min_cost)} – {budget_format(max_cost)}")
        super().__init__(msg)


@dataclass
class AllocationResult:
    choice_index: np.ndarray  # [U] int: the chosen column of loss/cost for every unit
    total_loss: float
    total_cost: float
    budget: float
    solver: str
    seconds: float = 0.0  # wall time of the solver (groups reduction included, input checks not)
    lambda_: float | None = None  # Lagrange multiplier (lagrangian)
    optimal: bool | None = None  # proven optimal (within the solver's gap tolerance); None = not known
    gap: float | None = None  # proven relative gap (total_loss - lower_bound) / |total_loss|; None = no bound
    lower_bound: float | None = None  # a proven lower bound on the optimal total loss
    info: dict = field(default_factory=dict)  # solver-specific extras (iterations, pre-fill totals, ...)

    def summary(self) -> str:
        s = f"{self.solver}: loss {self.total_loss:.6g}, cost {self.total_cost:.6g} / {self.budget:.6g}, {self.seconds * 1e3:.1f} ms"
        if self.gap is not None:
            s += f", gap <= {100 * self.gap:.4f}%"
        return s


def check_problem(loss, cost, budget) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate and convert; every error names what is wrong and how it should look."""
    loss = np.asarray(loss, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if loss.ndim != 2:
        raise ValueError(f"loss must be a 2-D [units, choices] array, got shape {loss.shape}")
    if cost.shape != loss.shape:
        raise ValueError(f"cost has shape {cost.shape} but loss has shape {loss.shape}; both must be [units, choices]")
    if loss.shape[0] == 0 or loss.shape[1] == 0:
        raise ValueError(f"need at least one unit and one choice, got shape {loss.shape}")
    if not np.all(np.isfinite(loss)):
        bad = np.argwhere(~np.isfinite(loss))[0]
        raise ValueError(f"loss must be finite; loss[{bad[0]}, {bad[1]}] = {loss[tuple(bad)]} "
                         "(fill missing table entries with a predictor before allocating)")
    if not np.all(np.isfinite(cost)):
        bad = np.argwhere(~np.isfinite(cost))[0]
        raise ValueError(f"cost must be finite; cost[{bad[0]}, {bad[1]}] = {cost[tuple(bad)]}")
    if np.any(cost < 0):
        bad = np.argwhere(cost < 0)[0]
        raise ValueError(f"cost must be >= 0; cost[{bad[0]}, {bad[1]}] = {cost[tuple(bad)]}")
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number, got {budget!r}") from None
    if not np.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    return loss, cost, budget


def cost_range(cost: np.ndarray) -> tuple[float, float]:
    """Cheapest and most expensive achievable total cost."""
    return float(cost.min(axis=1).sum()), float(cost.max(axis=1).sum())


def fits(total_cost: float, budget: float) -> bool:
    return total_cost <= budget + BUDGET_RTOL * max(abs(budget), 1.0)


def check_feasible(cost: np.ndarray, budget: float, budget_format: BudgetFormat | None = None) -> None:
    lo, hi = cost_range(cost)
    if not fits(lo, budget):
        raise InfeasibleBudgetError(budget, lo, hi, budget_format)


def totals(loss: np.ndarray, cost: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    r = np.arange(len(idx))
    return float(loss[r, idx].sum()), float(cost[r, idx].sum())


def relative_gap(value: float, bound: float) -> float:
    return max(0.0, (value - bound) / max(abs(value), 1e-300))
