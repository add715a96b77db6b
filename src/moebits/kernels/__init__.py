"""GPU kernels on the moebits packed format (optional extra `triton`).

`packed_weight` (torch only) describes one fused expert tensor packed per set (bits, group size);
`triton_grouped` is the Triton kernel (import it only when triton is installed); `moe` runs a layer's
routed experts; `from_packed` views a packed checkpoint's (or a loaded `PackedExperts`') tensors as
kernel weights. `packed/kernel_path.py` decides when a loaded packed model uses them.
"""
from __future__ import annotations

import importlib.util

from .packed_weight import LowRank, PackedGroupedWeight, Segment, WeightSet, dequantize_expert, unpack_codes
from .routing import SortedRouting, sort_by_expert


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


__all__ = ["PackedGroupedWeight", "Segment", "WeightSet", "LowRank", "dequantize_expert", "unpack_codes", "SortedRouting", "sort_by_expert",
           "triton_available"]
