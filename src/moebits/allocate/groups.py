"""Structure constraints: units of one group must take the same choice.

Solved generically by aggregation: a group is one "super-unit" whose loss and cost per choice are the
sums over its members (exact, because the objective and the budget are both sums), the solver runs on
groups, and the chosen index is broadcast back. Any solver therefore supports any grouping.

Builders from `Unit`s, combinable with `combine_groups` (units end up together if *any* grouping ties
them, i.e. connected components):

* `tie_gate_up`: gate and up of an expert share bits (MxMoE: they are one fused GEMM `gate_up_proj`).
* `expert_level`: gate, up and down of an expert share bits (the paper's Table 5 expert granularity).
* `layer_uniform`: all *routed* experts of a layer share one choice per kind (one bit-width per fused
  weight tensor); the shared expert is left free.
* `vllm_servable`: what vLLM's fused-MoE kernels need: all routed units of a layer (every expert, gate,
  up and down) share one choice; a shared expert's gate and up share one (vLLM merges them), its down is
  free. `--target vllm` adds this grouping and restricts the candidates to 4 and 8 bits.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components

from ..units import Unit


def factorize(keys: Iterable[Hashable]) -> np.ndarray:
    """Group ids 0..G-1 in order of first appearance."""
    seen: dict = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)


def tie_gate_up(units: Sequence[Unit]) -> np.ndarray:
    return factorize((u.layer, u.expert, "down" if u.kind == "down" else "gate_up") for u in units)


def expert_level(units: Sequence[Unit]) -> np.ndarray:
    return factorize((u.layer, u.expert) for u in units)


def layer_uniform(units: Sequence[Unit]) -> np.ndarray:
    return factorize((u.layer, u.kind) if not u.is_shared else (u.layer, u.expert, u.kind) for u in units)


def vllm_key(u: Unit) -> tuple:
    """The set of units vLLM runs with one quantization scheme (see `export/vllm_rules.py`)."""
    if not u.is_shared:
        return (u.layer, "routed")
    return (u.layer, "shared", "down" if u.kind == "down" else "gate_up")


def vllm_servable(units: Sequence[Unit]) -> np.ndarray:
    return factorize(vllm_key(u) for u in units)


def combine_groups(*groupings: np.ndarray) -> np.ndarray:
    """The finest grouping coarser than all of `groupings`: connected components of 'same group'."""
    if not groupings:
        raise ValueError("combine_groups needs at least one grouping")
    n = len(groupings[0])
    rows, cols = [], []
    for g in groupings:
        g = np.asarray(g)
        if g.shape != (n,):
            raise ValueError(f"all groupings must have shape ({n},), got {g.shape}")
        _, first = np.unique(g, return_index=True)
        _, inv = np.unique(g, return_inverse=True)
        rows.append(np.arange(n))
        cols.append(first[inv])  # link every unit to the first member of its group
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return factorize(labels)


def reduce_groups(loss: np.ndarray, cost: np.ndarray, groups, frequency=None):
    """Sum loss and cost per group. Returns `(group_loss, group_cost, group_frequency, inverse)` where
    `inverse[u]` is unit u's group row; group frequency is the members' mean (a group of one expert's
    blocks keeps the expert's frequency)."""
    groups = np.asarray(groups)
    U = loss.shape[0]
    if groups.shape != (U,):
        raise ValueError(f"groups must have shape ({U},) like the loss rows, got {groups.shape}")
    _, inverse = np.unique(groups, return_inverse=True)
    inverse = inverse.reshape(-1)
    G = int(inverse.max()) + 1
    member = csr_matrix((np.ones(U), (inverse, np.arange(U))), shape=(G, U))
    gf = None
    if frequency is not None:
        gf = (member @ np.asarray(frequency, dtype=np.float64)) / np.bincount(inverse, minlength=G)
    return member @ loss, member @ cost, gf, inverse
