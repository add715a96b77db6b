"""DMPQ (seed 004): bit allocation by reinforcement learning over a hardware cost model.

    env.py    `BitAllocEnv`, the gymnasium environment (state, raise/lower actions, reward J)
    agent.py  PPO from stable-baselines3; the best plan within budget seen is the answer

Needs the optional extra `rl` (gymnasium, stable-baselines3); import this package only when used.
"""
from .agent import SearchResult, repair, search
from .env import OBJECTIVES, BitAllocEnv, GroupProblem

__all__ = ["BitAllocEnv", "GroupProblem", "OBJECTIVES", "SearchResult", "repair", "search"]
