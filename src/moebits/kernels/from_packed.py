"""The kernel's view of a moebits packed checkpoint: one `PackedGroupedWeight` per fused tensor of an
experts module, sharing the stored tensors (no copy).

The packed format already stores what the kernel reads: per fused tensor (`gate_up`, `down`) and per
(bits, group size, zero storage) set, one rectangular codes / scale stack with fp16 zeros or one packed
zero bitstream (or fp16 rows), a unit's rows
contiguous. A unit becomes a `Segment`: gate rows write output columns `[0, I)` of `gate_up`, up rows
`[I, 2I)`; its compensator, if any, a `LowRank` over the same columns (views of the stored `r{rank}`
stacks).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..packed.layout import EXPERT_TENSORS, ModuleSpec, PackedIndex, UnitEntry
from ..units import FP_BITS, Unit
from .packed_weight import FP16_BITS, LowRank, PackedGroupedWeight, Segment, WeightSet


def module_grouped_weights(spec: ModuleSpec, units: dict[str, UnitEntry],
                           get: Callable[[str], torch.Tensor]) -> dict[str, PackedGroupedWeight]:
    """`{"gate_up": ..., "down": ...}` of one experts module; `get(name)` returns a stored tensor by its
    name below the module (e.g. `gate_up.w3g128.codes`)."""
    if spec.type != "experts":
        raise ValueError("not an experts module")
    out = {}
    for tname in EXPERT_TENSORS:
        tspec = spec.tensors[tname]
        sets = {}
        for name, s in tspec.sets.items():
            if s.bits == FP_BITS:
                sets[name] = WeightSet(FP16_BITS, 0, get(f"{tname}.{name}.weight"))
            else:
                sets[name] = WeightSet(s.bits, s.group_size, get(f"{tname}.{name}.codes"),
                                       get(f"{tname}.{name}.scale"), get(f"{tname}.{name}.zero"), s.zero_bits)
        segments, lowrank = [], []
        for uname, e in units.items():
            if e.tensor != tname:
                continue
            u = Unit.parse(uname)
            col0 = spec.intermediate if u.kind == "up" else 0
            segments.append(Segment(int(u.expert), e.set, e.row, e.rows, col0))
            if e.lowrank:
                lowrank.append(LowRank(int(u.expert), col0, get(f"{tname}.{e.lowrank}.U")[e.slot],
                                       get(f"{tname}.{e.lowrank}.V")[e.slot]))
        out_features = 2 * spec.intermediate if tname == "gate_up" else spec.hidden
        out[tname] = PackedGroupedWeight(spec.num_experts, out_features, tspec.in_features, sets, segments, lowrank)
    return out


def grouped_weights(index: PackedIndex, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, PackedGroupedWeight]:
    """`{"gate_up": ..., "down": ...}` of the experts module `prefix` (e.g. `model.layers.1.mlp.experts`)
    of a checkpoint read as `tensors` (name -> tensor)."""
    m = index.modules.get(prefix)
    if m is None or m.type != "experts":
        raise ValueError(f"{prefix!r} is not an experts module of this checkpoint")
    units = {n: e for n, e in index.units.items() if e.module == prefix}
    return module_grouped_weights(m, units, lambda name: tensors[f"{prefix}.{name}"])
