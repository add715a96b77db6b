"""HQQ (Badri & Shaji, 2023) through the `hqq` package: half-quadratic optimisation of the zero
point (and scale) per group, no calibration data. Runs on the CPU here.

The package groups `W.reshape(-1, group_size)`, i.e. consecutive input columns of a row when
`in_features % group_size == 0`; a partial last group is handled by padding the row (repeating its
last column), exactly as RTN does, so the stored layout and its cost are the same. Zeros are
real-valued (not integers): they are stored in fp16, and rounded to it here before dequantizing.
"""
from __future__ import annotations

import torch

from .qweight import QuantizedWeight
from .rtn import group_view, minmax_params, round_codes

SUPPORTED_BITS = (1, 2, 3, 4, 8)


@torch.no_grad()
def quantize_hqq(w: torch.Tensor, bits: int, group_size: int = 128,
                 return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    from hqq.core.quantize import Quantizer

    if bits not in SUPPORTED_BITS:
        raise ValueError(f"HQQ supports bits {SUPPORTED_BITS}, not {bits}")
    k = w.shape[-1]
    groups = group_view(w.float(), group_size)  # [..., R, G, g]
    g = groups.shape[-1]
    flat = groups.reshape(-1, g).contiguous()
    device = "cuda" if flat.is_cuda else "cpu"
    w_q, meta = Quantizer.quantize(flat, nbits=bits, channel_wise=True, group_size=g, optimize=True, axis=1,
                                   bitpack=False, compute_dtype=torch.float32, device=device)
    # stored as fp16 (scale, zero): round them as they would be stored
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()  # [N, 1]
    # a constant (e.g. all-zero) group: HQQ's zero is -c in fp16, which loses c's low bits, and its
    # optimiser has nothing to fit; the min-max grid reproduces such a group exactly (rtn.minmax_params)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    if bool(constant.any()):
        s_c, z_c = minmax_params(flat[constant], bits)
        w_q = w_q.clone()
        w_q[constant] = round_codes(flat[constant], s_c[:, None], z_c[:, None], bits).to(w_q.dtype)
        scale[constant], zero[constant] = s_c[:, None], z_c[:, None]
    if return_codes:
        codes = w_q.reshape(groups.shape).reshape(*w.shape[:-1], -1)[..., :k].to(torch.uint8)
        per_group = groups.shape[:-1]  # [..., R, G]
        return QuantizedWeight(bits, group_size, codes, scale.reshape(per_group).half(), zero.reshape(per_group).half())
    deq = (w_q.float().reshape(-1, g) - zero) * scale
    return deq.reshape(groups.shape).reshape(*w.shape[:-1], -1)[..., :k].to(w.dtype)
