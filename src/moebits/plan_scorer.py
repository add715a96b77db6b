"""Measured accuracy of a plan: the mean next-token NLL of the *really quantized* model on a small
held-out slice, cached per plan. The non-additive objective under which an RL search can in principle
beat a knapsack solver on the additive proxy (DMPQ's "measured" ΔAcc).

Every (unit, choice) weight is quantized once up front (`apply_plan` with one uniform plan per choice,
so GPTQ gets its Hessians as usual); scoring a plan then only copies weights and runs a forward over the
slice. The model's weights are restored by `restore()` (also on `with` exit).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from .apply import apply_plan
from .evaluate import perplexity
from .models.adapter import MoEAdapter
from .plan import Plan
from .units import Choice, Unit

ORIGINAL = -1  # a column index meaning "the unquantized weight"


class MeasuredLoss:
    def __init__(self, adapter: MoEAdapter, choices: Sequence[Choice], windows: torch.Tensor, inputs=None,
                 act_order: bool = False, batch_size: int = 8, group_inverse: np.ndarray | None = None):
        """`windows [N, T]`: the held-out token windows. `group_inverse [U]`: when given, a plan is a
        choice index per *group* and unit u takes its group's column `idx[group_inverse[u]]`."""
        if windows.ndim != 2 or windows.shape[0] == 0:
            raise ValueError(f"windows must be [N, T] with N >= 1, got {tuple(windows.shape)}")
        self.adapter, self.choices, self.batch_size = adapter, list(choices), batch_size
        self.units: list[Unit] = adapter.units()
        self.tokens, self.seqlen = windows.reshape(-1), int(windows.shape[1])
        self.inverse = None if group_inverse is None else np.asarray(group_inverse, dtype=np.int64)
        self.original = {u: adapter.weight(u).clone() for u in self.units}
        self.variants: list[dict[Unit, torch.Tensor]] = []
        for c in self.choices:
            apply_plan(adapter, Plan.uniform(self.units, adapter.shapes(), c), inputs, act_order, progress=False)
            self.variants.append({u: adapter.weight(u).clone() for u in self.units})
            self.restore()
        self.cache: dict[bytes, float] = {}
        self.measurements = 0
        self.seconds = 0.0

    def unit_index(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return idx[self.inverse] if self.inverse is not None else idx

    def __call__(self, idx: np.ndarray) -> float:
        """Mean NLL (nats per token) of the model quantized by `idx` (columns of `choices`, or ORIGINAL)."""
        unit_idx = self.unit_index(idx)
        if unit_idx.shape != (len(self.units),):
            raise ValueError(f"a plan needs one column per unit ({len(self.units)}), got shape {unit_idx.shape}")
        key = unit_idx.tobytes()
        if key in self.cache:
            return self.cache[key]
        t0 = time.perf_counter()
        for u, j in zip(self.units, unit_idx.tolist()):
            self.adapter.set_weight(u, self.original[u] if j == ORIGINAL else self.variants[j][u])
        res = perplexity(self.adapter.model, self.tokens, self.seqlen, self.batch_size, progress=False)
        self.restore()
        self.cache[key] = res.nll
        self.measurements += 1
        self.seconds += time.perf_counter() - t0
        return res.nll

    def restore(self) -> None:
        for u in self.units:
            self.adapter.set_weight(u, self.original[u])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
