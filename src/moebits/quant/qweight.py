"""QuantizedWeight: what a quantizer stores for a unit (or a batch of units of one shape).

    codes  uint8 [..., out, in]   integers in 0 .. 2^bits - 1
    scale  fp16  [..., out, G]    one per group of `group_size` input columns (G = ceil(in / group_size);
    zero   fp16  [..., out, G]    a partial last group has its own); per-channel (group_size <= 0): G = 1

and the weight is `(codes - zero) * scale`, computed in float32 (RTN/GPTQ zeros are integers, HQQ
zeros are real-valued; both are exact in fp16 as stored). At 16 bits the unit is kept as fp16
`weight` rows and codes/scale/zero are None. A BT-MoE compensator adds `u @ v` (`u [..., out, r]`,
`v [..., r, in]`, fp16) to the dequantized weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..units import FP_BITS


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """`[..., out, G]` -> `[..., out, in]`: each group's value repeated over its columns."""
    if group_size <= 0:
        return per_group[..., :1].expand(*per_group.shape[:-1], in_features)
    return per_group.repeat_interleave(group_size, dim=-1)[..., :in_features]


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(codes - zero) * scale` in float32, `[..., out, in]`."""
    k = codes.shape[-1]
    z = expand_groups(zero.float(), group_size, k)
    s = expand_groups(scale.float(), group_size, k)
    return (codes.float() - z) * s


@dataclass
class QuantizedWeight:
    bits: int
    group_size: int
    codes: torch.Tensor | None = None  # uint8 [..., out, in]
    scale: torch.Tensor | None = None  # fp16 [..., out, G]
    zero: torch.Tensor | None = None  # fp16 [..., out, G]
    weight: torch.Tensor | None = None  # fp16 [..., out, in], only at 16 bits
    u: torch.Tensor | None = None  # fp16 [..., out, r], BT-MoE compensator (optional)
    v: torch.Tensor | None = None  # fp16 [..., r, in]

    def __post_init__(self):
        if self.bits == FP_BITS:
            if self.weight is None:
                raise ValueError("a 16-bit QuantizedWeight needs its fp16 `weight`")
        elif self.codes is None or self.scale is None or self.zero is None:
            raise ValueError(f"a {self.bits}-bit QuantizedWeight needs codes, scale and zero")
        if (self.u is None) != (self.v is None):
            raise ValueError("a low-rank compensator needs both u and v")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple((self.weight if self.codes is None else self.codes).shape)

    @property
    def rank(self) -> int:
        return 0 if self.u is None else self.u.shape[-1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.weight.float() if self.bits == FP_BITS else dequantize_codes(self.codes, self.scale, self.zero,
                                                                             self.group_size)
        if self.u is not None:
            w = w + self.u.float() @ self.v.float()
        return w.to(dtype)

    def __getitem__(self, i) -> "QuantizedWeight":
        """One unit of a batch (index over the leading dimension)."""
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        return QuantizedWeight(self.bits, self.group_size, pick(self.codes), pick(self.scale), pick(self.zero),
                               pick(self.weight), pick(self.u), pick(self.v))
