"""The routed experts of one MoE layer on packed weights: gate_up matmul, gated activation, down
matmul, routing-weighted sum, with the grouped Triton kernel doing both matmuls.

Input transforms (an online Hadamard, activation quantization) act on each block's input row by row,
so they are applied here to the expert-sorted rows, each row through its own expert's chain
(`RowTransform`); when gate and up of some expert see different inputs, both are passed to the
gate_up launch as two planes. BT-MoE compensators (`x V^T U^T`) are added in torch, per expert.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .packed_weight import PackedGroupedWeight
from .routing import sort_by_expert

# (kind, x_rows [N, K], expert_of_row [N]) -> the rows' transformed inputs (the same object: identity)
RowTransform = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
SYNC_TOKENS = 512


def add_lowrank(y: torch.Tensor, x: torch.Tensor, weight: PackedGroupedWeight, starts: list[int],
                counts: list[int], cols: tuple[int, int] | None = None) -> None:
    """`y[rows of e, cols] += x[rows of e] V^T U^T` for every compensator of `weight` (in place; only
    those writing columns in `cols = [lo, hi)` when given). `starts`, `counts`: the sorted routing's, on the host."""
    for c in weight.lowrank:
        n = counts[c.expert]
        if n == 0 or (cols is not None and not cols[0] <= c.col0 < cols[1]):
            continue
        rows = slice(starts[c.expert], starts[c.expert] + n)
        t = (x[rows].float() @ c.v.float().T) @ c.u.float().T  # fp32, as the dequantized path adds U V
        y[rows, c.col0:c.col0 + c.u.shape[0]] += t.to(y.dtype)


def packed_experts_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           gate_up: PackedGroupedWeight, down: PackedGroupedWeight,
                           act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
                           transform: RowTransform | None = None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """`x [T, H]` -> `[T, H]`: `sum_k w_k * down_e(act(gate_e(x)) * up_e(x))` over each token's top-k experts.

    `gate_up` holds `[E, 2I, H]` (gate = rows `:I`, up = rows `I:`, as transformers 5 fuses them),
    `down` holds `[E, H, I]`. Expert ids outside `[0, E)` (padding) contribute nothing. `block_n`,
    `block_k`: the kernel's output and reduction tile sizes.
    """
    from .triton_grouped import packed_grouped_matmul

    E, inter = gate_up.num_experts, gate_up.out_features // 2
    if down.in_features != inter or down.out_features != x.shape[1] or gate_up.in_features != x.shape[1] \
            or down.num_experts != E:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, gate_up [{E}, {gate_up.out_features}, "
                         f"{gate_up.in_features}], down [{down.num_experts}, {down.out_features}, {down.in_features}]")
    valid = (topk_ids >= 0) & (topk_ids < E)
    ids = torch.where(valid, topk_ids, E)  # padding goes to bucket E, which no tile reads
    r = sort_by_expert(ids, torch.where(valid, topk_weights, 0), E + 1, max_count=False)
    # an expert gets each token at most once: the token count bounds the grid without a device sync;
    # past SYNC_TOKENS the idle programs of a T-row grid cost more than one sync for the true largest count
    max_tokens = x.shape[0] if x.shape[0] <= SYNC_TOKENS else int(r.count[:E].max())
    expert = ids.reshape(-1)[r.order] if transform is not None else None  # expert of each sorted row (E: padding)
    starts = counts = None
    if gate_up.lowrank or down.lowrank:
        starts, counts = r.start.tolist(), r.count.tolist()
    xs = x[r.token]
    alt_col = None
    if transform is not None:
        xg, xu = transform("gate", xs, expert), transform("up", xs, expert)
        xs, alt_col = (xg, None) if xg is xu else (torch.stack([xg, xu]), inter)
    h = packed_grouped_matmul(xs, gate_up, r.start, r.count, max_tokens, block_n, block_k, alt_col=alt_col)
    if gate_up.lowrank:
        if alt_col is None:
            add_lowrank(h, xs, gate_up, starts, counts)
        else:  # gate columns from the gate input, up columns from the up input
            add_lowrank(h, xs[0], gate_up, starts, counts, (0, inter))
            add_lowrank(h, xs[1], gate_up, starts, counts, (inter, 2 * inter))
    a = act(h[:, :inter]) * h[:, inter:]
    if transform is not None:
        a = transform("down", a, expert)
    o = packed_grouped_matmul(a, down, r.start, r.count, max_tokens, block_n, block_k)
    if down.lowrank:
        add_lowrank(o, a, down, starts, counts)
    kept = valid.reshape(-1)[r.order]
    o = torch.where(kept[:, None], o.float() * r.weight.float()[:, None], 0.0)  # padding rows hold no result
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, r.token, o)
    return out.to(x.dtype)

