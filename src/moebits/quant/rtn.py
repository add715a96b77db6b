"""Asymmetric group-wise round-to-nearest: per output row and group of `group_size` input columns,
a scale and a zero point map [min, max] onto the integer grid 0 .. 2^bits - 1.

Every function takes `w [..., out, in]`: leading batch dimensions (e.g. all experts of a layer)
are quantized at once. A last, partial group (in % group_size != 0) is quantized on its own.
"""
from __future__ import annotations

import torch

from .qweight import QuantizedWeight


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[..., out, in] -> [..., out, G, g]`; a partial last group is padded by repeating its last
    column, which leaves that group's min and max (hence its scale and zero) unchanged."""
    k = w.shape[-1]
    g = k if group_size <= 0 else group_size
    pad = (-k) % g
    if pad:
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def minmax_params(w_groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero per group (last dim reduced). Scales are rounded through fp16,
    as they would be stored, so what we measure is what a user gets."""
    qmax = 2 ** bits - 1
    lo = w_groups.amin(dim=-1)
    hi = w_groups.amax(dim=-1)
    scale = ((hi - lo) / qmax).clamp(min=1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def round_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer code of each value (as float): clamp(round(x / scale) + zero, 0, 2^bits - 1)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (round_codes(x, scale, zero, bits) - zero) * scale


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int = 128,
                 return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    """Dequantized RTN weight, same shape and dtype as `w`; or, with `return_codes`, what is stored."""
    k = w.shape[-1]
    groups = group_view(w.float(), group_size)
    scale, zero = minmax_params(groups, bits)
    q = round_codes(groups, scale[..., None], zero[..., None], bits)
    if return_codes:
        codes = q.reshape(*w.shape[:-1], -1)[..., :k].to(torch.uint8)
        return QuantizedWeight(bits, group_size, codes, scale.half(), zero.half())
    deq = (q - zero[..., None]) * scale[..., None]
    return deq.reshape(*w.shape[:-1], -1)[..., :k].to(w.dtype)
