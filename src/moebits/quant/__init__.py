"""Quantizers on a unit's weight `[out, in]` (or a batch `[B, out, in]` of units of equal shape).
Each returns the dequantized weight; what it costs to store is `Choice.storage_bits`."""
from __future__ import annotations

import torch

from ..units import Choice
from .gptq import hessian_from_inputs, quantize_gptq
from .hqq import quantize_hqq
from .rtn import quantize_rtn


def quantize_weight(w: torch.Tensor, choice: Choice, hessian: torch.Tensor | None = None,
                    act_order: bool = False, damp: float = 0.01) -> torch.Tensor:
    if choice.rank:
        raise NotImplementedError("low-rank compensators (BT-MoE) are not implemented yet")
    if choice.is_fp:
        return w.to(torch.float16).to(w.dtype)
    if choice.quantizer == "rtn":
        return quantize_rtn(w, choice.bits, choice.group_size)
    if choice.quantizer == "hqq":
        return quantize_hqq(w, choice.bits, choice.group_size)
    if hessian is None:
        raise ValueError("GPTQ needs the Hessian of the unit's inputs (calibration tokens)")
    return quantize_gptq(w, hessian, choice.bits, choice.group_size, damp=damp, act_order=act_order)


__all__ = ["quantize_weight", "quantize_rtn", "quantize_gptq", "quantize_hqq", "hessian_from_inputs"]
