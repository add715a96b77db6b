"""A fused expert weight of one MoE layer in packed form, as the grouped kernel reads it.

Layout (the moebits packed format): the codes of one output row of `K` input values at `b` bits are
one little-endian bitstream, value `j` in bits `[j*b, (j+1)*b)` counted LSB-first within each byte,
`ceil(K*b/8)` bytes per row. Rows of one fused tensor (e.g. `gate_up_proj [E, 2I, H]`) are grouped into
*sets*, one per (bits, group size, zero storage) as the packed format stores them: per set one
rectangular `codes [rows, ceil(K*b/8)]` uint8 tensor, fp16 `scales [rows, G]` with
`G = ceil(K / group_size)`, and zeros either fp16 `[rows, G]` (`zero_bits` 16) or, for integer zeros
stored at the code width (`zero_bits` = b, format 2), one uint8 bitstream `[ceil(rows*G*b/8)]` holding
the zero of (row r, group g) at bit offset `(r*G + g)*b` (quant/pack.py); dequantized = `(q - zero) * scale`. A set at 16 bits holds fp16 rows
`[rows, K]` in `codes` and no scales or zeros.

A `Segment` says where a run of one expert's output rows lives: in set `set` at rows
`[row0, row0 + rows)`, producing output columns `[col0, col0 + rows)` of that expert's product. So
gate and up of one expert may have different bit-widths (two segments), and any per-expert plan maps
onto it. A `LowRank` adds a BT-MoE compensator `x V^T U^T` to one segment's columns (applied in torch
after the kernel). Only torch here: the Triton kernel is in `triton_grouped.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable

import torch

FP16_BITS = 16  # a set of unquantized fp16 rows


@dataclass
class WeightSet:
    """The rows of one fused tensor stored at one (bits, group size)."""

    bits: int  # 1..8: packed codes; 16: fp16 rows in `codes`
    group_size: int  # <= 0: one group per row (unused at 16 bits)
    codes: torch.Tensor  # uint8 [rows, ceil(K*bits/8)], or fp16 [rows, K] at 16 bits
    scales: torch.Tensor | None = None  # fp16 [rows, G]
    zeros: torch.Tensor | None = None  # fp16 [rows, G], or uint8 [ceil(rows*G*zero_bits/8)] when zero_bits < 16
    zero_bits: int = FP16_BITS  # 16: fp16 zeros; = bits: integer zeros packed into one bitstream

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def packed_zeros(self) -> bool:
        return self.bits != FP16_BITS and self.zero_bits != FP16_BITS

    def zero_values(self, in_features: int, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """float32 zeros `[len(rows), G]` of `rows` (all when None)."""
        if not self.packed_zeros:
            z = self.zeros if rows is None else self.zeros[rows]
            return z.float()
        from ..quant.pack import unpack_zero_stream

        return unpack_zero_stream(self.zeros, self.zero_bits, self.groups(in_features), rows, total_rows=self.rows)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size <= 0 else math.ceil(in_features / self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size <= 0 else self.group_size

    def row_stride(self, in_features: int) -> int:
        """Elements of `codes` per row (bytes for packed codes, values for fp16 rows)."""
        return in_features if self.bits == FP16_BITS else math.ceil(in_features * self.bits / 8)

    def to(self, device) -> "WeightSet":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return WeightSet(self.bits, self.group_size, mv(self.codes), mv(self.scales), mv(self.zeros), self.zero_bits)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros) if t is not None)


@dataclass(frozen=True)
class Segment:
    expert: int
    set: Hashable  # key of its `WeightSet` in `PackedGroupedWeight.sets`
    row0: int  # first row in that set
    rows: int
    col0: int  # first output column of the expert's product


@dataclass(frozen=True, eq=False)
class LowRank:
    """A compensator of one unit: adds `x V^T U^T` to output columns `[col0, col0 + rows)` of `expert`."""

    expert: int
    col0: int
    u: torch.Tensor  # [rows, r]
    v: torch.Tensor  # [r, in_features]


@dataclass
class PackedGroupedWeight:
    """All experts' `[out_features, in_features]` weights of one fused tensor, packed per set."""

    num_experts: int
    out_features: int  # per expert
    in_features: int
    sets: dict[Hashable, WeightSet]
    segments: list[Segment]
    lowrank: list[LowRank] = field(default_factory=list)
    _tiles: dict = field(default_factory=dict, repr=False)  # (set, block_n, device) -> tile tables

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_bits(cls, num_experts: int, out_features: int, in_features: int, group_size: int,
                  codes: dict[int, torch.Tensor], scales: dict[int, torch.Tensor], zeros: dict[int, torch.Tensor],
                  segments: list[Segment]) -> "PackedGroupedWeight":
        """One set per bit-width, all at `group_size` (segments name their set by its bits)."""
        sets = {b: WeightSet(b, group_size, c, scales.get(b), zeros.get(b)) for b, c in codes.items()}
        return cls(num_experts, out_features, in_features, sets, segments)

    def validate(self) -> None:
        """Every expert's output columns are covered exactly once, every segment lies inside its set."""
        K = self.in_features
        for key, s in self.sets.items():
            if s.bits == FP16_BITS:
                if s.codes.dtype != torch.float16 or s.codes.dim() != 2 or s.codes.shape[1] != K:
                    raise ValueError(f"set {key!r}: fp16 rows must be float16 [rows, {K}], got {s.codes.dtype} "
                                     f"{tuple(s.codes.shape)}")
                continue
            if not 1 <= s.bits <= 8:
                raise ValueError(f"set {key!r}: bits must be in 1..8 or 16, got {s.bits}")
            if s.codes.dtype != torch.uint8 or s.codes.dim() != 2 or s.codes.shape[1] != s.row_stride(K):
                raise ValueError(f"set {key!r}: codes at {s.bits} bits must be uint8 [rows, {s.row_stride(K)}] for "
                                 f"K={K}, got {s.codes.dtype} {tuple(s.codes.shape)}")
            want_zeros = (-(-s.rows * s.groups(K) * s.zero_bits // 8),) if s.packed_zeros else (s.rows, s.groups(K))
            if s.packed_zeros and (s.zero_bits != s.bits or s.zeros is None or s.zeros.dtype != torch.uint8):
                raise ValueError(f"set {key!r}: packed zeros must be a uint8 bitstream at the code width {s.bits}, "
                                 f"got zero_bits {s.zero_bits}, {None if s.zeros is None else s.zeros.dtype}")
            for name, t, want in (("scales", s.scales, (s.rows, s.groups(K))), ("zeros", s.zeros, want_zeros)):
                if t is None or tuple(t.shape) != want:
                    raise ValueError(f"set {key!r}: {name} must have shape {want}, "
                                     f"got {None if t is None else tuple(t.shape)}")
        covered = torch.zeros(self.num_experts, self.out_features, dtype=torch.int32)
        for seg in self.segments:
            if seg.set not in self.sets:
                raise ValueError(f"segment {seg} refers to set {seg.set!r}, which is absent")
            if not 0 <= seg.expert < self.num_experts or seg.rows <= 0 or seg.row0 < 0 \
                    or seg.row0 + seg.rows > self.sets[seg.set].rows or seg.col0 < 0 \
                    or seg.col0 + seg.rows > self.out_features:
                raise ValueError(f"segment {seg} lies outside its tensors")
            covered[seg.expert, seg.col0:seg.col0 + seg.rows] += 1
        if not bool((covered == 1).all()):
            raise ValueError("segments must cover every output row of every expert exactly once")
        for lr in self.lowrank:
            rows, r = lr.u.shape
            if lr.v.shape != (r, K) or not 0 <= lr.expert < self.num_experts or lr.col0 < 0 \
                    or lr.col0 + rows > self.out_features:
                raise ValueError(f"compensator of expert {lr.expert} at column {lr.col0} has U {tuple(lr.u.shape)}, "
                                 f"V {tuple(lr.v.shape)}: does not fit [{self.out_features}, {K}]")

    def to(self, device) -> "PackedGroupedWeight":
        return PackedGroupedWeight(self.num_experts, self.out_features, self.in_features,
                                   {k: s.to(device) for k, s in self.sets.items()}, list(self.segments),
                                   [LowRank(c.expert, c.col0, c.u.to(device), c.v.to(device)) for c in self.lowrank])

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.sets.values()) + sum(
            c.u.numel() * c.u.element_size() + c.v.numel() * c.v.element_size() for c in self.lowrank)

    def tiles(self, key: Hashable, block_n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Static launch tables for the launch of set `key`, cached: per output tile its segment's
        `[expert, row0, rows, col0]` and the tile's first row within the segment (int32)."""
        cache_key = (key, block_n, str(device))
        if cache_key not in self._tiles:
            seg_rows, n0s = [], []
            for s in self.segments:
                if s.set != key:
                    continue
                for n0 in range(0, s.rows, block_n):
                    seg_rows.append([s.expert, s.row0, s.rows, s.col0])
                    n0s.append(n0)
            seg = torch.tensor(seg_rows, dtype=torch.int32).reshape(-1, 4).to(device)
            self._tiles[cache_key] = (seg, torch.tensor(n0s, dtype=torch.int32, device=device))
        return self._tiles[cache_key]


def unpack_codes(codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 `[rows, ceil(k*bits/8)]` -> int32 `[rows, k]` (torch; a reference and CPU fallback)."""
    j = torch.arange(k, device=codes.device)
    bitpos = j * bits
    byte, shift = bitpos // 8, bitpos % 8
    lo = codes[:, byte].to(torch.int32)
    nxt = (byte + 1).clamp(max=codes.shape[1] - 1)
    hi = torch.where(byte + 1 < codes.shape[1], codes[:, nxt].to(torch.int32), 0)
    return ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)


def dequantize_expert(weight: PackedGroupedWeight, expert: int, dtype=torch.float32,
                      lowrank: bool = True) -> torch.Tensor:
    """One expert's dequantized `[out_features, in_features]` weight (torch), compensators added."""
    K = weight.in_features
    device = next(iter(weight.sets.values())).codes.device
    out = torch.empty(weight.out_features, K, dtype=torch.float32, device=device)
    for seg in weight.segments:
        if seg.expert != expert:
            continue
        s, rows = weight.sets[seg.set], slice(seg.row0, seg.row0 + seg.rows)
        if s.bits == FP16_BITS:
            out[seg.col0:seg.col0 + seg.rows] = s.codes[rows].float()
            continue
        q = unpack_codes(s.codes[rows], s.bits, K).float()
        gi = torch.arange(K, device=q.device) // s.effective_group_size(K)
        out[seg.col0:seg.col0 + seg.rows] = (q - s.zero_values(K, rows)[:, gi]) * s.scales[rows].float()[:, gi]
    if lowrank:
        for c in weight.lowrank:
            if c.expert == expert:
                out[c.col0:c.col0 + c.u.shape[0]] += c.u.float() @ c.v.float()
    return out.to(dtype)
