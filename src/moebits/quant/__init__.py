"""Quantizers on a unit's weight `[out, in]` (or a batch `[B, out, in]` of units of equal shape).

`quantize_weight` returns the dequantized weight (what the model computes with); with
`return_codes=True` (or `quantize_codes`) it returns a `QuantizedWeight`: the codes, scales and
zeros that are stored, whose `.dequantize()` is exactly that weight. What it costs to store is
`Choice.storage_bits`. A choice with `rank > 0` adds a low-rank compensator fitted by
`lowrank.fit_lowrank` around the same quantizer (RTN, GPTQ or HQQ): the weight is then `Q + UV`, and
the `QuantizedWeight` carries the fp16 factors `u`, `v` beside Q's codes.
"""
from __future__ import annotations

import torch

from ..units import Choice
from .gptq import hessian_from_inputs, quantize_gptq
from .hqq import quantize_hqq
from .lowrank import LowRankFit, RankTooLargeError, fit_lowrank
from .qweight import QuantizedWeight, dequantize_codes
from .rtn import quantize_rtn


def quantize_weight(w: torch.Tensor, choice: Choice, hessian: torch.Tensor | None = None,
                    act_order: bool = False, damp: float = 0.01,
                    return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError(f"a {tuple(w.shape)} weight to quantize with {choice.label} is not finite "
                                 f"({int((~torch.isfinite(w)).sum())} NaN/inf entries): check the checkpoint")
    if choice.rank:
        fit = quantize_lowrank(w, choice, hessian, act_order, damp)
        out = fit.stored if return_codes else fit.weight
    else:
        out = _quantize_plain(w, choice, hessian, act_order, damp, return_codes)
    _check_finite(out, choice, w)
    return out


def _check_finite(out: torch.Tensor | QuantizedWeight, choice: Choice, w: torch.Tensor) -> None:
    """A NaN or inf in a quantized weight would silently poison every later measurement: refuse it."""
    parts = [out] if torch.is_tensor(out) else [t for t in (out.scale, out.zero, out.weight, out.u, out.v)
                                                 if t is not None]
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        raise FloatingPointError(f"quantizing a finite {tuple(w.shape)} weight with {choice.label} gave non-finite "
                                 "values (a quantizer defect; please report it)")


def quantize_lowrank(w: torch.Tensor, choice: Choice, hessian: torch.Tensor | None = None, act_order: bool = False,
                     damp: float = 0.01, max_iters: int = 5) -> LowRankFit:
    """Quantize with `choice`'s quantizer and a rank-`choice.rank` compensator (BT-MoE); the fit holds
    the dequantized weight, what is stored (`fit.stored`: Q's codes with the fp16 factors) and the
    iterations used. `fit.stored.dequantize(w.dtype)` equals `fit.weight` exactly."""
    if choice.is_fp:
        raise ValueError(f"a low-rank compensator corrects a quantized weight; {choice.label} is not quantized "
                         "(use rank 0 with 16 bits)")
    plain = Choice(choice.bits, choice.group_size, choice.quantizer)
    return fit_lowrank(w, choice.rank, lambda t: _quantize_plain(t, plain, hessian, act_order, damp, True),
                       max_iters=max_iters)


def _quantize_plain(w: torch.Tensor, choice: Choice, hessian: torch.Tensor | None = None, act_order: bool = False,
                    damp: float = 0.01, return_codes: bool = False) -> torch.Tensor | QuantizedWeight:
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


__all__ = ["quantize_weight", "quantize_codes", "quantize_lowrank", "fit_lowrank", "LowRankFit", "RankTooLargeError",
           "QuantizedWeight", "dequantize_codes", "quantize_rtn", "quantize_gptq", "quantize_hqq",
           "hessian_from_inputs"]
