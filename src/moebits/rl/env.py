"""The DMPQ allocation problem as a gymnasium environment.

A *group* is what takes one bit-width (an expert's gate/up/down together at the default expert
granularity, or one block). Columns of every matrix are the candidate choices in order of increasing
cost (2, 4, 8, 16 bits for DMPQ), so "raise" and "lower" are moves to the next and previous column.

Actions: `Discrete(2 G)`, action `2 g` lowers group g, `2 g + 1` raises it. A bit-width outside the
candidate set is impossible by construction: the column index is *clamped* to `0 .. C-1` (lowering the
cheapest or raising the most expensive choice is a no-op). The budget is a hard constraint by the same
mechanism: a raise that would push the plan over the budget is rejected (a no-op). An episode starts
from a plan within budget (the cheapest, by default), so every state the agent ever visits meets the
budget.

Reward: with the plan objective

    J(s) = w_acc * dAcc(s) - w_lat * L(s) / L_max - w_mem * M(s) / M_max - w_eng * E(s) / E_max
    dAcc(s) = -log(loss(s) / loss_hi) / log(loss_lo / loss_hi)      (0 at all-16 bits, -1 at all-2 bits)

(`acc_scale="log"`, the default; "linear" uses the loss itself). With w_acc alone and a hard budget any
increasing transform of -loss has the same best plan, and the log keeps the reward differences between
good plans, whose proxy losses differ by orders of magnitude less than the 2-bit plan's, from vanishing.

the step reward is `J(s_t) - J(s_{t-1})` (minus `noop_penalty` for a rejected or clamped move), so an
episode's return is J(last) - J(first). `loss` is the additive proxy `sum_g loss[g, c_g]` (dense reward)
or a measured, non-additive `accuracy(choice_index)` (perplexity of the really quantized model): then
J is evaluated only at the end of an episode (sparse reward, one measurement per episode).

The best plan seen (highest J, always within budget) is kept in `best_index` / `best_objective`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import numpy as np

from ..allocate.problem import fits

OBJECTIVES = ("lat", "mem", "eng")  # reward terms besides accuracy, in the order of --reward's weights


@dataclass
class GroupProblem:
    """Everything the environment needs, at group level (rows = groups, columns = choices by cost)."""

    loss: np.ndarray  # [G, C] additive proxy: frequency-weighted error summed over the group's units
    cost: np.ndarray  # [G, C] in the budget's unit; increasing along each row
    budget: float
    objectives: dict[str, np.ndarray] = field(default_factory=dict)  # "lat"/"mem"/"eng" -> [G, C]
    features: np.ndarray | None = None  # [G, F] >= 0 static statistics (f_e, c_e, s_e ...), any scale

    def __post_init__(self):
        self.loss = np.asarray(self.loss, dtype=np.float64)
        self.cost = np.asarray(self.cost, dtype=np.float64)
        G, C = self.loss.shape
        if self.cost.shape != (G, C):
            raise ValueError(f"cost has shape {self.cost.shape}, loss {self.loss.shape}")
        if C < 2:
            raise ValueError("the environment needs at least two choices per group (something to raise or lower)")
        if np.any(np.diff(self.cost, axis=1) < 0):
            raise ValueError("columns must be ordered by increasing cost in every row (raise = next column)")
        for k, m in self.objectives.items():
            if k not in OBJECTIVES:
                raise ValueError(f"unknown objective {k!r}; choose from {OBJECTIVES}")
            if np.shape(m) != (G, C):
                raise ValueError(f"objective {k} has shape {np.shape(m)}, expected {(G, C)}")
        if self.features is None:
            self.features = np.zeros((G, 0))
        self.features = np.asarray(self.features, dtype=np.float64).reshape(G, -1)
        if not fits(float(self.cost[:, 0].sum()), self.budget):
            raise ValueError(f"budget {self.budget:.6g} is below the cheapest plan ({self.cost[:, 0].sum():.6g})")

    @property
    def shape(self) -> tuple[int, int]:
        return self.loss.shape


def _unit_scale(x: np.ndarray) -> np.ndarray:
    """Columns scaled into [0, 1] by their maximum (all-zero columns stay zero)."""
    top = np.max(np.abs(x), axis=0, keepdims=True) if x.size else np.ones((1, x.shape[1]))
    return np.divide(np.abs(x), top, out=np.zeros_like(x, dtype=np.float64), where=top > 0)


def repair(idx: np.ndarray, cost: np.ndarray, budget: float, loss: np.ndarray) -> np.ndarray:
    """Lower groups one step at a time until the plan fits the budget, each time the group whose step
    down saves the most budget per unit of proxy loss added. Terminates: the cheapest plan fits (the
    callers check that first) and every step lowers one group."""
    idx = np.asarray(idx, dtype=np.int64).copy()
    r = np.arange(len(idx))
    while not fits(float(cost[r, idx].sum()), budget) and np.any(idx > 0):
        down = np.maximum(idx - 1, 0)
        saved = cost[r, idx] - cost[r, down]
        added = np.maximum(loss[r, down] - loss[r, idx], 0.0)
        score = np.where(idx > 0, saved / (added + 1e-300), -np.inf)
        g = int(np.argmax(score))
        idx[g] -= 1
    return idx


class BitAllocEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, problem: GroupProblem, weights=(1.0, 0.0, 0.0, 0.0), horizon: int | None = None,
                 accuracy: Callable[[np.ndarray], float] | None = None, start: str = "random",
                 noop_penalty: float = 1e-3, acc_scale: str = "log"):
        super().__init__()
        self.p = problem
        G, C = problem.shape
        self.G, self.C = G, C
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != (4,) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be 4 finite numbers (w_acc, w_lat, w_mem, w_eng), got {weights!r}")
        self.weights = w
        for k, wk in zip(OBJECTIVES, w[1:]):
            if wk != 0 and k not in problem.objectives:
                raise ValueError(f"reward weight w_{k} = {wk} but the problem has no {k} cost matrix")
        if isinstance(start, str):
            if start not in ("cheapest", "random"):
                raise ValueError(f"start must be 'cheapest', 'random' or a plan (column per group), got {start!r}")
        else:  # a warm start, e.g. a knapsack plan to refine under a measured objective; repaired if over budget
            plan = np.asarray(start, dtype=np.int64)
            if plan.shape != (G,) or plan.min() < 0 or plan.max() >= C:
                raise ValueError(f"a start plan needs one column in 0..{C - 1} per group ({G}), got shape {plan.shape}")
            start = repair(plan, problem.cost, problem.budget, problem.loss)
        if acc_scale not in ("log", "linear"):
            raise ValueError(f"acc_scale must be 'log' or 'linear', got {acc_scale!r}")
        self.start, self.noop_penalty, self.acc_scale = start, float(noop_penalty), acc_scale
        # enough moves to walk any group from its cheapest to its dearest choice
        self.horizon = int(horizon) if horizon is not None else (C - 1) * G
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.measured = accuracy is not None
        self._accuracy = accuracy if accuracy is not None else self._proxy_loss
        lo, hi = np.zeros(G, np.int64), np.full(G, C - 1, np.int64)
        self._acc_hi, self._acc_lo = self._accuracy(hi), self._accuracy(lo)  # loss at most / least bits
        self._obj_max = {k: float(m[:, -1].sum()) or 1.0 for k, m in problem.objectives.items()}
        self._loss_scale = _unit_scale(problem.loss.T).T if problem.loss.size else problem.loss  # per group
        self._features = _unit_scale(problem.features)
        self._budget_scale = float(problem.cost[:, -1].sum()) or 1.0
        self.action_space = gym.spaces.Discrete(2 * G)
        self._step_scale = float(np.diff(problem.cost, axis=1).max()) or 1.0
        obs_dim = G * (5 + self._features.shape[1]) + 6
        self.observation_space = gym.spaces.Box(0.0, 1.0, (obs_dim,), np.float32)
        self.best_index: np.ndarray | None = None
        self.best_objective = -np.inf
        self.evaluations = 0  # plans scored (measured mode: accuracy measurements)
        self.episodes = 0
        self.idx, self.t = lo.copy(), 0
        self._cheapest_j: float | None = None

    # -- the plan objective -----------------------------------------------------------------------
    def _proxy_loss(self, idx: np.ndarray) -> float:
        return float(self.p.loss[np.arange(self.G), idx].sum())

    def delta_acc(self, loss: float) -> float:
        """dAcc in [-1, 0]: 0 at the loss of the all-most-bits plan, -1 at the all-fewest-bits plan;
        linear in the loss, or linear in its logarithm (`acc_scale="log"`)."""
        lo, hi = self._acc_lo, self._acc_hi
        if self.acc_scale == "log":
            eps = 1e-6 * abs(lo) + 1e-300  # a 16-bit loss may be exactly 0
            span = np.log((lo + eps) / (hi + eps))
            return float(-np.log((max(loss, 0.0) + eps) / (hi + eps)) / (span if span > 0 else 1.0))
        span = lo - hi
        return float(-(loss - hi) / (span if span > 0 else 1.0))

    def costs(self, idx: np.ndarray) -> dict[str, float]:
        r = np.arange(self.G)
        out = {k: float(m[r, idx].sum()) for k, m in self.p.objectives.items()}
        out["budget"] = float(self.p.cost[r, idx].sum())
        return out

    def objective(self, idx: np.ndarray) -> float:
        """J of a plan (higher is better); one accuracy evaluation."""
        self.evaluations += 1
        acc = self.delta_acc(self._accuracy(idx))
        c = self.costs(idx)
        j = self.weights[0] * acc
        for k, wk in zip(OBJECTIVES, self.weights[1:]):
            if wk:
                j -= wk * c[k] / self._obj_max[k]
        return float(j)

    def _record(self, idx: np.ndarray, j: float) -> None:
        if j > self.best_objective and fits(self.costs(idx)["budget"], self.p.budget):
            self.best_objective, self.best_index = j, idx.copy()

    # -- gymnasium API ----------------------------------------------------------------------------
    def _obs(self) -> np.ndarray:
        """Per group: bits (as column / (C-1)), its proxy loss now (scaled by the group's largest), the
        share of the plan's proxy loss a raise would remove, the budget it would take (scaled by the largest over the
        problem), whether a raise fits, and the static statistics; then the plan's costs, budget use,
        the budget, and the time left."""
        r = np.arange(self.G)
        c = self.costs(self.idx)
        up = np.minimum(self.idx + 1, self.C - 1)
        # the share of the plan's proxy loss a raise would remove: the marginal of the log objective
        gain = (self.p.loss[r, self.idx] - self.p.loss[r, up]) / max(self._proxy_loss(self.idx), 1e-300)
        step_cost = self.p.cost[r, up] - self.p.cost[r, self.idx]
        can_up = (up > self.idx) & (c["budget"] + step_cost <= self.p.budget * (1 + 1e-12))
        glob = [min(1.0, c.get(k, 0.0) / self._obj_max.get(k, 1.0)) for k in OBJECTIVES]
        glob += [min(1.0, c["budget"] / max(self.p.budget, 1e-300)),
                 min(1.0, self.p.budget / self._budget_scale), self.t / self.horizon]
        parts = [self.idx / (self.C - 1), self._loss_scale[r, self.idx], gain, step_cost / self._step_scale,
                 can_up.astype(np.float64), self._features.reshape(-1), glob]
        return np.clip(np.concatenate(parts), 0.0, 1.0).astype(np.float32)

    def action_masks(self) -> np.ndarray:
        """`[2 G]` bool, True = the move changes the plan (for MaskablePPO): lowering needs a lower
        choice, raising a higher one that still fits the budget. Masked moves are no-ops anyway."""
        r = np.arange(self.G)
        up = np.minimum(self.idx + 1, self.C - 1)
        total = float(self.p.cost[r, self.idx].sum())
        step_cost = self.p.cost[r, up] - self.p.cost[r, self.idx]
        mask = np.empty(2 * self.G, dtype=bool)
        mask[0::2] = self.idx > 0
        mask[1::2] = (up > self.idx) & np.array([fits(total + d, self.p.budget) for d in step_cost])
        return mask

    def _random_start(self) -> np.ndarray:
        idx = self.np_random.integers(0, self.C, self.G)
        return repair(idx, self.p.cost, self.p.budget, self.p.loss)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if isinstance(self.start, np.ndarray):
            self.idx = self.start.copy()
        else:
            self.idx = np.zeros(self.G, np.int64) if self.start == "cheapest" else self._random_start()
        self.t = 0
        self.episodes += 1
        if not self.measured:
            self._j = self.objective(self.idx)
            self._record(self.idx, self._j)
        else:  # the start is scored once when it is the same every episode
            fixed = not isinstance(self.start, str) or self.start == "cheapest"
            if fixed and self._cheapest_j is not None:
                self._start_j = self._cheapest_j
            else:
                self._start_j = self.objective(self.idx)
                self._record(self.idx, self._start_j)
                if fixed:
                    self._cheapest_j = self._start_j  # the fixed start's J
        return self._obs(), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        g, up = divmod(int(action), 2)
        new = int(np.clip(self.idx[g] + (1 if up else -1), 0, self.C - 1))
        moved = new != self.idx[g]
        if moved and up:
            delta = self.p.cost[g, new] - self.p.cost[g, self.idx[g]]
            moved = fits(self.costs(self.idx)["budget"] + delta, self.p.budget)
        reward = 0.0 if moved else -self.noop_penalty
        if moved:
            self.idx[g] = new
        self.t += 1
        truncated = self.t >= self.horizon
        if not self.measured:
            if moved:
                j = self.objective(self.idx)
                reward += j - self._j
                self._j = j
                self._record(self.idx, j)
        elif truncated:  # measured: one evaluation per episode, the whole return at its end
            j = self.objective(self.idx)
            self._record(self.idx, j)
            reward += j - self._start_j
        return self._obs(), float(reward), False, truncated, {}
