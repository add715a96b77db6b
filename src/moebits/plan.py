"""Plan: which choice each unit gets, why (its predicted loss and cost), and the totals.

Saved as JSON a person can read and diff: one line per unit, sorted by layer, expert, kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .units import Choice, Unit


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

    def choice(self, unit: Unit) -> Choice:
        return self.assignments[unit].choice

    @property
    def units(self) -> list[Unit]:
        return sorted(self.assignments, key=Unit.sort_key)

    @classmethod
    def uniform(cls, units, shapes: dict[Unit, tuple[int, int]], choice: Choice, meta: dict | None = None) -> "Plan":
        a = {u: Assignment(choice, None, float(choice.storage_bits(*shapes[u]))) for u in units}
        return cls(a, dict(meta or {}))

    def storage_bits(self, shapes: dict[Unit, tuple[int, int]]) -> int:
        return sum(a.choice.storage_bits(*shapes[u]) for u, a in self.assignments.items())

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
            "meta": self.meta,
            "units": {
                u.name: {**self.assignments[u].choice.to_dict(), "loss": self.assignments[u].loss, "cost": self.assignments[u].cost}
                for u in self.units
            },
        }

    def save(self, path: str | Path) -> None:
        from .run import atomic_write_text

        d = self.to_dict()
        # one unit per line: readable and diffable
        lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d["units"].items())
        text = f'{{\n"format": "moebits.plan/1",\n"meta": {json.dumps(d["meta"], indent=1)},\n"units": {{\n{lines}\n}}\n}}\n'
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
        return cls(assignments, d.get("meta", {}))

    def check_covers(self, units) -> None:
        """A plan must name every unit of the model, and no unit the model does not have."""
        want, have = set(units), set(self.assignments)
        if want != have:
            miss, extra = sorted(want - have, key=Unit.sort_key), sorted(have - want, key=Unit.sort_key)
            raise PlanError(
                f"plan does not match the model: {len(miss)} unit(s) missing (e.g. {[u.name for u in miss[:3]]}), "
                f"{len(extra)} unknown (e.g. {[u.name for u in extra[:3]]})"
            )
