"""Turn an AllocationResult into a `moebits.plan.Plan` (unit -> choice, with the loss and cost the
allocator saw, and the totals in `meta`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..plan import Assignment, Plan
from ..units import Choice, Unit
from .problem import AllocationResult


def to_plan(units: Sequence[Unit], choices: Sequence[Choice], result: AllocationResult, loss: np.ndarray,
            cost: np.ndarray, meta: dict | None = None) -> Plan:
    loss, cost, idx = np.asarray(loss), np.asarray(cost), np.asarray(result.choice_index)
    if not (len(units) == len(idx) == loss.shape[0] == cost.shape[0]):
        raise ValueError(f"to_plan: {len(units)} units but {len(idx)} choices in the result and "
                         f"{loss.shape[0]}/{cost.shape[0]} rows in loss/cost")
    if loss.shape[1] != len(choices):
        raise ValueError(f"to_plan: {len(choices)} choices but loss has {loss.shape[1]} columns")
    assignments = {
        u: Assignment(choices[int(j)], float(loss[i, j]), float(cost[i, j])) for i, (u, j) in enumerate(zip(units, idx))
    }
    solver_meta = {
        "solver": result.solver, "budget": result.budget, "total_loss": result.total_loss,
        "total_cost": result.total_cost, "seconds": result.seconds, "lambda": result.lambda_,
        "optimal": result.optimal, "gap": result.gap,
    }
    if result.solver == "rl":  # the search's own account: objective, episodes, whether it had to repair
        solver_meta["rl"] = result.info
    return Plan(assignments, {**solver_meta, **(meta or {})})


def plan_under_budget(table, budget, solver: str, groups: np.ndarray | None = None, meta: dict | None = None,
                      **options) -> Plan:
    """Table -> plan: minimise the frequency-weighted loss `table.loss` under `budget` (a `budget.Budget`
    whose rows are `table.units` and columns `table.choices`) with `solver`; `groups` ties units.

    The plan's meta records the solver's totals, the budget as asked (`{"bits": 3.25}`) and `avg_bits`.
    `options` go to the solver (see `allocate`).
    """
    from . import allocate

    if list(budget.units) != list(table.units):
        raise ValueError("the budget's units are not the table's units (same units in the same order)")
    if budget.cost.shape != (len(table.units), len(table.choices)):
        raise ValueError(f"budget cost has shape {budget.cost.shape}, the table {len(table.units)} x {len(table.choices)}")
    loss = table.loss
    act = getattr(budget, "act", None)
    extra = [(act.cost, act.total)] if act is not None else []
    res = allocate(loss, budget.cost, budget.total, solver=solver, groups=groups, frequency=table.frequency,
                   budget_format=budget.describe, extra=extra, **options)
    plan = to_plan(table.units, table.choices, res, loss, budget.cost,
                   {"solver": solver, "budget": budget.as_meta(), **(meta or {})})
    plan.zero_points = getattr(budget, "zero_points", plan.zero_points)  # the costs it was allocated under
    plan.meta["avg_bits"] = plan.avg_bits(budget.shapes)
    if act is not None:  # MAC-weighted average activation bits (budget.ActBitsBudget)
        plan.meta["avg_act_bits"] = act.average(np.asarray(res.choice_index))
    return plan
