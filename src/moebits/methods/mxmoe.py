"""mxmoe (MxMoE, Duanmu et al. ICML 2025): every unit x bit-width measured, an exact ILP allocates.
(The base `Method`'s steps: one request for everything, the table as measured.)"""
from __future__ import annotations

from . import Method, register_method


class MxMoE(Method):
    name, solver = "mxmoe", "ilp"
    description = "MxMoE: full profiling + exact ILP"


register_method(MxMoE())
