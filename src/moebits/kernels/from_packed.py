"""The kernel's view of a moebits packed checkpoint: one `PackedGroupedWeight` per fused tensor of an
experts module, sharing the stored tensors (no copy).

The packed format already stores what the kernel reads: per fused tensor (`gate_up`, `down`) and per
(bits, group size) set, one rectangular codes / scale / zero stack, a unit's rows contiguous. A unit
becomes a `Segment`: gate rows write output columns `[0, I)` of `gate_up`, up rows `[I, 2I)`.
"""
from __future__ import annotations

import torch

from ..packed.layout import EXPERT_TENSORS, PackedIndex
from ..units import FP_BITS, Unit
from .packed_weight import PackedGroupedWeight, Segment


def grouped_weights(index: PackedIndex, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, PackedGroupedWeight]:
    """`{"gate_up": ..., "down": ...}` of the experts module `prefix` (e.g. `model.layers.1.mlp.experts`).
    Refuses what the kernel does not run: fp16 rows, low-rank compensators, two group sizes in one tensor."""
    m = index.modules.get(prefix)
    if m is None or m.type != "experts":
        raise ValueError(f"{prefix!r} is not an experts module of this checkpoint")
    out = {}
    for tname, kinds in EXPERT_TENSORS.items():
        spec = m.tensors[tname]
        if any(s.bits == FP_BITS for s in spec.sets.values()) or spec.lowrank:
            raise ValueError(f"{prefix}.{tname}: the kernel runs quantized rows only (this tensor has fp16 rows "
                             "or low-rank compensators)")
        group_sizes = {s.group_size for s in spec.sets.values()}
        bits = [s.bits for s in spec.sets.values()]
        if len(group_sizes) != 1 or len(set(bits)) != len(bits):
            raise ValueError(f"{prefix}.{tname}: the kernel needs one group size and one set per bit-width, "
                             f"got sets {sorted(spec.sets)}")
        base = f"{prefix}.{tname}"
        by_set = {name: s.bits for name, s in spec.sets.items()}
        codes = {b: tensors[f"{base}.{name}.codes"] for name, b in by_set.items()}
        scales = {b: tensors[f"{base}.{name}.scale"] for name, b in by_set.items()}
        zeros = {b: tensors[f"{base}.{name}.zero"] for name, b in by_set.items()}
        segments = []
        for name, e in index.units.items():
            if e.module != prefix or e.tensor != tname:
                continue
            u = Unit.parse(name)
            col0 = m.intermediate if u.kind == "up" else 0
            segments.append(Segment(int(u.expert), by_set[e.set], e.row, e.rows, col0))
        out_features = 2 * m.intermediate if tname == "gate_up" else m.hidden
        out[tname] = PackedGroupedWeight(m.num_experts, out_features, spec.in_features, group_sizes.pop(), codes,
                                         scales, zeros, segments)
    return out
