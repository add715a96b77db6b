"""uniform: one bit-width for every unit, the largest whose exact storage fits the budget (RTN / GPTQ /
HQQ at one width; `--wbits N` fixes the width instead). Nothing is profiled."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..table import SensitivityTable
from ..units import FP_BITS, Choice
from . import Method, register_method

if TYPE_CHECKING:  # pragma: no cover
    from ..job.config import QuantizeConfig
    from ..job.in_memory import Pipeline


def uniform_choices(cfg: "QuantizeConfig") -> list[Choice]:
    """Every bit-width the quantizer has, so the budget picks the largest fitting one."""
    bits = (1, 2, 3, 4, 8) if cfg.quantizer == "hqq" else (2, 3, 4, 5, 6, 7, 8)
    return [Choice(b, cfg.group_size, cfg.quantizer) for b in (*bits, FP_BITS)]


def fill_unprofiled(run: "Pipeline", choices: list[Choice]) -> SensitivityTable:
    """A table without measurements: only the calibration's routing frequencies (uniform, freq)."""
    return SensitivityTable.unprofiled(run.units, choices, run.calib.frequency())


register_method(Method("uniform", fill_unprofiled, "uniform", uniform_choices, profiles=False,
                       description="one bit-width for every unit"))
