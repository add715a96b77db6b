"""uniform: one bit-width for every unit, the largest whose exact storage fits the budget (RTN / GPTQ /
HQQ at one width; `--wbits N` fixes the width instead). Nothing is measured."""
from __future__ import annotations

from ..units import FP_BITS, Choice
from . import Method, register_method


class Uniform(Method):
    name, solver, profiles = "uniform", "uniform", False
    description = "one bit-width for every unit"

    def choices(self, cfg, shapes=None) -> list[Choice]:
        """Every bit-width the quantizer has, so the budget picks the largest fitting one."""
        bits = (1, 2, 3, 4, 8) if cfg.quantizer == "hqq" else (2, 3, 4, 5, 6, 7, 8)
        return [Choice(b, cfg.group_size, cfg.quantizer) for b in (*bits, FP_BITS)]


register_method(Uniform())
