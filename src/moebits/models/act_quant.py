"""Install a plan's activation quantization on a model (dense or packed): each unit whose choice has
`act_bits < 16` gets `quant.act.quantize_activations(bits, clip)` at the "act_quant" stage of its
block's input (transforms.py). Works by module path, so it needs no `MoEAdapter` (a packed model's
experts have no fused weights for the adapter to read)."""
from __future__ import annotations

import functools

import torch.nn as nn

from ..quant.act import FP_ACT_BITS, quantize_activations
from ..units import Unit
from .adapter import ARCHS, UnsupportedModelError
from .transforms import ROW_WISE, clear_transforms, set_expert_transform, set_linear_transform

STAGE = "act_quant"


def act_quantizer(bits: int, clip: float = 1.0):
    """The transform quantizing a block's input per token at `bits` (symmetric, clip ratio `clip`)."""
    fn = functools.partial(quantize_activations, bits=bits, clip=clip)
    setattr(fn, ROW_WISE, True)  # one scale per token
    return fn


def _hosts(model: nn.Module, unit: Unit) -> nn.Module:
    layers = model.model.layers
    mlp = layers[unit.layer].mlp
    if not unit.is_shared:
        return mlp.experts
    spec = ARCHS.get(getattr(model.config, "model_type", None))
    if spec is None or spec.shared_attr is None:
        raise UnsupportedModelError(f"{unit.name}: this model has no shared expert")
    return getattr(getattr(mlp, spec.shared_attr), f"{unit.kind}_proj")


def install_act_quant(model: nn.Module, act_bits: dict[Unit, int], clip: float = 1.0) -> int:
    """Quantize the input activations of every unit in `act_bits` (unit -> bits; 16 = leave) in all
    later forwards of `model`. Replaces previously installed activation quantization. Returns the
    number of units quantized."""
    remove_act_quant(model)
    n = 0
    for unit, bits in act_bits.items():
        if bits == FP_ACT_BITS:
            continue
        host = _hosts(model, unit)
        fn = act_quantizer(bits, clip)
        if unit.is_shared:
            set_linear_transform(host, STAGE, fn)
        else:
            set_expert_transform(host, unit.expert, unit.kind, STAGE, fn)
        n += 1
    return n


def remove_act_quant(model: nn.Module) -> None:
    for m in model.modules():
        clear_transforms(m, STAGE)
