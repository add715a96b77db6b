"""The routed experts of one MoE layer on packed weights: gate_up matmul, gated activation, down
matmul, routing-weighted sum, with the grouped Triton kernel doing both matmuls."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .packed_weight import PackedGroupedWeight
from .routing import sort_by_expert


def packed_experts_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           gate_up: PackedGroupedWeight, down: PackedGroupedWeight,
                           act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """`x [T, H]` -> `[T, H]`: `sum_k w_k * down_e(act(gate_e(x)) * up_e(x))` over each token's top-k experts.

    `gate_up` holds `[E, 2I, H]` (gate = rows `:I`, up = rows `I:`, as transformers 5 fuses them),
    `down` holds `[E, H, I]`.
    """
    from .triton_grouped import packed_grouped_matmul

    inter = gate_up.out_features // 2
    if down.in_features != inter or down.out_features != x.shape[1] or gate_up.in_features != x.shape[1]:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, gate_up [E, {gate_up.out_features}, "
                         f"{gate_up.in_features}], down [E, {down.out_features}, {down.in_features}]")
    r = sort_by_expert(topk_ids, topk_weights, gate_up.num_experts)
    xs = x[r.token]
    h = packed_grouped_matmul(xs, gate_up, r.start, r.count, r.max_count)
    a = act(h[:, :inter]) * h[:, inter:]
    o = packed_grouped_matmul(a, down, r.start, r.count, r.max_count)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, r.token, o.float() * r.weight.float()[:, None])
    return out.to(x.dtype)
