"""Asymmetric group-wise round-to-nearest: per output row and group of `group_size` input columns,
a scale and a zero point map [min, max] onto the integer grid 0 .. 2^bits - 1.

Every function takes `w [..., out, in]`: leading batch dimensions (e.g. all experts of a layer)
are quantized at once. A last, partial group (in % group_size != 0) is quantized on its own.
"""
from __future__ import annotations

import torch

from .qweight import QuantizedWeight


class QmaxBits:
    """Per-row bit-widths with their 2^bits - 1 computed once (GPTQ's column loop rounds K times)."""

    def __init__(self, bits: torch.Tensor):
        self.qmax = 2.0 ** bits - 1


def _qmax(bits: int | torch.Tensor | QmaxBits) -> int | torch.Tensor:
    """2^bits - 1; `bits` an int, or a float tensor broadcastable to the values (one width per row: the
    batched profiler quantizes rows of several bit-widths in one call, with the same results)."""
    if isinstance(bits, QmaxBits):
        return bits.qmax
    return 2.0 ** bits - 1 if torch.is_tensor(bits) else 2 ** bits - 1


def _clamp_grid(x: torch.Tensor, bits: int | torch.Tensor | QmaxBits) -> torch.Tensor:
    if torch.is_tensor(bits) or isinstance(bits, QmaxBits):
        return torch.minimum(x.clamp(min=0), _qmax(bits))
    return x.clamp(0, 2 ** bits - 1)


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
    as they would be stored, so what we measure is what a user gets.

    As the GPTQ reference quantizer does, the range always includes 0 (`lo <= 0 <= hi`), so the zero
    point is a code of the grid and a one-signed group is not clamped onto a shifted grid, and an
    all-zero group gets the range [-1, 1] instead of a zero scale (a division by zero, NaN). A
    constant group `c != 0` uses scale |c| (codes 0 and 1), so it is reproduced exactly whenever
    `c` is an fp16 value (the general scale |c| / qmax would be rounded through fp16)."""
    qmax = _qmax(bits)
    lo = w_groups.amin(dim=-1)
    hi = w_groups.amax(dim=-1)
    constant = lo == hi
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    zero_group = (lo == 0) & (hi == 0)
    lo, hi = torch.where(zero_group, -1.0, lo), torch.where(zero_group, 1.0, hi)
    scale = torch.where(constant & ~zero_group, hi - lo, (hi - lo) / qmax)
    # stored in fp16: a range too small for fp16 gets its smallest scale (2^-24 ~ 6e-8, so the rounding
    # error stays below 3e-8); one too large for fp16 cannot be stored at all
    scale = scale.clamp(min=2.0 ** -24).half().float()
    if not bool(torch.isfinite(scale).all()):
        bad = ~torch.isfinite(scale)
        raise FloatingPointError(f"{int(bad.sum())} group(s) span a range fp16 scales cannot hold "
                                 f"(e.g. [{lo[bad][0].item():.3g}, {hi[bad][0].item():.3g}])")
    zero = _clamp_grid(torch.round(-lo / scale), bits)
    return scale, zero


def round_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer code of each value (as float): clamp(round(x / scale) + zero, 0, 2^bits - 1)."""
    return _clamp_grid(torch.round(x / scale) + zero, bits)


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
