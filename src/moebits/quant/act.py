"""Activation fake quantization: per-token symmetric integers at `a` bits, with optional clipping.

Each token (row of `x [..., K]`) gets its own scale `s_t = clip * max_k |x_tk| / qmax`, with
`qmax = 2^(a-1) - 1`, and is replaced by `s_t * clamp(round(x / s_t), -qmax, qmax)`.

Why symmetric, per token: an integer GEMM `W_int @ x_int` needs only the two scales (weight group
scale, token scale) when the activation has no zero point; an asymmetric activation would add a
per-token `zero * rowsum(W)` correction to every output. QuaRot and MxMoE quantize activations this
way (after a Hadamard rotation has spread the outliers, symmetric loses little). The range is kept
symmetric (-qmax..qmax, one code unused) so that quantizing `-x` gives exactly `-Q(x)`.

`clip < 1` clips each token's largest magnitudes to `clip * max|x|` (QuaRot uses 0.9): a finer grid
for the bulk at the price of saturating the outliers. 16 bits is the identity (no quantization).

Error bound (clip = 1): every element moves by at most `s_t / 2 = max|x_t| / (2 qmax)`; at 8 bits
that is `max|x_t| / 254`.
"""
from __future__ import annotations

import torch

FP_ACT_BITS = 16
ACT_BITS = tuple(range(2, 9)) + (FP_ACT_BITS,)


def check_act_bits(bits: int) -> int:
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be in 2..8 or {FP_ACT_BITS} (unquantized), got {bits}")
    return int(bits)


def quantize_activations(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """`x [..., K]` fake-quantized per token (last dim) at `bits`, symmetric; same shape and dtype.
    Computed in float32 whatever the input dtype."""
    check_act_bits(bits)
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"activation clipping ratio must be in (0, 1], got {clip}")
    if bits == FP_ACT_BITS:
        return x
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) * clip
    scale = (absmax / qmax).clamp_min(torch.finfo(torch.float32).tiny)  # an all-zero token stays zero
    q = torch.clamp(torch.round(xf / scale), -qmax, qmax)
    return (q * scale).to(x.dtype)
