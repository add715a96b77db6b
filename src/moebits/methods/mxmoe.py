"""mxmoe (MxMoE, Duanmu et al. ICML 2025): profile every unit x bit-width, allocate with an exact ILP."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..table import SensitivityTable
from ..units import Choice
from . import Method, register_method

if TYPE_CHECKING:  # pragma: no cover
    from ..job.in_memory import Pipeline


def fill_profiled(run: "Pipeline", choices: list[Choice]) -> SensitivityTable:
    """MxMoE: measure every unit x choice."""
    return run.measure(run.units, choices)


register_method(Method("mxmoe", fill_profiled, "ilp", description="MxMoE: full profiling + exact ILP"))
