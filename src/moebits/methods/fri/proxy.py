"""A cheap per-(unit, choice) proxy of the quantization error, available for *every* unit.

    proxy[u, c] = sum_ij (W_q - W)_ij^2 * E[g^2 x_j^2]  = tr(dW diag(E[g^2 x x^T]) dW^T)

with W_q the round-to-nearest (RTN) quantization of unit u's weight at choice c's bits and group size,
x the unit's input (hidden states for gate/up, act(gate x) * up x for down) on the expert's calibration
tokens and g the routing weight. It is the expected squared output error of the block itself under a
diagonal approximation of its input covariance: no GPTQ, no Hessian, no quantized forward, one RTN per
pair. The second moments E[g^2 x^2] are the calibration's (`ExpertInputs.m_in` / `m_down`, summed over
every routed token while calibrating): no forward at all. A calibration without them (saved before
they were collected, or collected without Hessians) costs one unquantized forward of each expert's
gate/up on its kept sample, for down's input moments.

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

from ...quant.rtn import group_view
from ...units import Choice, Unit

@dataclass
class Proxy:
    values: np.ndarray  # [U, C] proxy error, 0 for unquantized choices
    seconds: float  # wall seconds it took (moments + RTN + weighted sums)


def _second_moments(adapter, layer: int, expert, inputs, profiler=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[g^2 x^2] of the expert input [H], E[g^2 h^2] of the down input [I]): the calibration's when
    it has them (no forward), else on the kept sample `x`, its down input from a forward of the expert's
    gate/up. There, with a `profiler` measuring on the same inputs, the down input comes from its
    reference forward (the same numbers), which it then keeps for the pairs it measures later."""
    inp = inputs[(layer, expert)]
    if inp.m_in is not None and inp.m_down is not None:
        return inp.m_in.float(), inp.m_down.float()
    x = inp.x.float()
    g2 = (inp.g.float() ** 2)[:, None]
    if profiler is not None and profiler.inputs is inputs:
        h = profiler.intermediate(layer, expert).float()
    else:
        h = adapter.expert_intermediate(layer, expert, x.to(adapter.weight(Unit(layer, expert, "gate")).dtype)).float()
    n = max(1, x.shape[0])
    return _weighted_square_mean(g2, x, n), _weighted_square_mean(g2, h, n)


def _weighted_square_mean(g2: torch.Tensor, a: torch.Tensor, n: int) -> torch.Tensor:
    """`(g2 * a * a).sum(0) / n` (the same products in the same order), with one temporary instead of two."""
    t = g2 * a
    return t.mul_(a).sum(0) / n


def _rtn_squared_errors(w: torch.Tensor, m: torch.Tensor, choices: list[Choice]) -> dict[int, np.ndarray]:
    """{choice index: [n] sum_oi (W_q - W)_oi^2 m_i} for the weights `w [n, out, in]` (float32) at every
    quantized choice's bits and group size, W_q = `quantize_rtn(w, bits, group)`, bit for bit: each group
    size's grouped view, min and max are taken once for all bit-widths (they do not depend on the bits),
    then `quant.rtn.minmax_params`' and `round_codes`' arithmetic per bit-width, in place (the same
    operations on the same values; tests/test_profile_speed.py compares with `quantize_weight`)."""
    out: dict[int, np.ndarray] = {}
    k = w.shape[-1]
    for group_size in sorted({c.group_size for c in choices if not c.is_fp}):
        groups = group_view(w, group_size)  # [n, out, G, g]
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        constant = lo == hi
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        zero_group = (lo == 0) & (hi == 0)
        lo, hi = torch.where(zero_group, -1.0, lo), torch.where(zero_group, 1.0, hi)
        span, keep_span = hi - lo, constant & ~zero_group
        for j, c in enumerate(choices):
            if c.is_fp or c.group_size != group_size:
                continue
            qmax = 2 ** c.bits - 1
            scale = torch.where(keep_span, span, span / qmax).clamp(min=2.0 ** -24).half().float()
            if not bool(torch.isfinite(scale).all()):
                bad = ~torch.isfinite(scale)
                raise FloatingPointError(f"{int(bad.sum())} group(s) span a range fp16 scales cannot hold "
                                         f"(e.g. [{lo[bad][0].item():.3g}, {hi[bad][0].item():.3g}])")
            zero = torch.round(-lo / scale).clamp(0, qmax)[..., None]
            scale = scale[..., None]
            q = torch.div(groups, scale).round_().add_(zero).clamp_(0, qmax)  # round_codes
            q.sub_(zero).mul_(scale)  # the dequantized weight
            d = q.reshape(*w.shape[:-1], -1)[..., :k].sub(w).pow_(2)  # (wq - w) ** 2
            out[j] = torch.einsum("noi,ni->n", d, m).double().numpy()
    return out


@torch.no_grad()
def rtn_proxy(adapter, units: list[Unit], choices: list[Choice], inputs, profiler=None) -> Proxy:
    """`Proxy` for `units` x `choices` (RTN at each choice's bits and group size, whatever its quantizer).
    `profiler`: an `ExpertProfiler` on `inputs` whose reference forwards it shares where the inputs carry
    no second moments (see `_second_moments`)."""
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
        # what quantize_weight(w, Choice(bits, group, "rtn")) gives, its squared error weighted by m
        for j, err in _rtn_squared_errors(w, m, choices).items():
            values[rows, j] = err
    return Proxy(np.maximum(values, 0.0), time.perf_counter() - t0)
