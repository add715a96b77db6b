"""Quantizers on a unit's weight `[out, in]` (or a batch `[B, out, in]` of units of equal shape).

`quantize_weight` returns the dequantized weight (what the model computes with); with
`return_codes=True` (or `quantize_codes`) it returns a `QuantizedWeight`: the codes, scales and
zeros that are stored, whose `.dequantize()` is exactly that weight. What it costs to store is
`Choice.storage_bits`.
"""
from __future__ import annotations

import torch

from ..units import Choice
from .gptq import hessian_from_inputs, quantize_gptq
from .hqq import quantize_hqq
from .qweight import QuantizedWeight, dequantize_codes
from .rtn import quantize_rtn


def quantize_weight(w: torch.Tensor, choice: Choice, hessian: torch.Tensor | None = None,
                    act_order: bool = False, damp: float = 0.01,
                    return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    if choice.rank:
        raise NotImplementedError("low-rank compensators (BT-MoE) are not implemented yet")
    if choice.is_fp:
        if return_codes:
            return QuantizedWeight(choice.bits, choice.group_size, weight=w.to(torch.float16))
        return w.to(torch.float16).to(w.dtype)
    if choice.quantizer == "rtn":
        return quantize_rtn(w, choice.bits, choice.group_size, return_codes=return_codes)
    if choice.quantizer == "hqq":
        return quantize_hqq(w, choice.bits, choice.group_size, return_codes=return_codes)
    if hessian is None:
        raise ValueError("GPTQ needs the Hessian of the unit's inputs (calibration tokens)")
    return quantize_gptq(w, hessian, choice.bits, choice.group_size, damp=damp, act_order=act_order,
                         return_codes=return_codes)


def quantize_codes(w: torch.Tensor, choice: Choice, hessian: torch.Tensor | None = None,
                   act_order: bool = False, damp: float = 0.01) -> QuantizedWeight:
    """What `quantize_weight` would store: `quantize_codes(...).dequantize(w.dtype)` equals
    `quantize_weight(...)` exactly."""
    return quantize_weight(w, choice, hessian, act_order, damp, return_codes=True)


__all__ = ["quantize_weight", "quantize_codes", "QuantizedWeight", "dequantize_codes", "quantize_rtn",
           "quantize_gptq", "quantize_hqq", "hessian_from_inputs"]
