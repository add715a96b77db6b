"""MPQ-Freq: the frequency heuristic of the seeds (BT-MoE's baseline): bits follow routing frequency.

The exact rule, using no sensitivity at all except to break ties:

1. Every unit starts at its cheapest choice (ties: lower loss); the spare budget is
   `budget - sum_u min_c cost[u, c]`.
2. Units are visited in order of decreasing frequency (ties: lower index first). Each takes its *most
   expensive* choice whose extra cost over its cheapest fits in the spare budget (ties: lower loss), and
   the spare budget shrinks by that extra cost.

So the most frequent units get the highest bit-width while every unit after them can still afford its
cheapest choice: the budget is always met, and it is spent top-down in frequency order.
"""
from __future__ import annotations

import numpy as np

from .problem import AllocationResult, totals


def solve(loss: np.ndarray, cost: np.ndarray, budget: float, *, frequency: np.ndarray) -> AllocationResult:
    U, C = loss.shape
    frequency = np.asarray(frequency, dtype=np.float64)
    if frequency.shape != (U,) or not np.all(np.isfinite(frequency)):
        raise ValueError(f"freq needs a finite frequency array of shape ({U},), got shape {frequency.shape}")
    # per unit, choices in order of increasing cost, equal costs by decreasing loss: the last affordable
    # entry is then the most expensive choice, lowest loss among equals
    order = np.lexsort((-loss, cost), axis=1)
    extra = np.take_along_axis(cost, order, 1)
    extra -= extra[:, :1]
    cheapest = np.argmin(np.where(cost == cost.min(axis=1, keepdims=True), loss, np.inf), axis=1)
    idx = cheapest.copy()
    spare = budget - float(cost.min(axis=1).sum())
    smallest_step = extra[extra > 0].min() if np.any(extra > 0) else np.inf
    for u in np.argsort(-frequency, kind="stable"):
        k = int(np.searchsorted(extra[u], spare, side="right")) - 1
        if extra[u, k] > 0:  # k = 0 keeps the cheapest choice chosen above
            idx[u] = order[u, k]
            spare -= extra[u, k]
        if spare < smallest_step:
            break
    total_loss, total_cost = totals(loss, cost, idx)
    return AllocationResult(idx, total_loss, total_cost, budget, "freq", info={"spare": spare})
