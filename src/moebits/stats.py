"""Per-unit facts gathered by calibration (`calibrate.py`): what FRI uses as features and what the
allocator uses as frequency weights.

`CalibrationStats` holds them as columns (`stats.frequency`, `stats.act_var`, ... each `[U]`) aligned with
`stats.units`; `stats[unit]` gives one unit's row as a `UnitStats`, and `stats.aligned(units)` reorders
the columns to another unit order (a table's), refusing units it does not know. Saved as readable JSON,
one object per unit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .units import KINDS, Unit


@dataclass
class UnitStats:
    """One unit's row."""
    unit: Unit
    out_features: int  # N in the GEMM (tokens x K) @ (K x N)
    in_features: int  # K
    tokens: int  # routed calibration tokens (all tokens for a shared expert)
    frequency: float  # f_u = tokens / calibration tokens (1.0 for a shared expert)
    routing_mass: float  # sum of routing weights over the routed tokens (tokens for shared experts)
    # statistics of the unit's *input* activations (hidden states for gate/up, act(gate)*up for down)
    act_var: float
    act_mean_abs: float
    act_outlier_ratio: float  # fraction of |a| > OUTLIER_TAU * rms of the layer input
    act_kurtosis: float
    # statistics of the weight itself
    weight_scale: float  # mean |w|
    weight_max_over_mean: float  # max |w| / mean |w|
    num_layers: int = 0  # depth of the model, so depth features can be normalised
    never_routed: bool = False  # no calibration token was routed here: fallback tokens were used

    @property
    def depth(self) -> float:
        """Relative depth in [0, 1]."""
        return self.unit.layer / max(1, self.num_layers - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unit"] = self.unit.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UnitStats":
        d = dict(d)
        d["unit"] = Unit.parse(d["unit"])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


COLUMNS = [f.name for f in fields(UnitStats) if f.name not in ("unit", "num_layers")]
_INT_COLUMNS = ("out_features", "in_features", "tokens")


class CalibrationStats:
    """Columns `[U]` of every `UnitStats` field, aligned with `units`, plus the calibration's totals."""

    def __init__(self, units: Sequence[Unit], columns: dict[str, np.ndarray], num_layers: int, total_tokens: int):
        self.units = list(units)
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"calibration stats lack columns {missing}")
        for name in COLUMNS:
            col = np.asarray(columns[name])
            if col.shape != (len(self.units),):
                raise ValueError(f"stats column {name!r} has shape {col.shape}, expected ({len(self.units)},)")
            dtype = np.int64 if name in _INT_COLUMNS else bool if name == "never_routed" else np.float64
            setattr(self, name, col.astype(dtype))
        self.num_layers, self.total_tokens = int(num_layers), int(total_tokens)
        self._index = {u: i for i, u in enumerate(self.units)}

    # typed attributes, set from `columns` above
    out_features: np.ndarray
    in_features: np.ndarray
    tokens: np.ndarray
    frequency: np.ndarray
    routing_mass: np.ndarray
    act_var: np.ndarray
    act_mean_abs: np.ndarray
    act_outlier_ratio: np.ndarray
    act_kurtosis: np.ndarray
    weight_scale: np.ndarray
    weight_max_over_mean: np.ndarray
    never_routed: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[UnitStats], total_tokens: int = 0) -> "CalibrationStats":
        if not rows:
            raise ValueError("no unit statistics")
        cols = {c: np.array([getattr(r, c) for r in rows]) for c in COLUMNS}
        return cls([r.unit for r in rows], cols, max(r.num_layers for r in rows), total_tokens)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[UnitStats]:
        return (self.row(i) for i in range(len(self.units)))

    def __contains__(self, unit: Unit) -> bool:
        return unit in self._index

    def __getitem__(self, key: Unit | int) -> UnitStats:
        """A row by unit, or by position."""
        return self.row(self.index(key) if isinstance(key, Unit) else int(key))

    def __eq__(self, other) -> bool:
        return (isinstance(other, CalibrationStats) and self.units == other.units
                and (self.num_layers, self.total_tokens) == (other.num_layers, other.total_tokens)
                and all(np.array_equal(getattr(self, c), getattr(other, c)) for c in COLUMNS))

    def index(self, unit: Unit) -> int:
        try:
            return self._index[unit]
        except KeyError:
            raise KeyError(f"no calibration statistics for {unit.name}") from None

    def row(self, i: int) -> UnitStats:
        vals = {c: getattr(self, c)[i].item() for c in COLUMNS}
        return UnitStats(unit=self.units[i], num_layers=self.num_layers, **vals)

    def aligned(self, units: Sequence[Unit]) -> "CalibrationStats":
        """The same statistics in the order of `units` (e.g. a table's rows)."""
        units = list(units)
        if units == self.units:
            return self
        missing = [u.name for u in units if u not in self._index]
        if missing:
            raise ValueError(f"no calibration stats for {len(missing)} units, e.g. {missing[:3]}")
        idx = np.array([self._index[u] for u in units], dtype=np.int64)
        return CalibrationStats(units, {c: getattr(self, c)[idx] for c in COLUMNS}, self.num_layers,
                                self.total_tokens)

    @property
    def depth(self) -> np.ndarray:
        """[U] relative depth in [0, 1]."""
        return np.array([u.layer for u in self.units], float) / max(1, self.num_layers - 1)

    @property
    def kind_index(self) -> np.ndarray:
        return np.array([KINDS.index(u.kind) for u in self.units], float)

    @property
    def is_shared(self) -> np.ndarray:
        return np.array([u.is_shared for u in self.units])

    # -- io: {"meta": {...}, "units": [one object per unit]} ----------------------------------------
    def save(self, path: str | Path, meta: dict | None = None) -> None:
        from .atomic import atomic_write_text

        payload = {"meta": {"total_tokens": self.total_tokens, **(meta or {})},
                   "units": [r.to_dict() for r in self]}
        atomic_write_text(path, json.dumps(payload, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> tuple["CalibrationStats", dict]:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
            meta = payload.get("meta", {})
            rows = [UnitStats.from_dict(d) for d in payload["units"]]
            return cls.from_rows(rows, int(meta.get("total_tokens", 0))), meta
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a moebits calibration statistics file ({e})") from None
