"""A cheap per-(unit, choice) proxy of the quantization error, available for *every* unit.

    proxy[u, c] = sum_ij (W_q - W)_ij^2 * E[g^2 x_j^2]  = tr(dW diag(E[g^2 x x^T]) dW^T)

with W_q the round-to-nearest (RTN) quantization of unit u's weight at choice c's bits and group size,
x the unit's input (hidden states for gate/up, act(gate x) * up x for down) on the expert's calibration
sample and g the routing weight. It is the expected squared output error of the block itself under a
diagonal approximation of its input covariance: no GPTQ, no Hessian, no quantized forward, one RTN per
pair and one unquantized forward of each expert's gate/up on its sample (for down's input moments).

Why it helps: the profiled error (expert-local, GPTQ) is within-bit rank-correlated with it at
rho ~0.93 per kind on the demo, and the ratio error / proxy of one unit is nearly the same at every
bit-width (median sd of its log 0.06), so a regressor on log error with log proxy as a feature, plus
one measured pair of a unit, pins that unit's whole row. The cost is measured and reported (`seconds`)
and counted in the profiling cost by the pipeline and the benchmarks.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ...quant.rtn import quantize_rtn
from ...units import Choice, Unit

@dataclass
class Proxy:
    values: np.ndarray  # [U, C] proxy error, 0 for unquantized choices
    seconds: float  # wall seconds it took (moments + RTN + weighted sums)


def _second_moments(adapter, layer: int, expert, inputs, profiler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[g^2 x^2] of the expert input [H], E[g^2 h^2] of the down input [I]) on its calibration sample.
    With a `profiler` measuring on the same inputs, the down input comes from its reference forward
    (the same numbers), which it then keeps for the pairs it measures later."""
    inp = inputs[(layer, expert)]
    x = inp.x.float()
    g2 = (inp.g.float() ** 2)[:, None]
    if profiler is not None and profiler.inputs is inputs:
        h = profiler.intermediate(layer, expert).float()
    else:
        h = adapter.expert_intermediate(layer, expert, x.to(adapter.weight(Unit(layer, expert, "gate")).dtype)).float()
    n = max(1, x.shape[0])
    return (g2 * x * x).sum(0) / n, (g2 * h * h).sum(0) / n


@torch.no_grad()
def rtn_proxy(adapter, units: list[Unit], choices: list[Choice], inputs, profiler=None) -> Proxy:
    """`Proxy` for `units` x `choices` (RTN at each choice's bits and group size, whatever its quantizer).
    `profiler`: an `ExpertProfiler` on `inputs` whose reference forwards it shares (see `_second_moments`)."""
    t0 = time.perf_counter()
    values = np.zeros((len(units), len(choices)))
    moments = {}
    by_group: dict[tuple, list[int]] = defaultdict(list)  # (layer, kind, shared) -> unit rows: one batched RTN
    for i, u in enumerate(units):
        key = (u.layer, u.expert)
        if key not in moments:
            moments[key] = _second_moments(adapter, u.layer, u.expert, inputs, profiler)
        by_group[(u.layer, u.kind, u.is_shared)].append(i)
    for (_, kind, _), rows in by_group.items():
        w = torch.stack([adapter.weight(units[i]).float() for i in rows])  # [n, out, in]
        if not bool(torch.isfinite(w).all()):  # quantize_weight's check, once per group
            raise FloatingPointError(f"a {tuple(w.shape)} weight to quantize with RTN is not finite: check the checkpoint")
        m = torch.stack([moments[(units[i].layer, units[i].expert)][1 if kind == "down" else 0] for i in rows])
        for j, c in enumerate(choices):
            if c.is_fp:
                continue
            wq = quantize_rtn(w, c.bits, c.group_size)  # what quantize_weight(w, Choice(bits, group, "rtn")) runs
            values[rows, j] = torch.einsum("noi,ni->n", (wq - w) ** 2, m).double().numpy()
    return Proxy(np.maximum(values, 0.0), time.perf_counter() - t0)
