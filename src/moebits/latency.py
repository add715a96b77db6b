"""Latency FRI (FRI-MxMoE Sec. 3.2, Fig. 2, Alg. 1 lines 6 and 22): *measure* the kernel latency of a
few (M, N, K, bits) anchors on the machine at hand and interpolate the rest with a second
`FRIRegressor`, giving the `[U, C]` latency matrix an allocator can budget against.

The kernel (weight-only quantization, W{b}A16-style, unfused):

    codes (uint8) + fp16 scale/zero per group of `group_size` input columns
        -> dequantize to the compute dtype -> x [M, K] @ w.T [K, N]

and for 16 bits a plain matmul against the weight held in the compute dtype. The compute dtype is
float16 on CUDA and float32 on CPU (CPU half-precision GEMMs are emulated and would measure the
emulation, not the kernel).

Code layout (`layout`):

* `"bitplane"` (default): the codes are stored as `bits` bit-planes packed 8 per uint8 byte, so a
  b-bit weight really occupies b/8 bytes and unpacking costs work proportional to b, as in a real
  packed kernel. Latency then depends on the bit-width, which is what a latency budget trades.
* `"byte"`: one code per uint8 byte (the literal reading of "uint8 codes"). Every quantized bit-width
  moves the same bytes and does the same work, so 2/3/4/8 bits measure alike: with the usual choices
  {2,3,4,8} a latency budget cannot tell them apart. Kept to show exactly that.

Activation bits (`KernelPoint.act_bits < 16`, W-A choices): the kernel quantizes `x` per token to
integer codes (the run-time work of quant/act.py) and multiplies integer codes on the integer GEMM
(`torch._int_mm`, int8 x int8 -> int32; weights held as int8 codes shifted by their zero point, a
per-row scale), then rescales. That is the W8A8-style path every a <= 8 bit width runs on here (int4
tensor-core kernels have no torch entry point), so what the feature buys is the integer-GEMM speed
and the quantization overhead the machine at hand really has.

Measurement: `warmup` untimed calls, then the median of `repeats` timed calls
(`torch.cuda.synchronize` around each on CUDA). Inputs are random; latency does not depend on values.

Features of a latency rule (Table 7's latency module, minus the GPU-kernel descriptors -- tiling,
stages, fusion, threads -- that an unfused PyTorch kernel does not have): log M, log N, log K, bits,
log FLOPs (2MNK), log bytes (stored weight bytes, exact, + activations in at their bits and out in
fp16), and the activation bits (the paper's latency rules have it; 16 = not quantized). FRI
interpolates log latency (`target="log"`), i.e. a weighted geometric mean of neighbouring anchors.

Tokens per unit follow `cost.latency_matrix`: with `B = batch_tokens` tokens routed independently,
unit u runs with probability `p_u = 1 - (1 - f_u)^B` on `m_u = f_u B / p_u` tokens on average and
costs `E[t_u] = p_u * t(m_u)`; for B in the thousands `p_u ~ 1` and this is `t(f_u B)`.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .methods.fri.interpolation import FRIRegressor
from .units import FP_BITS, Choice

LAYOUTS = ("bitplane", "byte")
FEATURES = ("log_M", "log_N", "log_K", "bits", "log_flops", "log_bytes", "act_bits")


@dataclass(frozen=True)
class KernelPoint:
    """One latency measurement point: the GEMM `(M x K) @ (K x N)` with a `bits`-bit weight and
    `act_bits`-bit activations (16: not quantized)."""
    M: int
    N: int
    K: int
    bits: int
    act_bits: int = FP_BITS


def compute_dtype(device: str | torch.device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _padded_k(K: int, group_size: int) -> tuple[int, int]:
    """(group width, K padded to whole groups); groups are multiples of 8 so bit-planes pack exactly."""
    g = K if group_size <= 0 else group_size
    g = 8 * math.ceil(g / 8)
    return g, g * math.ceil(K / g)


def make_int_kernel(N: int, K: int, bits: int, act_bits: int, device: str | torch.device = "cpu", seed: int = 0):
    """A closure `x [M, K] -> y [M, N]`: per-token symmetric quantization of x to `act_bits`, integer GEMM
    with the `bits`-bit weight codes (int8 storage), rescale by token and row scales."""
    from .quant.act import check_act_bits

    check_act_bits(act_bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"an integer GEMM needs quantized weights (1..8 bits), got {bits}")
    device = torch.device(device)
    dtype = compute_dtype(device)
    gen = torch.Generator().manual_seed(seed)
    w_codes = (torch.randint(0, 2 ** bits, (N, K), generator=gen, dtype=torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    w_t = w_codes.T.contiguous().to(device)  # [K, N]
    w_scale = (torch.rand(N, generator=gen) * 0.01 + 1e-3).to(device, dtype)
    qmax = 2 ** (act_bits - 1) - 1

    def run(x):
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
        xq = torch.clamp(torch.round(x / s), -qmax, qmax).to(torch.int8)
        if xq.shape[0] <= 16:  # torch._int_mm needs M > 16: pad the (rare) tiny batches
            xq = torch.cat([xq, xq.new_zeros(17 - xq.shape[0], xq.shape[1])])
        acc = torch._int_mm(xq, w_t)[: x.shape[0]]
        return acc.to(dtype) * s * w_scale

    return run


def make_kernel(N: int, K: int, bits: int, group_size: int = 128, layout: str = "bitplane",
                device: str | torch.device = "cpu", seed: int = 0, act_bits: int = FP_BITS):
    """A closure `x [M, K] -> y [M, N]` running the quantized (or 16-bit) kernel on random weights;
    with `act_bits < 16` and quantized weights, the integer W-A kernel (`make_int_kernel`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if act_bits != FP_BITS and bits != FP_BITS:
        return make_int_kernel(N, K, bits, act_bits, device, seed)
    device = torch.device(device)
    dtype = compute_dtype(device)
    gen = torch.Generator().manual_seed(seed)
    if bits == FP_BITS:
        w = torch.randn(N, K, generator=gen).to(device, dtype)
        return lambda x: x @ w.T
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 or {FP_BITS}, got {bits}")
    g, Kp = _padded_k(K, group_size)
    G = Kp // g
    codes = torch.randint(0, 2 ** bits, (N, Kp), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(N, G, 1, generator=gen) * 0.01 + 1e-3).half().to(device)
    zero = torch.full((N, G, 1), float(2 ** (bits - 1)), dtype=torch.float16, device=device)
    if layout == "byte":
        packed = codes.to(device)

        def unpack():
            return packed
    else:
        # plane k holds bit k of every code, 8 codes per byte: planes [bits, N, Kp / 8]
        planes = ((codes[None] >> torch.arange(bits, dtype=torch.uint8)[:, None, None]) & 1).view(bits, N, Kp // 8, 8)
        planes = (planes << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).to(device)
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        place = (2 ** torch.arange(bits, dtype=torch.uint8, device=device))[:, None, None, None]

        def unpack():
            b = (planes[..., None] >> shifts) & 1  # [bits, N, Kp/8, 8]
            return (b * place).sum(0, dtype=torch.uint8).view(N, Kp)

    def run(x):
        w = ((unpack().view(N, G, g).to(dtype) - zero.to(dtype)) * scale.to(dtype)).view(N, Kp)[:, :K]
        return x @ w.T

    return run


@contextmanager
def cpu_threads(n: int | None):
    """Temporarily run torch's CPU ops on `n` threads (None: leave as is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_latency(point: KernelPoint, group_size: int = 128, layout: str = "bitplane",
                    device: str | torch.device = "cpu", warmup: int = 3, repeats: int = 15, seed: int = 0,
                    threads: int | None = None) -> float:
    """Median seconds of one call of the kernel at `point`.

    `threads`: torch CPU threads while measuring (None: the current setting). On a CPU shared with other
    work, intra-op threads wait on each other at every barrier and a 10-microsecond GEMM can take 30 ms;
    one thread measures the kernel rather than the scheduler."""
    device = torch.device(device)
    fn = make_kernel(point.N, point.K, point.bits, group_size, layout, device, seed, point.act_bits)
    x = torch.randn(max(1, point.M), point.K, generator=torch.Generator().manual_seed(seed + 1)).to(device,
                                                                                                    compute_dtype(device))
    with torch.no_grad(), cpu_threads(threads):
        for _ in range(warmup):
            fn(x)
        _sync(device)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes(N: int, K: int, bits: int, group_size: int = 128) -> float:
    # the kernels measured here read an fp16 zero per group (make_kernel), so their bytes count it so
    return Choice(bits, group_size).storage_bits(N, K, zero_points="fp16") / 8


def features(points: Sequence[KernelPoint], group_size: int = 128) -> np.ndarray:
    """`[n, 6]` latency-rule antecedents, columns `FEATURES`."""
    rows = []
    for p in points:
        M = max(1, p.M)
        x_bytes = 2 * M * p.K if p.act_bits == FP_BITS else M * (p.K * p.act_bits / 8 + 2)  # + a scale per token
        moved = weight_bytes(p.N, p.K, p.bits, group_size) + x_bytes + 2 * M * p.N
        rows.append([math.log(M), math.log(p.N), math.log(p.K), p.bits, math.log(2.0 * M * p.N * p.K), math.log(moved),
                     p.act_bits])
    return np.array(rows, dtype=np.float64).reshape(-1, len(FEATURES))


def anchor_grid(shapes: Sequence[tuple[int, int]], bits: Sequence, m_min: int, m_max: int,
                n_anchors: int, seed: int = 0) -> list[KernelPoint]:
    """About `n_anchors` points covering every distinct (N, K) and bit-width (an int, or a
    `(bits, act_bits)` pair for W-A choices): per (shape, bits) cell,
    M on a log grid spanning [m_min, m_max] with a seeded random offset (so two seeds give different,
    interleaved grids). Every cell gets at least its two ends."""
    cells = sorted({(int(o), int(i)) for o, i in shapes})
    bits = sorted(set((b, FP_BITS) if isinstance(b, (int, np.integer)) else (int(b[0]), int(b[1])) for b in bits))
    per_cell = max(2, round(n_anchors / max(1, len(cells) * len(bits))))
    lo, hi = math.log(max(1, m_min)), math.log(max(m_min, m_max, 1))
    rng = np.random.default_rng(seed)
    out = []
    for N, K in cells:
        for b in bits:
            step = (hi - lo) / (per_cell - 1) if hi > lo else 0.0
            offs = rng.uniform(-0.5, 0.5, per_cell) * step * 0.5
            offs[0], offs[-1] = 0.0, 0.0  # the ends are exact: no extrapolation in M
            ms = sorted({max(1, int(round(math.exp(lo + k * step + o)))) for k, o in enumerate(offs)})
            out += [KernelPoint(m, N, K, b[0], b[1]) for m in ms]
    return out


def expected_tokens(frequencies: np.ndarray, batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(p_u, m_u): probability that unit u runs in a batch of `batch_tokens`, and its tokens when it does."""
    f = np.asarray(frequencies, dtype=np.float64)
    p = 1.0 - (1.0 - f) ** batch_tokens
    m = np.divide(f * batch_tokens, p, out=np.zeros_like(f), where=p > 0)
    return p, m


def latency_fri_matrix(shapes: Sequence[tuple[int, int]], frequencies: Sequence[float], choices: Sequence[Choice],
                       batch_tokens: int, anchors: int | Sequence[KernelPoint] = 48, holdout: int = 8,
                       seed: int = 0, device: str | torch.device = "cpu", layout: str = "bitplane",
                       n_neighbors: int = 4, warmup: int = 3, repeats: int = 15,
                       threads: int | None = None,
                       measure: Callable[[KernelPoint], float] | None = None) -> tuple[np.ndarray, dict]:
    """`[U, C]` predicted seconds of unit u (shape `(out, in)`) under choice c, from measured anchors.

    `anchors`: a number of anchor points (placed by `anchor_grid` over the model's distinct shapes, the
    choices' bit-widths and the units' token range) or an explicit list of `KernelPoint`s. `holdout`
    extra points at random (shape, bits, M) are measured too, never fitted, and reported in `info`
    as the prediction error of the latency FRI. All choices must share one group size. `threads`: see
    `measure_latency`. `measure`: seconds of one point instead of timing the kernel here (a latency
    table from another machine, or a known function when checking the interpolation itself).
    """
    s = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    f = np.asarray(frequencies, dtype=np.float64)
    if f.shape != (len(s),):
        raise ValueError(f"frequencies has shape {f.shape}, expected ({len(s)},) like shapes")
    if not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f > 1):
        raise ValueError("frequencies must be in [0, 1] (fraction of tokens routed to the unit)")
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    group_sizes = {c.group_size for c in choices if not c.is_fp}
    if len(group_sizes) > 1:
        raise ValueError(f"all quantized choices must share one group size, got {sorted(group_sizes)}")
    if any(c.rank for c in choices):
        raise NotImplementedError("latency of low-rank compensators is not modelled")
    group_size = group_sizes.pop() if group_sizes else 128
    p, m = expected_tokens(f, batch_tokens)
    active = p > 0
    m_int = np.maximum(1, np.rint(m)).astype(np.int64)
    m_lo, m_hi = (int(m_int[active].min()), int(m_int[active].max())) if active.any() else (1, 1)
    bits = sorted({(c.bits, c.act_bits if not c.is_fp else FP_BITS) for c in choices})

    t0 = time.perf_counter()
    if isinstance(anchors, (int, np.integer)):
        points = anchor_grid(s.tolist(), bits, m_lo, m_hi, int(anchors), seed)
    else:
        points = list(anchors)
    if not points:
        raise ValueError("no latency anchors to measure")
    if measure is None:
        def measure(pt: KernelPoint) -> float:
            return measure_latency(pt, group_size, layout, device, warmup, repeats, seed, threads)
    y = np.array([measure(pt) for pt in points])
    rng = np.random.default_rng(seed + 1)
    cells = sorted({(int(o), int(i)) for o, i in s.tolist()})
    held = []
    for _ in range(holdout):
        N, K = cells[rng.integers(len(cells))]
        b, a = bits[rng.integers(len(bits))]
        held.append(KernelPoint(int(round(math.exp(rng.uniform(math.log(m_lo), math.log(max(m_lo, m_hi)))))), N, K,
                                int(b), int(a)))
    y_held = np.array([measure(pt) for pt in held])
    t_measure = time.perf_counter() - t0

    fri = FRIRegressor(n_neighbors=n_neighbors, target="log").fit(features(points, group_size), y)
    info = {"anchors": len(points), "measure_seconds": t_measure, "device": str(torch.device(device)),
            "layout": layout, "group_size": group_size, "M_range": (m_lo, m_hi), "points": points,
            "latency": y, "estimator": fri}
    if held:
        pred = fri.predict(features(held, group_size))
        ratio = pred / y_held
        info.update(holdout_points=held, holdout_latency=y_held, holdout_pred=pred,
                    holdout_median_abs_log_ratio=float(np.median(np.abs(np.log(ratio)))),
                    holdout_max_ratio=float(np.max(np.maximum(ratio, 1 / ratio))))

    # predict once per distinct (M, N, K, bits): units of one shape and frequency share their row
    U, C = len(s), len(choices)
    rows = {}
    for u in np.flatnonzero(active):
        for c, ch in enumerate(choices):
            a = FP_BITS if ch.is_fp else ch.act_bits
            rows.setdefault(KernelPoint(int(m_int[u]), int(s[u, 0]), int(s[u, 1]), ch.bits, a), []).append((u, c))
    lat = np.zeros((U, C))
    if rows:
        keys = list(rows)
        pred = fri.predict(features(keys, group_size))
        for key, t in zip(keys, pred):
            for u, c in rows[key]:
                lat[u, c] = t
    lat *= p[:, None]  # a unit that receives no token is skipped
    return lat, info
