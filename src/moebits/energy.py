"""Energy model E_u(c): joules one forward over `batch_tokens` tokens spends in unit u under choice c.

    E = e_byte * (bytes moved from device memory) + e_flop * (FLOPs)

with the same traffic and FLOP counts as the roofline latency of `cost.latency_matrix`: the unit's
stored weight `W_c` (codes + scales + zeros, exact) plus fp16 activations in and out, and `2 m in out`
FLOPs of an fp16 GEMM after dequantization (dequantization FLOPs ignored, as in the latency model), and
the same expectation over whether the unit runs at all (`p_u = 1 - (1 - f_u)^B`). Fewer bits move
fewer bytes, so energy falls with bits through the weight traffic only; the arithmetic is the same.

This is an *estimate* for ranking plans and for the seed's energy term, not a measurement. The
constants are per-operation energies of the classic table, not of any one GPU; pick an `EnergySpec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .cost import expected_traffic
from .units import DEFAULT_ZERO_POINTS, Choice


@dataclass(frozen=True)
class EnergySpec:
    name: str
    joules_per_byte: float  # moving one byte from device memory to the compute units
    joules_per_flop: float  # one fp16 FLOP (half a fused multiply-add)


# M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm at 0.9 V:
#   32-bit DRAM read 640 pJ -> 160 pJ per byte; fp16 multiply 1.1 pJ + fp16 add 0.4 pJ per FMA (2 FLOPs)
#   -> 0.75 pJ per FLOP. Off-chip DDR; HBM moves a byte for several times less, so this spec overstates
#   the memory share of an HBM GPU. It is the default because it is the published, citable table.
# A datasheet-based GPU estimate, "h100-tdp": the H100 SXM's 700 W TDP spread over its datasheet peaks
#   (3.35 TB/s HBM3, 989.4 TFLOP/s dense bf16; see cost.GPUS) -> at most 700/3.35e12 = 209 pJ per byte if
#   the whole board power went to memory traffic, and 700/989.4e12 = 0.71 pJ per FLOP if it all went to
#   arithmetic. Both are upper bounds of their term (the board's power is shared); use it for GPU-shaped ratios.
ENERGY_SPECS: dict[str, EnergySpec] = {
    "horowitz45nm": EnergySpec("Horowitz ISSCC 2014, 45 nm (DRAM + fp16 FMA)", 640e-12 / 4, (1.1e-12 + 0.4e-12) / 2),
    "h100-tdp": EnergySpec("H100 SXM TDP / datasheet peaks (upper bounds)", 700 / 3.35e12, 700 / 989.4e12),
}
DEFAULT_ENERGY = "horowitz45nm"


def get_energy_spec(spec: str | EnergySpec) -> EnergySpec:
    if isinstance(spec, EnergySpec):
        return spec
    try:
        return ENERGY_SPECS[spec.lower()]
    except KeyError:
        raise ValueError(f"unknown energy model {spec!r}; known: {sorted(ENERGY_SPECS)} "
                         "(or pass an EnergySpec)") from None


def energy_matrix(shapes: Sequence[tuple[int, int]], frequencies: Sequence[float], choices: Sequence[Choice],
                  batch_tokens: int, spec: str | EnergySpec = DEFAULT_ENERGY,
                  zero_points: str = DEFAULT_ZERO_POINTS) -> np.ndarray:
    """`[U, C]` expected joules of unit u under choice c for one forward over `batch_tokens` tokens."""
    spec = get_energy_spec(spec)
    p, moved, flops = expected_traffic(shapes, frequencies, choices, batch_tokens, zero_points)
    return p[:, None] * (spec.joules_per_byte * moved + spec.joules_per_flop * flops)
