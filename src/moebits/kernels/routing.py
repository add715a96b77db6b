"""Sort routed (token, expert) assignments by expert, the input order of the grouped kernel."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SortedRouting:
    token: torch.Tensor  # [N] int64: the token of each assignment, in expert order (N = tokens * top_k)
    weight: torch.Tensor  # [N]: its routing weight
    start: torch.Tensor  # [E] int32: first assignment of each expert
    count: torch.Tensor  # [E] int32: assignments of each expert
    max_count: int | None  # None when not asked for (it costs a device sync)
    order: torch.Tensor | None = None  # [N] int64: the flat (token, k) position of each sorted assignment


def sort_by_expert(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                   max_count: bool = True) -> SortedRouting:
    """`topk_ids`, `topk_weights` `[T, k]` -> assignments grouped by expert (stable within an expert).
    `max_count=False` skips the largest count (a host read, so a device sync on a GPU)."""
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2:
        raise ValueError(f"topk ids and weights must both be [tokens, k], got {tuple(topk_ids.shape)} "
                         f"and {tuple(topk_weights.shape)}")
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    count = torch.bincount(flat, minlength=num_experts)
    start = torch.cumsum(count, 0) - count
    most = (int(count.max()) if flat.numel() else 0) if max_count else None
    return SortedRouting(order // topk_ids.shape[1], topk_weights.reshape(-1)[order], start.to(torch.int32),
                         count.to(torch.int32), most, order)
