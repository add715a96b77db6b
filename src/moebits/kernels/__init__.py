"""GPU kernels on the moebits packed format (optional extra `triton`).

`packed_weight` (torch only) describes one fused expert tensor packed per bit-width; `triton_grouped`
is the Triton kernel (import it only when triton is installed); `moe` runs a layer's routed experts.
"""
from __future__ import annotations

import importlib.util

from .packed_weight import PackedGroupedWeight, Segment, dequantize_expert, unpack_codes
from .routing import SortedRouting, sort_by_expert


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


__all__ = ["PackedGroupedWeight", "Segment", "dequantize_expert", "unpack_codes", "SortedRouting", "sort_by_expert",
           "triton_available"]
