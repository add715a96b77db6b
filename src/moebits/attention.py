"""Attention projections at one fixed setting, for every method (`--attn-bits B --attn-rank r`).

BT-MoE keeps attention (and shared experts) at one setting, e.g. 4 bits with a compensator, instead of
16 bits; the allocation stays over the expert units. Every `nn.Linear` of the attention is quantized
with the run's quantizer: q/k/v/o, and DeepSeek's MLA projections q_a/q_b, kv_a_proj_with_mqa, kv_b.
Routers, norms, biases, embeddings and the LM head stay 16-bit. Without `--attn-bits` attention is
left untouched (and counted at 16 bits in the whole-model size).

GPTQ needs each projection's input Hessian: it is accumulated from the unquantized model on the
calibration windows (`attention_hessians`), before anything is quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.adapter import MoEAdapter
from .quant import quantize_weight
from .quant.lowrank import check_rank
from .units import DEFAULT_ZERO_POINTS, FP_BITS, Choice


@dataclass(frozen=True)
class AttentionSize:
    params: int  # weights of the attention projections (biases excluded: they stay 16-bit)
    storage_bits: int  # exact storage under the choice (16 bits per weight when untouched)


def attention_shapes(adapter: MoEAdapter) -> dict[str, tuple[int, int]]:
    return {name: tuple(mod.weight.shape) for name, mod in adapter.attention_linears().items()}


def attention_size(adapter: MoEAdapter, choice: Choice | None, zero_points: str = DEFAULT_ZERO_POINTS) -> AttentionSize:
    shapes = attention_shapes(adapter)
    params = sum(o * i for o, i in shapes.values())
    bits = FP_BITS * params if choice is None else sum(choice.storage_bits(o, i, zero_points) for o, i in shapes.values())
    return AttentionSize(params, bits)


def check_attention_choice(adapter: MoEAdapter, choice: Choice) -> None:
    """Refuse before any work when a projection cannot take the choice (a rank above its smaller side)."""
    for name, (o, i) in attention_shapes(adapter).items():
        try:
            check_rank(choice.rank, o, i)
        except ValueError as e:
            raise type(e)(f"--attn-rank: {name}: {e}") from None


@torch.no_grad()
def attention_hessians(adapter: MoEAdapter, windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """name -> X^T X / n of each attention projection's inputs on `windows`, from the model as it is."""
    mods = adapter.attention_linears()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    device = next(adapter.model.parameters()).device
    with adapter.capture_linear_inputs(mods, add):
        for s in range(0, windows.shape[0], batch_size):
            adapter.model(input_ids=windows[s:s + batch_size].to(device), use_cache=False)
    return {name: sums[name] / max(1, counts[name]) for name in mods}


@torch.no_grad()
def quantize_attention(adapter: MoEAdapter, choice: Choice, hessians: dict[str, torch.Tensor] | None = None,
                       act_order: bool = False) -> AttentionSize:
    """Quantize every attention projection in place with `choice`; returns the exact size stored."""
    check_attention_choice(adapter, choice)
    if choice.quantizer == "gptq" and hessians is None:
        raise ValueError("GPTQ on attention needs the projections' input Hessians (attention_hessians)")
    for name, mod in adapter.attention_linears().items():
        h = hessians[name] if choice.quantizer == "gptq" else None
        mod.weight.data.copy_(quantize_weight(mod.weight.data, choice, hessian=h, act_order=act_order))
    return attention_size(adapter, choice)


__all__ = ["AttentionSize", "attention_shapes", "attention_size", "attention_hessians", "quantize_attention",
           "check_attention_choice"]
