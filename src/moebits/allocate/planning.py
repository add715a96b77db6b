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
    return Plan(assignments, {**solver_meta, **(meta or {})})
