"""A fused expert weight of one MoE layer in packed form, as the grouped kernel reads it.

Layout (the moebits packed format): the codes of one output row of `K` input values at `b` bits are
one little-endian bitstream, value `j` in bits `[j*b, (j+1)*b)` counted LSB-first within each byte,
`ceil(K*b/8)` bytes per row. Rows of one fused tensor (e.g. `gate_up_proj [E, 2I, H]`) are grouped by
bit-width, so per bit-width there is one rectangular `codes [rows_b, ceil(K*b/8)]` uint8 tensor and
fp16 `scales`, `zeros` `[rows_b, G]` with `G = ceil(K / group_size)`; dequantized = `(q - zero) * scale`.

A `Segment` says where a run of one expert's output rows lives: in the `bits` tensor at rows
`[row0, row0 + rows)`, producing output columns `[col0, col0 + rows)` of that expert's product. So
gate and up of one expert may have different bit-widths (two segments), and any per-expert plan maps
onto it. Only torch here: the Triton kernel is in `triton_grouped.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    expert: int
    bits: int
    row0: int  # first row in the `bits` codes tensor
    rows: int
    col0: int  # first output column of the expert's product


@dataclass
class PackedGroupedWeight:
    """All experts' `[out_features, in_features]` weights of one fused tensor, packed per bit-width."""

    num_experts: int
    out_features: int  # per expert
    in_features: int
    group_size: int  # <= 0: one group per row
    codes: dict[int, torch.Tensor]  # bits -> uint8 [rows_b, ceil(K*b/8)]
    scales: dict[int, torch.Tensor]  # bits -> fp16 [rows_b, G]
    zeros: dict[int, torch.Tensor]  # bits -> fp16 [rows_b, G]
    segments: list[Segment]
    _tiles: dict = field(default_factory=dict, repr=False)  # (bits, block_n, device) -> tile tables

    def __post_init__(self):
        self.validate()

    @property
    def groups(self) -> int:
        return 1 if self.group_size <= 0 else math.ceil(self.in_features / self.group_size)

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size <= 0 else self.group_size

    def row_bytes(self, bits: int) -> int:
        return math.ceil(self.in_features * bits / 8)

    def validate(self) -> None:
        """Every expert's output columns are covered exactly once, every segment lies inside its tensors."""
        K, G = self.in_features, self.groups
        for b, c in self.codes.items():
            if not 1 <= b <= 8:
                raise ValueError(f"bits must be in 1..8, got {b}")
            if c.dtype != torch.uint8 or c.dim() != 2 or c.shape[1] != self.row_bytes(b):
                raise ValueError(f"codes at {b} bits must be uint8 [rows, {self.row_bytes(b)}] for K={K}, "
                                 f"got {c.dtype} {tuple(c.shape)}")
            for name, t in (("scales", self.scales.get(b)), ("zeros", self.zeros.get(b))):
                if t is None or t.shape != (c.shape[0], G):
                    raise ValueError(f"{name} at {b} bits must have shape ({c.shape[0]}, {G}), "
                                     f"got {None if t is None else tuple(t.shape)}")
        covered = torch.zeros(self.num_experts, self.out_features, dtype=torch.int32)
        for s in self.segments:
            if s.bits not in self.codes:
                raise ValueError(f"segment {s} refers to {s.bits}-bit codes, which are absent")
            if not 0 <= s.expert < self.num_experts or s.rows <= 0 or s.row0 < 0 \
                    or s.row0 + s.rows > self.codes[s.bits].shape[0] or s.col0 < 0 or s.col0 + s.rows > self.out_features:
                raise ValueError(f"segment {s} lies outside its tensors")
            covered[s.expert, s.col0:s.col0 + s.rows] += 1
        if not bool((covered == 1).all()):
            raise ValueError("segments must cover every output row of every expert exactly once")

    def to(self, device) -> "PackedGroupedWeight":
        move = lambda d: {b: t.to(device) for b, t in d.items()}  # noqa: E731
        return PackedGroupedWeight(self.num_experts, self.out_features, self.in_features, self.group_size,
                                   move(self.codes), move(self.scales), move(self.zeros), list(self.segments))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.codes, self.scales, self.zeros) for t in d.values())

    def tiles(self, bits: int, block_n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static launch tables for the `bits` launch, cached: per output tile its segment's
        `[expert, row0, rows, col0]` and the tile's first row within the segment (int32)."""
        key = (bits, block_n, str(device))
        if key not in self._tiles:
            seg_rows, n0s = [], []
            for s in self.segments:
                if s.bits != bits:
                    continue
                for n0 in range(0, s.rows, block_n):
                    seg_rows.append([s.expert, s.row0, s.rows, s.col0])
                    n0s.append(n0)
            seg = torch.tensor(seg_rows, dtype=torch.int32).reshape(-1, 4).to(device)
            self._tiles[key] = (seg, torch.tensor(n0s, dtype=torch.int32, device=device))
        return self._tiles[key]


def unpack_codes(codes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 `[rows, ceil(k*bits/8)]` -> int32 `[rows, k]` (torch; a reference and CPU fallback)."""
    j = torch.arange(k, device=codes.device)
    bitpos = j * bits
    byte, shift = bitpos // 8, bitpos % 8
    lo = codes[:, byte].to(torch.int32)
    nxt = (byte + 1).clamp(max=codes.shape[1] - 1)
    hi = torch.where(byte + 1 < codes.shape[1], codes[:, nxt].to(torch.int32), 0)
    return ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)


def dequantize_expert(weight: PackedGroupedWeight, expert: int, dtype=torch.float32) -> torch.Tensor:
    """One expert's dequantized `[out_features, in_features]` weight (torch)."""
    K, g = weight.in_features, weight.effective_group_size
    out = torch.empty(weight.out_features, K, dtype=torch.float32, device=next(iter(weight.codes.values())).device)
    for s in weight.segments:
        if s.expert != expert:
            continue
        rows = slice(s.row0, s.row0 + s.rows)
        q = unpack_codes(weight.codes[s.bits][rows], s.bits, K).float()
        gi = torch.arange(K, device=q.device) // g
        scale = weight.scales[s.bits][rows].float()[:, gi]
        zero = weight.zeros[s.bits][rows].float()[:, gi]
        out[s.col0:s.col0 + s.rows] = (q - zero) * scale
    return out.to(dtype)
