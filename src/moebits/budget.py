"""The budget a plan must fit: what the user asked for (`--bits`, `--memory-gb` or `--latency`) as a
`[U, C]` cost matrix and a total in the same unit, so that an allocator needs nothing else.

This is the one place where "exactly one budget" is checked (`budget_request`) and where the feasible
range of a budget is checked before any expensive stage runs (`Budget.check_feasible`).

    kind      value                           cost[u, c]                          total
    bits      average storage bits per weight exact storage bits                  value x weights
    memory    GB of unit weights              exact storage bits                  value in bits
    latency   seconds per forward of the units roofline (--gpu) or latency-FRI    value

A second, optional constraint bounds the average *activation* bits (`--bits 5 --abits-set 4,5,8 ...
--abits-budget 5`: the paper's W5A5), as `Budget.act`: `sum_u w_u a(c_u) <= A * sum_u w_u` with
`w_u = f_u * out_u * in_u`, the unit's multiply-accumulates per token of the forward (routed frequency
times its GEMM size). So "A5" means: the MACs of a forward run at 5 activation bits on average. Not per
unit, because a per-unit average lets the allocator buy 8-bit activations for the hot experts with
4-bit ones on experts that almost never run, meeting "A5" while nearly all compute runs at 8 bits;
and not per stored weight for the same reason (activations are not stored: their cost is per token).
Only the exact ILP takes this second row (see allocate/__init__.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import cost as costs
from .units import DEFAULT_ZERO_POINTS, Choice, Unit, check_zero_points

log = logging.getLogger(__name__)

KINDS = ("bits", "memory", "latency")
LATENCY_MODELS = ("roofline", "latency-fri")
ONE_BUDGET = "give exactly one budget: --bits (average storage bits per weight, e.g. 3.25), --memory-gb or --latency"


def check_budget_value(name: str, value: float | None) -> None:
    """A budget must be a positive finite number (nan / inf / <= 0 are refused by name)."""
    import math

    if value is None:
        return
    flag = {"bits": "--bits", "memory": "--memory-gb", "memory_gb": "--memory-gb", "latency": "--latency"}.get(name, name)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} must be a positive finite number, got {value!r}")


def budget_request(bits: float | None = None, memory_gb: float | None = None,
                   latency: float | None = None) -> tuple[str, float]:
    """`(kind, value)` of the single budget given; a clear error when none or several are."""
    for name, v in zip(KINDS, (bits, memory_gb, latency)):
        check_budget_value(name, v)
    given = [(k, v) for k, v in zip(KINDS, (bits, memory_gb, latency)) if v is not None]
    if len(given) != 1:
        raise ValueError(ONE_BUDGET)
    return given[0][0], float(given[0][1])


@dataclass
class ActBitsBudget:
    """The average-activation-bits constraint: `cost [U, C] = w_u * act_bits(c)` <= `total`."""
    value: float  # average activation bits asked for (MAC-weighted, see the module docstring)
    cost: np.ndarray  # [U, C]
    total: float
    weights: np.ndarray  # [U] w_u = f_u * out * in

    @classmethod
    def build(cls, value: float, shapes: Sequence[tuple[int, int]], choices: Sequence[Choice],
              frequency: np.ndarray) -> "ActBitsBudget":
        s = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
        w = np.asarray(frequency, dtype=np.float64) * s[:, 0] * s[:, 1]
        act = np.array([c.act_bits for c in choices], dtype=np.float64)
        b = cls(float(value), w[:, None] * act[None, :], float(value) * float(w.sum()), w)
        if w.sum() > 0 and act.min() > value:
            from .allocate import InfeasibleBudgetError

            n = float(w.sum())
            raise InfeasibleBudgetError(b.total, n * act.min(), n * act.max(),
                                        lambda c: f"{c / n:.3f} average activation bits", what="activation bits")
        return b

    def average(self, choice_index: np.ndarray) -> float:
        """The MAC-weighted average activation bits of a plan (its column per unit)."""
        used = self.cost[np.arange(len(choice_index)), choice_index].sum()
        return float(used / self.weights.sum()) if self.weights.sum() > 0 else float("nan")


def act_bits_average(plan_choices: Sequence[Choice], shapes: Sequence[tuple[int, int]], frequency) -> float:
    """MAC-weighted average activation bits of a plan's choices (16 where activations are not quantized)."""
    s = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    w = np.asarray(frequency, dtype=np.float64) * s[:, 0] * s[:, 1]
    a = np.array([c.act_bits for c in plan_choices], dtype=np.float64)
    return float((w * a).sum() / w.sum()) if w.sum() > 0 else float("nan")


@dataclass
class Budget:
    kind: str  # bits | memory | latency
    value: float  # as the user gave it (avg bits, GB, seconds)
    cost: np.ndarray  # [U, C] in the budget's unit
    total: float  # the budget in the same unit as `cost`
    units: list[Unit]  # rows of `cost`
    shapes: dict[Unit, tuple[int, int]]  # (out, in) of every unit, for average bits
    describe: Callable[[float], str] | None = field(default=None, repr=False)  # cost -> words, for errors
    act: ActBitsBudget | None = None  # optional second constraint: average activation bits
    zero_points: str = DEFAULT_ZERO_POINTS  # how zero points are stored, hence charged (units.ZERO_POINTS)

    def with_act_bits(self, value: float, choices: Sequence[Choice], frequency: np.ndarray) -> "Budget":
        """This budget with the average-activation-bits row added (needs the routed frequencies)."""
        if frequency is None:
            raise ValueError("an activation-bits budget weights units by routed frequency: calibrate first")
        self.act = ActBitsBudget.build(value, [self.shapes[u] for u in self.units], choices, frequency)
        return self

    @classmethod
    def build(cls, kind: str, value: float, units: Sequence[Unit], shapes: dict[Unit, tuple[int, int]],
              choices: Sequence[Choice], frequency: np.ndarray | None = None, *, gpu: str = "h100",
              batch_tokens: int = 4096, latency_model: str = "roofline", seed: int = 0,
              device: str = "cpu", zero_points: str = DEFAULT_ZERO_POINTS) -> "Budget":
        """The budget `kind` = `value` over `units` (rows) x `choices` (columns). `frequency` [U]
        (routed-token frequency per unit) is needed by latency budgets only. `zero_points` says how zero
        points are stored ("packed" | "fp16"), so what a choice costs."""
        units = list(units)
        shape_list = [shapes[u] for u in units]
        zp = check_zero_points(zero_points)
        if kind in ("bits", "memory"):
            storage = costs.storage_matrix(shape_list, choices, zp)
            if kind == "bits":
                return cls(kind, value, storage, costs.avg_bits_to_total_bits(value, shape_list), units, shapes,
                           costs.avg_bits_formatter(shape_list), zero_points=zp)
            return cls(kind, value, storage, costs.gb_to_bits(value), units, shapes,
                       lambda c: f"{costs.bits_to_gb(c):.6g} GB", zero_points=zp)
        if kind != "latency":
            raise ValueError(f"unknown budget kind {kind!r}; choose one of {KINDS}")
        if frequency is None:
            raise ValueError("a latency budget needs the routed-token frequency of every unit (calibrate first)")
        if latency_model == "latency-fri":
            from .latency import latency_fri_matrix

            lat, info = latency_fri_matrix(shape_list, frequency, choices, batch_tokens, seed=seed, device=device)
            log.info("latency FRI: %s", {k: v for k, v in info.items() if not isinstance(v, (list, dict))})
        elif latency_model == "roofline":
            lat = costs.latency_matrix(shape_list, frequency, choices, gpu, batch_tokens, zero_points=zp)
        else:
            raise ValueError(f"unknown latency model {latency_model!r}; choose one of {LATENCY_MODELS}")
        return cls(kind, value, lat, value, units, shapes, lambda c: f"{c * 1e3:.6g} ms", zero_points=zp)

    def check_feasible(self, solver: str, groups: np.ndarray | None = None) -> None:
        """Raise InfeasibleBudgetError (with the feasible range) when `solver` can find no plan."""
        from .allocate import check_budget

        check_budget(self.cost, self.total, solver, groups, self.describe)

    def as_meta(self) -> dict:
        return {self.kind: self.value, **({"act_bits": self.act.value} if self.act is not None else {})}
