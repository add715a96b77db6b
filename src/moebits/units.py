"""The decision variables (Unit) and their candidate values (Choice), with exact storage costs.

A *unit* is one quantizable weight matrix of one expert: `(layer, expert, kind)`, kind in
gate/up/down, expert an index or "shared". A *choice* is one setting for a unit: bit-width, group
size, quantizer, (BT-MoE) the rank of a low-rank compensator, and the bit-width its *input
activations* are fake-quantized to at run time (`act_bits`, 16 = not quantized; see quant/act.py).
Activation bits change what the unit computes and costs in time, never what it stores.

Storage is counted as it is stored: `bits` per code, a 16-bit scale and one zero point per group of
`group_size` input columns in every output row (a last, partial group still pays full metadata), and
a rank-r compensator as two 16-bit factors `U [out, r]`, `V [r, in]`; 16 bits means "kept in 16-bit
floats". How a zero point is stored is a run-wide setting, `zero_points` (ZERO_POINTS):

    "packed" (default)  a quantizer whose zeros are integer codes (rtn, gptq: INTEGER_ZERO_QUANTIZERS)
                        stores them at the code width, as GPTQ, AWQ and compressed-tensors do: 3-bit g128
                        = 3 + 16/128 + 3/128 = 3.1484 bits per weight. HQQ's real-valued zeros stay fp16.
    "fp16"              every zero in fp16, the papers' "W3.25" convention (3-bit g128 = 3.25 exactly).

The packed format stores a set's zeros as one bitstream rounded up to whole bytes once (packed/layout.py),
so these counts are exact up to less than one byte per stored set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("gate", "up", "down")
SHARED = "shared"
QUANTIZERS = ("rtn", "gptq", "hqq")
FP_BITS = 16
SCALE_BITS = 16  # one fp16 scale per group
META_BITS_PER_GROUP = 32  # 16-bit scale + 16-bit zero: the "fp16" zero-point accounting
ZERO_POINTS = ("packed", "fp16")  # how zero points are stored (and charged); "packed" is the default
DEFAULT_ZERO_POINTS = "packed"
INTEGER_ZERO_QUANTIZERS = ("rtn", "gptq")  # their zeros are codes of the grid 0 .. 2^bits - 1


def check_zero_points(zero_points: str) -> str:
    if zero_points not in ZERO_POINTS:
        raise ValueError(f"zero_points must be one of {', '.join(ZERO_POINTS)} (packed: integer zeros at the code "
                         f"width; fp16: every zero in 16 bits, the papers' W3.25 convention), got {zero_points!r}")
    return zero_points


@dataclass(frozen=True)
class Unit:
    layer: int
    expert: int | str  # routed expert index, or "shared"
    kind: str  # "gate" | "up" | "down"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unit kind must be one of {KINDS}, got {self.kind!r}")
        if not (isinstance(self.expert, int) or self.expert == SHARED):
            raise ValueError(f"unit expert must be an int or {SHARED!r}, got {self.expert!r}")

    @property
    def is_shared(self) -> bool:
        return self.expert == SHARED

    @property
    def name(self) -> str:
        """`L3.E12.gate`, `L3.shared.down`: stable, human-readable, used as the key in plans."""
        e = SHARED if self.is_shared else f"E{self.expert}"
        return f"L{self.layer}.{e}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> "Unit":
        m = re.fullmatch(r"L(\d+)\.(E(\d+)|shared)\.(gate|up|down)", name)
        if not m:
            raise ValueError(f"not a unit name: {name!r} (expected e.g. 'L3.E12.gate' or 'L3.shared.down')")
        expert: int | str = int(m.group(3)) if m.group(3) is not None else SHARED
        return cls(int(m.group(1)), expert, m.group(4))

    def sort_key(self) -> tuple:
        return (self.layer, 1 if self.is_shared else 0, -1 if self.is_shared else self.expert, KINDS.index(self.kind))

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Choice:
    bits: int  # 2..8 quantized; 16 = unquantized
    group_size: int = 128  # <= 0 means one group per output row (per-channel)
    quantizer: str = "rtn"
    rank: int = 0  # low-rank compensator rank (BT-MoE); 0 = none
    act_bits: int = FP_BITS  # input activations per-token symmetric at this width at run time; 16 = none

    def __post_init__(self):
        if self.act_bits != FP_BITS and not 2 <= self.act_bits <= 8:
            raise ValueError(f"act_bits must be in 2..8 or {FP_BITS} (unquantized activations), got {self.act_bits}")
        if self.bits != FP_BITS and not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8 or {FP_BITS}, got {self.bits}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")

    @property
    def is_fp(self) -> bool:
        return self.bits == FP_BITS

    @property
    def quantizes_acts(self) -> bool:
        return self.act_bits != FP_BITS

    @property
    def weight_choice(self) -> "Choice":
        """The same choice with unquantized activations: what decides the stored weight."""
        return Choice(self.bits, self.group_size, self.quantizer, self.rank)

    @property
    def label(self) -> str:
        a = f"-a{self.act_bits}" if self.quantizes_acts else ""
        if self.is_fp:
            return f"fp16{a}"
        g = f"g{self.group_size}" if self.group_size > 0 else "gch"
        r = f"-r{self.rank}" if self.rank else ""
        return f"w{self.bits}{g}-{self.quantizer}{r}{a}"

    def groups_per_row(self, in_features: int) -> int:
        if self.group_size <= 0:
            return 1
        return math.ceil(in_features / self.group_size)

    @property
    def integer_zeros(self) -> bool:
        """Its zero points are integer codes of the grid (rtn, gptq), so they can be stored at the code width."""
        return not self.is_fp and self.quantizer in INTEGER_ZERO_QUANTIZERS

    def zero_bits(self, zero_points: str = DEFAULT_ZERO_POINTS) -> int:
        """Bits one stored zero point takes: the code width when `zero_points` is "packed" and the zeros
        are integers, else 16 (0 for an unquantized unit: it has none)."""
        if self.is_fp:
            return 0
        return self.bits if check_zero_points(zero_points) == "packed" and self.integer_zeros else FP_BITS

    def storage_bits(self, out_features: int, in_features: int, zero_points: str = DEFAULT_ZERO_POINTS) -> int:
        """Bits to store an `[out_features, in_features]` weight under this choice, zero points stored as
        `zero_points` says (exact up to the < 1 byte per stored set a packed zero bitstream is rounded up)."""
        n = out_features * in_features
        if self.is_fp:
            total = FP_BITS * n
        else:
            meta = SCALE_BITS + self.zero_bits(zero_points)
            total = self.bits * n + meta * out_features * self.groups_per_row(in_features)
        return total + FP_BITS * self.rank * (out_features + in_features)

    def bits_per_weight(self, out_features: int, in_features: int, zero_points: str = DEFAULT_ZERO_POINTS) -> float:
        return self.storage_bits(out_features, in_features, zero_points) / (out_features * in_features)

    def nominal_bits(self, zero_points: str = DEFAULT_ZERO_POINTS) -> float:
        """Bits per weight when the group size divides the row (3 bits g128: 3.25 with fp16 zeros,
        3 + 19/128 with packed integer zeros)."""
        if self.is_fp:
            return float(FP_BITS)
        if self.group_size <= 0:
            return float(self.bits)  # metadata per row is negligible for wide rows; not exact
        return self.bits + (SCALE_BITS + self.zero_bits(zero_points)) / self.group_size

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "quantizer": self.quantizer, "rank": self.rank,
                "act_bits": self.act_bits}

    @classmethod
    def from_dict(cls, d: dict) -> "Choice":
        """Plans and tables written before activation bits existed load with `act_bits` 16."""
        return cls(int(d["bits"]), int(d.get("group_size", 128)), str(d.get("quantizer", "rtn")), int(d.get("rank", 0)),
                   int(d.get("act_bits", FP_BITS)))
