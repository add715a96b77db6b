"""Per-unit facts gathered by calibration (`calibrate.py`): what FRI uses as features and what the
allocator uses as frequency weights. Plain data, saved as JSON in the run directory."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .units import Unit


@dataclass
class UnitStats:
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

    def flops(self, tokens: int | None = None) -> int:
        m = self.tokens if tokens is None else tokens
        return 2 * m * self.in_features * self.out_features

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


def save_stats(stats: list[UnitStats], path: str | Path, meta: dict | None = None) -> None:
    from .run import atomic_write_text

    payload = {"meta": meta or {}, "units": [s.to_dict() for s in stats]}
    atomic_write_text(path, json.dumps(payload, indent=1))


def load_stats(path: str | Path) -> tuple[list[UnitStats], dict]:
    payload = json.loads(Path(path).read_text())
    return [UnitStats.from_dict(d) for d in payload["units"]], payload.get("meta", {})
