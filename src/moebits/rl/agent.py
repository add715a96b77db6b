"""The DMPQ agent: PPO with a small MLP policy on `BitAllocEnv`, seeded: sb3-contrib's MaskablePPO
(stable-baselines3's PPO with invalid-action masking). Without the mask, plain PPO collapsed here onto a
few state-independent raises that soon turn into no-ops, and its episode return *fell* below a random
policy's during training; masking removes those no-ops from the policy's choice.

What it returns is not the policy's last plan but the best plan seen during training and one final
greedy rollout of the trained policy: the highest objective J among visited plans, all of which meet
the budget (the environment never leaves it). Should no plan within budget have been recorded (it
cannot happen with the environment's own starts; it guards against a caller's start plan), the
result is `repair` of the cheapest plan and says so (`repaired=True`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..allocate.problem import fits
from .env import BitAllocEnv, GroupProblem, repair

DEFAULT_NET = (64, 64)


@dataclass
class SearchResult:
    choice_index: np.ndarray  # [G] column per group
    objective: float  # J of that plan (higher is better)
    feasible: bool
    repaired: bool  # True: no plan within budget was seen; the cheapest plan was repaired instead
    steps: int
    episodes: int
    evaluations: int  # plans scored (in measured mode: accuracy measurements)
    seconds: float
    info: dict = field(default_factory=dict)


def _start_name(start) -> str:
    return start if isinstance(start, str) else "plan"


def random_search(problem: GroupProblem, weights=(1.0, 0.0, 0.0, 0.0), steps: int = 20_000, seed: int = 0,
                  horizon: int | None = None, accuracy: Callable[[np.ndarray], float] | None = None,
                  start="random", acc_scale: str = "log") -> SearchResult:
    """The ablation of the agent: the same environment and steps, uniformly random valid moves, no learning.
    What the agent adds over exploration alone is the difference of the two."""
    t0 = time.perf_counter()
    env = BitAllocEnv(problem, weights, horizon=horizon, accuracy=accuracy, start=start, acc_scale=acc_scale)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    for _ in range(int(steps)):
        valid = np.flatnonzero(env.action_masks())
        action = int(rng.choice(valid)) if len(valid) else 0
        _, _, term, trunc, _ = env.step(action)
        if term or trunc:
            env.reset()
    idx = env.best_index
    feasible = idx is not None
    return SearchResult(idx, float(env.best_objective), feasible, False, int(steps), env.episodes, env.evaluations,
                        time.perf_counter() - t0, {"horizon": env.horizon, "start": _start_name(start),
                                                    "policy": "random"})


def search(problem: GroupProblem, weights=(1.0, 0.0, 0.0, 0.0), steps: int = 20_000, seed: int = 0,
           horizon: int | None = None, accuracy: Callable[[np.ndarray], float] | None = None,
           start="random", net_arch=DEFAULT_NET, n_steps: int = 256,
           learning_rate: float = 1e-3, ent_coef: float = 0.0, acc_scale: str = "log") -> SearchResult:
    """Train PPO for `steps` environment steps; return the best plan within budget that was seen."""
    try:
        import torch
        from sb3_contrib import MaskablePPO
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the rl method needs the optional extra: pip install 'moebits[rl]' "
                          f"(gymnasium, stable-baselines3, sb3-contrib): {e}") from None
    if steps < 1:
        raise ValueError(f"--rl-steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    env = BitAllocEnv(problem, weights, horizon=horizon, accuracy=accuracy, start=start, acc_scale=acc_scale)
    n_steps = int(min(n_steps, max(steps, 2)))
    batch = int(min(64, n_steps))
    threads = torch.get_num_threads()
    # gamma = 1: the return of an episode is J(end) - J(start), the quantity the search is after
    model = MaskablePPO("MlpPolicy", env, learning_rate=learning_rate, n_steps=n_steps, batch_size=batch,
                        n_epochs=10, gamma=1.0, gae_lambda=0.95, ent_coef=ent_coef, seed=seed, device="cpu",
                        verbose=0, policy_kwargs={"net_arch": list(net_arch)})
    model.learn(total_timesteps=int(steps))
    torch.set_num_threads(threads)  # SB3 may change it; the caller's setting wins
    # one greedy rollout of the trained policy: its end plan is a candidate like any other visited plan
    obs, _ = env.reset(seed=seed)
    for _ in range(env.horizon):
        action, _ = model.predict(obs, deterministic=True, action_masks=env.action_masks())
        obs, _, term, trunc, _ = env.step(int(action))
        if term or trunc:
            break
    repaired = env.best_index is None
    if repaired:
        idx = repair(np.zeros(env.G, np.int64), problem.cost, problem.budget, problem.loss)
        best_j = env.objective(idx)
    else:
        idx, best_j = env.best_index, env.best_objective
    feasible = fits(float(problem.cost[np.arange(env.G), idx].sum()), problem.budget)
    return SearchResult(idx, float(best_j), feasible, repaired, int(steps), env.episodes, env.evaluations,
                        time.perf_counter() - t0, {"horizon": env.horizon, "n_steps": n_steps,
                                                    "start": _start_name(start),
                                                    "weights": list(map(float, env.weights))})
