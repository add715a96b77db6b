"""Plan: which choice each unit gets, why (its predicted loss and cost), and the totals.

Saved as JSON a person can read and diff: one line per unit, sorted by layer, expert, kind.

A plan records how its zero points are stored (`zero_points`, units.ZERO_POINTS), since that decides what
each choice costs and how the packed writer stores it. Plans written before the setting existed have no
such field and were costed with fp16 zeros: they load as "fp16".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .units import DEFAULT_ZERO_POINTS, Choice, Unit, check_zero_points

LEGACY_ZERO_POINTS = "fp16"  # what a plan.json without "zero_points" was costed with


class PlanError(ValueError):
    pass


@dataclass
class Assignment:
    choice: Choice
    loss: float | None = None  # f_u * l_u(c): the weighted error the allocator saw (None if not known)
    cost: float | None = None  # C_u(c) in the budget's unit (bits, bytes, seconds)


@dataclass
class Plan:
    assignments: dict[Unit, Assignment]
    meta: dict = field(default_factory=dict)  # method, budget, solver, totals, ...
    zero_points: str = DEFAULT_ZERO_POINTS  # how zero points are stored and charged: "packed" | "fp16"

    def __post_init__(self):
        check_zero_points(self.zero_points)

    def choice(self, unit: Unit) -> Choice:
        return self.assignments[unit].choice

    @property
    def units(self) -> list[Unit]:
        return sorted(self.assignments, key=Unit.sort_key)

    @classmethod
    def uniform(cls, units, shapes: dict[Unit, tuple[int, int]], choice: Choice, meta: dict | None = None,
                zero_points: str = DEFAULT_ZERO_POINTS) -> "Plan":
        a = {u: Assignment(choice, None, float(choice.storage_bits(*shapes[u], zero_points))) for u in units}
        return cls(a, dict(meta or {}), zero_points)

    def storage_bits(self, shapes: dict[Unit, tuple[int, int]]) -> int:
        """Bits the units take, zero points stored as this plan's `zero_points` says."""
        return sum(a.choice.storage_bits(*shapes[u], self.zero_points) for u, a in self.assignments.items())

    def avg_bits(self, shapes: dict[Unit, tuple[int, int]]) -> float:
        n = sum(shapes[u][0] * shapes[u][1] for u in self.assignments)
        return self.storage_bits(shapes) / n

    def bits_histogram(self) -> dict[str, int]:
        h: dict[str, int] = {}
        for a in self.assignments.values():
            h[a.choice.label] = h.get(a.choice.label, 0) + 1
        return dict(sorted(h.items()))

    def to_dict(self) -> dict:
        return {
            "format": "moebits.plan/1",
            "zero_points": self.zero_points,
            "meta": self.meta,
            "units": {
                u.name: {**self.assignments[u].choice.to_dict(), "loss": self.assignments[u].loss, "cost": self.assignments[u].cost}
                for u in self.units
            },
        }

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_text

        d = self.to_dict()
        # one unit per line: readable and diffable
        lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d["units"].items())
        text = (f'{{\n"format": "moebits.plan/1",\n"zero_points": {json.dumps(self.zero_points)},\n"meta": {json.dumps(d["meta"], indent=1)},\n"units": {{\n{lines}\n}}\n}}\n')
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"plan not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON ({e}); regenerate it with `moebits allocate` or `moebits quantize`") from None
        if not isinstance(d, dict) or d.get("format") != "moebits.plan/1" or not isinstance(d.get("units"), dict):
            raise PlanError(f"{path} is not a moebits plan (expected \"format\": \"moebits.plan/1\" and a \"units\" map)")
        assignments = {}
        for name, v in d["units"].items():
            try:
                assignments[Unit.parse(name)] = Assignment(Choice.from_dict(v), v.get("loss"), v.get("cost"))
            except (ValueError, KeyError, TypeError) as e:
                raise PlanError(f"{path}: bad entry for {name!r}: {e}") from None
        zp = d.get("zero_points", LEGACY_ZERO_POINTS)
        try:
            check_zero_points(zp)
        except ValueError as e:
            raise PlanError(f"{path}: {e}") from None
        return cls(assignments, d.get("meta", {}), zp)

    def check_covers(self, units) -> None:
        """A plan must name every unit of the model, and no unit the model does not have."""
        want, have = set(units), set(self.assignments)
        if want != have:
            miss, extra = sorted(want - have, key=Unit.sort_key), sorted(have - want, key=Unit.sort_key)
            raise PlanError(
                f"plan does not match the model: {len(miss)} unit(s) missing (e.g. {[u.name for u in miss[:3]]}), "
                f"{len(extra)} unknown (e.g. {[u.name for u in extra[:3]]})"
            )


def check_loaded_plan(plan: Plan, path: str | Path, units, choices, budget=None, groups=None) -> None:
    """A plan read back from disk (a resumed run) must be one the run could have made: every unit of the
    model and no other, each at one of the run's candidate choices, the structure constraints (units of a
    group share a choice) and the budget (and the activation-bits budget) met. Raises PlanError naming the
    file and saying how to recompute it."""
    import numpy as np

    fix = f"delete {path} to allocate again (or restore it)"
    try:
        plan.check_covers(units)
    except PlanError as e:
        raise PlanError(f"{path}: {e}; {fix}") from None
    units = list(units)
    index = {c: j for j, c in enumerate(choices)}
    cols = np.empty(len(units), dtype=np.int64)
    for i, u in enumerate(units):
        c = plan.choice(u)
        if c not in index:
            raise PlanError(f"{path}: unit {u.name} is at {c.label}, which is not one of this run's candidate choices "
                            f"({', '.join(sorted({x.label for x in choices}))}); {fix}")
        cols[i] = index[c]
    if groups is not None:
        g = np.asarray(groups)
        for gid in np.unique(g):
            members = np.flatnonzero(g == gid)
            if len(set(cols[members].tolist())) > 1:
                raise PlanError(f"{path}: units {units[members[0]].name} and "
                                f"{units[members[np.flatnonzero(cols[members] != cols[members[0]])[0]]].name} must share "
                                f"one choice (granularity / --tie-gate-up / --target) but do not; {fix}")
    if budget is None:
        return
    rows = [budget.units.index(u) for u in units] if list(budget.units) != units else list(range(len(units)))
    used = float(budget.cost[rows, cols].sum())
    if not used <= budget.total * (1 + 1e-9) + 1e-12:
        say = budget.describe or (lambda c: f"{c:.6g}")
        raise PlanError(f"{path}: the plan costs {say(used)}, over the run's {budget.kind} budget {say(budget.total)}; "
                        f"{fix}")
    if budget.act is not None:
        by_row = np.empty_like(cols)
        by_row[rows] = cols
        act = budget.act.average(by_row)
        if not act <= budget.act.value * (1 + 1e-9) + 1e-12:
            raise PlanError(f"{path}: the plan's average activation bits {act:.4f} exceed the run's budget "
                            f"{budget.act.value}; {fix}")
