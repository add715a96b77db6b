"""SensitivityTable: error l_u(c) for every unit x choice -- measured, predicted, or missing (NaN).

`error[u, c]` is the *intrinsic* error of unit u under choice c: mean squared layer-output error per
routed token, with the routing weight applied (see profile.py). The allocator multiplies it by the
frequency `frequency[u]`, kept separately because FRI interpolates the former, not the product.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .units import Choice, Unit

CSV_COLUMNS = ["layer", "expert", "kind", "bits", "group_size", "quantizer", "error", "frequency", "seconds", "measured", "rank", "act_bits"]
OPTIONAL_COLUMNS = ("rank", "act_bits")  # absent in older tables: 0 and 16


@dataclass
class SensitivityTable:
    units: list[Unit]
    choices: list[Choice]
    error: np.ndarray = field(default=None)  # [U, C] float64, NaN = unknown
    measured: np.ndarray = field(default=None)  # [U, C] bool: True = profiled, False = predicted/unknown
    seconds: np.ndarray = field(default=None)  # [U, C] seconds each measurement took (0 if not measured)
    frequency: np.ndarray = field(default=None)  # [U] routed-token frequency f_u

    def __post_init__(self):
        U, C = len(self.units), len(self.choices)
        if self.error is None:
            self.error = np.full((U, C), np.nan)
        if self.measured is None:
            self.measured = np.zeros((U, C), dtype=bool)
        if self.seconds is None:
            self.seconds = np.zeros((U, C))
        if self.frequency is None:
            self.frequency = np.zeros(U)
        for name, shape in (("error", (U, C)), ("measured", (U, C)), ("seconds", (U, C)), ("frequency", (U,))):
            if getattr(self, name).shape != shape:
                raise ValueError(f"SensitivityTable.{name} has shape {getattr(self, name).shape}, expected {shape}")
        self._unit_index = {u: i for i, u in enumerate(self.units)}
        self._choice_index = {c: j for j, c in enumerate(self.choices)}

    def unit_index(self, unit: Unit) -> int:
        return self._unit_index[unit]

    def choice_index(self, choice: Choice) -> int:
        return self._choice_index[choice]

    def set(self, unit: Unit, choice: Choice, error: float, seconds: float = 0.0, measured: bool = True) -> None:
        i, j = self._unit_index[unit], self._choice_index[choice]
        self.error[i, j] = error
        self.seconds[i, j] = seconds
        self.measured[i, j] = measured

    @property
    def loss(self) -> np.ndarray:
        """`[U, C]` what the allocator minimises: `f_u * l_u(c)`, the error weighted by routed frequency."""
        return self.frequency[:, None] * self.error

    @classmethod
    def unprofiled(cls, units: list[Unit], choices: list[Choice], frequency: np.ndarray) -> "SensitivityTable":
        """A table for methods that use no sensitivity (uniform, freq): zero error, known frequencies."""
        U, C = len(units), len(choices)
        return cls(list(units), list(choices), error=np.zeros((U, C)), frequency=np.asarray(frequency, float).copy())

    @property
    def complete(self) -> bool:
        return bool(np.isfinite(self.error).all())

    @property
    def measured_seconds(self) -> float:
        return float(self.seconds[self.measured].sum())

    def to_csv(self, path: str | Path) -> None:
        from .atomic import atomic_write_text
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        for i, u in enumerate(self.units):
            for j, c in enumerate(self.choices):
                err = self.error[i, j]
                w.writerow([u.layer, u.expert, u.kind, c.bits, c.group_size, c.quantizer,
                            "" if math.isnan(err) else repr(float(err)), repr(float(self.frequency[i])),
                            f"{self.seconds[i, j]:.6f}", int(self.measured[i, j]), c.rank, c.act_bits])
        atomic_write_text(path, buf.getvalue())

    @classmethod
    def from_csv(cls, path: str | Path) -> "SensitivityTable":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"sensitivity table not found: {path}")
        rows = list(csv.DictReader(path.open()))
        missing = [c for c in CSV_COLUMNS if c not in OPTIONAL_COLUMNS and rows and c not in rows[0]]
        if not rows or missing:
            raise ValueError(f"{path} is not a moebits sensitivity table (missing columns: {missing or 'all rows'})")
        units: dict[Unit, int] = {}
        choices: dict[Choice, int] = {}
        parsed = []
        for n, r in enumerate(rows, start=2):
            try:
                expert = r["expert"] if r["expert"] == "shared" else int(r["expert"])
                u = Unit(int(r["layer"]), expert, r["kind"])
                c = Choice(int(r["bits"]), int(r["group_size"]), r["quantizer"], int(r.get("rank") or 0),
                           int(r.get("act_bits") or 16))
                err = float(r["error"]) if r["error"] != "" else math.nan
                parsed.append((units.setdefault(u, len(units)), choices.setdefault(c, len(choices)), err,
                               float(r["frequency"]), float(r["seconds"]), bool(int(r["measured"]))))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {n}: cannot parse row {dict(list(r.items())[:6])}... ({e}): the table "
                                 "is truncated or damaged; profile again (`moebits profile`)") from None
        if len(parsed) != len(units) * len(choices) or len(set((i, j) for i, j, *_ in parsed)) != len(parsed):
            raise ValueError(f"{path} has {len(parsed)} rows, a table of {len(units)} units x {len(choices)} choices "
                             f"has {len(units) * len(choices)} (one per pair): it is truncated or damaged; profile "
                             "again (`moebits profile`)")
        t = cls(list(units), list(choices))
        for i, j, err, f, s, m in parsed:
            t.error[i, j], t.frequency[i], t.seconds[i, j], t.measured[i, j] = err, f, s, m
        return t
