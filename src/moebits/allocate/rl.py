"""The `rl` solver (DMPQ): PPO over raise/lower moves of one group's bit-width, with the allocation
contract of every solver. Imports gymnasium / stable-baselines3 only when called (optional extra `rl`).

Columns are reordered by increasing cost so that "raise" is the next dearer choice. Besides the
frequency-weighted loss and the budget's cost it takes, as options (already reduced to groups by
`allocate`): `objectives` {"lat", "mem", "eng"} -> [G, C] for the reward's cost terms, `features`
[G, F] (f, c, s statistics) for the state, `weights` (w_acc, w_lat, w_mem, w_eng), `steps`, `seed`,
`accuracy` (a measured, non-additive loss of a plan; None = the additive proxy `loss`), and `start`
("random", "cheapest", or a plan [G] of columns to start every episode from, e.g. a knapsack's).
"""
from __future__ import annotations

import numpy as np

from .problem import AllocationResult, totals


def solve(loss: np.ndarray, cost: np.ndarray, budget: float, *, steps: int = 20_000,
          weights=(1.0, 0.0, 0.0, 0.0), objectives: dict | None = None, features: np.ndarray | None = None,
          seed: int = 0, horizon: int | None = None, accuracy=None, start="random") -> AllocationResult:
    try:
        from ..rl import GroupProblem, search
    except ImportError as e:  # a ValueError, so the CLI prints one line instead of a traceback
        raise ValueError(f"the rl solver needs the optional extra: pip install 'moebits[rl]' "
                         f"(gymnasium, stable-baselines3, sb3-contrib); {e}") from None

    order = np.argsort(cost.mean(axis=0), kind="stable")  # columns by increasing cost
    objectives = {k: np.asarray(m, dtype=np.float64)[:, order] for k, m in (objectives or {}).items()}
    acc = None
    if accuracy is not None:  # the measured loss reads columns of the caller's order
        def acc(idx, _f=accuracy):
            return _f(order[idx])
    if not isinstance(start, str):  # a warm-start plan in the caller's columns
        start = np.argsort(order)[np.asarray(start, dtype=np.int64)]
    problem = GroupProblem(loss[:, order], cost[:, order], budget, objectives, features)
    res = search(problem, weights, steps=steps, seed=seed, horizon=horizon, accuracy=acc, start=start)
    idx = order[res.choice_index]
    total_loss, total_cost = totals(loss, cost, idx)
    info = {"objective": res.objective, "repaired": res.repaired, "episodes": res.episodes,
            "evaluations": res.evaluations, "steps": res.steps, "search_seconds": res.seconds, **res.info}
    return AllocationResult(idx, total_loss, total_cost, budget, "rl", info=info)
