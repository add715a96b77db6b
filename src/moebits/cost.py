"""Cost models C_u(c): exact storage, an analytic roofline latency for a named GPU, and the budget
conversions the CLI needs (`--bits 3.25`, `--memory-gb X`).

Every function returns a `[U, C]` matrix (unit x choice) so that the allocators never see the model:
they get `loss [U, C]`, `cost [U, C]` and a budget in the same unit as `cost`.

Storage is exact (it calls `Choice.storage_bits`, zero points stored as the run's `zero_points` says:
"packed" integer zeros at the code width, or "fp16"), so a plan that fits the budget here fits on disk
(up to the < 1 byte per stored set a packed zero bitstream is rounded up to).
Latency is a *model*: a roofline per GEMM, good for ranking choices and for the budget's order of
magnitude, not a measurement. Its assumptions are spelled out on `latency_matrix`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .units import DEFAULT_ZERO_POINTS, Choice

BITS_PER_BYTE = 8
BYTES_PER_GB = 1e9  # decimal gigabytes, as disk sizes and GPU datasheets count them


# --------------------------------------------------------------------------------------------- storage


def storage_matrix(shapes: Sequence[tuple[int, int]], choices: Sequence[Choice],
                   zero_points: str = DEFAULT_ZERO_POINTS) -> np.ndarray:
    """`[U, C]` exact storage in bits of unit u (shape `(out, in)`) under choice c, zero points stored as
    `zero_points` says ("packed" | "fp16", see units.py).

    Float64 holds these integers exactly (< 2**53 bits per entry and per model), and float is what the
    allocators want. Computed once per distinct shape: MoE units come in two or three shapes only.
    """
    shapes_arr = _shapes_array(shapes)
    uniq, inverse = np.unique(shapes_arr, axis=0, return_inverse=True)
    per_shape = np.array([[c.storage_bits(int(o), int(i), zero_points) for c in choices] for o, i in uniq], dtype=np.float64)
    return per_shape.reshape(len(uniq), len(choices))[inverse.reshape(-1)]


def num_weights(shapes: Sequence[tuple[int, int]]) -> int:
    """Number of weights over the units: the denominator of "average bits per weight"."""
    s = _shapes_array(shapes)
    return int((s[:, 0] * s[:, 1]).sum())


def avg_bits_to_total_bits(avg_bits: float, shapes: Sequence[tuple[int, int]]) -> float:
    """`--bits 3.25` -> a budget in total bits over the units (metadata included, as in "W3.25")."""
    return float(avg_bits) * num_weights(shapes)


def total_bits_to_avg_bits(total_bits: float, shapes: Sequence[tuple[int, int]]) -> float:
    return float(total_bits) / num_weights(shapes)


def bits_to_gb(total_bits: float) -> float:
    return float(total_bits) / BITS_PER_BYTE / BYTES_PER_GB


def gb_to_bits(gb: float) -> float:
    return float(gb) * BYTES_PER_GB * BITS_PER_BYTE


def memory_gb_to_total_bits(memory_gb: float, fixed_bits: float = 0.0) -> float:
    """`--memory-gb X` -> the bits left for the units once the parts not allocated (attention,
    embeddings, routers, kept at a fixed setting: `fixed_bits`) are paid for."""
    return gb_to_bits(memory_gb) - float(fixed_bits)


def avg_bits_formatter(shapes: Sequence[tuple[int, int]]) -> Callable[[float], str]:
    """A formatter for `allocate(..., budget_format=...)`: total bits -> "3.250 bits per weight (x GB)"."""
    n = num_weights(shapes)
    return lambda bits: f"{bits / n:.3f} bits per weight ({bits_to_gb(bits):.3f} GB)"


# --------------------------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures of one GPU; dense (no 2:4 sparsity) tensor-core peaks."""

    name: str
    bandwidth: float  # bytes/s of device memory
    fp16_flops: float  # dense fp16/bf16 tensor-core FLOP/s (fp32 accumulate)
    int8_ops: float | None = None  # dense int8 tensor-core OP/s, for W8A8-style kernels
    int4_ops: float | None = None

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a GEMM is compute-bound."""
        return self.fp16_flops / self.bandwidth


# Sources (checked 2025 via the search tool; all dense, i.e. without 2:4 sparsity):
# - A100-SXM4-80GB: 2.039 TB/s HBM2e; 312 TFLOP/s fp16/bf16 tensor; int8 624, int4 1248 TOPS.
#   https://glennklockwood.com/garden/processors/A100 (quoting NVIDIA's A100 datasheet, nvidia-a100-datasheet r4)
# - H100-SXM5-80GB: 3.35 TB/s HBM3; 989.4 TFLOP/s fp16/bf16 tensor; int8 1978.9 TOPS (Hopper has no int4 tensor path).
#   https://glennklockwood.com/garden/processors/h100 ; NVIDIA's table (sparse figures, "1/2 lower without
#   sparsity": 1,979 bf16 -> 989.5) at https://archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html
# - GeForce RTX 4090: 1008 GB/s GDDR6X; 165.2 TFLOP/s fp16 tensor with fp32 accumulate (330.3 with fp16
#   accumulate); int8 660.6, int4 1321.2 TOPS. https://waredb.com/processor/nvidia-geforce-rtx-4090 (figures
#   of NVIDIA's Ada architecture whitepaper, appendix table for the RTX 4090).
GPUS: dict[str, GPUSpec] = {
    "a100": GPUSpec("A100-SXM4-80GB", 2.039e12, 312e12, 624e12, 1248e12),
    "h100": GPUSpec("H100-SXM5-80GB", 3.35e12, 989.4e12, 1978.9e12, None),
    "rtx4090": GPUSpec("GeForce RTX 4090", 1.008e12, 165.2e12, 660.6e12, 1321.2e12),
}

DEFAULT_LAUNCH_OVERHEAD_S = 5e-6  # per kernel: launch + tail effects of a small GEMM, order of magnitude
ACT_BYTES = 2  # fp16/bf16 activations (weight-only quantization: W{b}A16)
ACT_SCALE_BYTES = 2  # one fp16 scale per token of a quantized activation (per-token symmetric, quant/act.py)


def compute_peak(gpu: GPUSpec, choice: Choice) -> float:
    """The tensor-core peak a GEMM under `choice` can run at. Integer tensor cores need *both* operands
    integer: with activations at a <= 8 bits and weights at b <= 8 bits the GEMM runs on int8 (5..8-bit
    codes held in int8), on int4 when both are <= 4 bits and the GPU has an int4 path (A100, RTX 4090;
    Hopper has none, so int8). Weight-only quantization (a = 16) dequantizes to fp16: the fp16 peak."""
    if choice.quantizes_acts and not choice.is_fp:
        if max(choice.bits, choice.act_bits) <= 4 and gpu.int4_ops:
            return gpu.int4_ops
        if gpu.int8_ops:
            return gpu.int8_ops
    return gpu.fp16_flops


def get_gpu(gpu: str | GPUSpec) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    try:
        return GPUS[gpu.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPUS)} (or pass a GPUSpec)") from None


def latency_matrix(
    shapes: Sequence[tuple[int, int]],
    frequencies: Sequence[float],
    choices: Sequence[Choice],
    gpu: str | GPUSpec,
    batch_tokens: int,
    launch_overhead_s: float = DEFAULT_LAUNCH_OVERHEAD_S,
    zero_points: str = DEFAULT_ZERO_POINTS,
) -> np.ndarray:
    """`[U, C]` expected seconds one forward over `batch_tokens` tokens spends in unit u under choice c.

    Roofline per GEMM `(m x in) @ (in x out)`:
        t(m) = launch_overhead + max((W_c + 2 * m * (in + out)) / bandwidth,  2 * m * in * out / peak_fp16)
    where `W_c` is the exact stored size in bytes (codes + scales + zeros + compensator), so fewer bits
    means fewer bytes moved, and the GEMM runs in fp16 after dequantization (weight-only quantization;
    the dequantization FLOPs are *ignored*: fused kernels hide them under the weight load).

    Activation bits (`Choice.act_bits = a < 16`): the input is read as `a`-bit codes plus a 16-bit scale
    per token (`m * (in * a / 8 + 2)` bytes instead of `2 * m * in`; the output stays 16-bit), and the
    GEMM runs at `compute_peak(gpu, c)`: int8 (or int4) tensor cores when both operands are integer.

    Tokens: the brief form is `m = f_u * batch_tokens`. We take its expectation instead, because an expert
    that receives no token is skipped entirely (no weight load, no launch): with tokens routed
    independently, unit u is active with probability `p_u = 1 - (1 - f_u)^B` and then receives
    `m_u = f_u * B / p_u` tokens on average, so

        E[t_u] = p_u * t(f_u * B / p_u).

    For large B, `p_u -> 1` and this is the brief form; for decoding (B = 1) it charges a rarely routed
    expert only `f_u` of its weight load, which is what makes latency budgets frequency-aware. A shared
    expert has `f_u = 1` and always runs. The sum over units is the time of running the units one after
    the other (a grouped MoE kernel overlaps them; the model then overestimates by the launch overheads).
    """
    gpu = get_gpu(gpu)
    p, moved, flops = expected_traffic(shapes, frequencies, choices, batch_tokens, zero_points)
    peak = np.array([compute_peak(gpu, c) for c in choices], dtype=np.float64)[None, :]  # [1, C]
    t = launch_overhead_s + np.maximum(moved / gpu.bandwidth, flops / peak)
    return p[:, None] * t


def expected_traffic(shapes: Sequence[tuple[int, int]], frequencies: Sequence[float], choices: Sequence[Choice],
                     batch_tokens: int, zero_points: str = DEFAULT_ZERO_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What one forward over `batch_tokens` tokens asks of each unit, *when it runs*: `p [U]` the
    probability it runs at all, `moved [U, C]` bytes moved (weights under each choice + activations
    in and out, activations at each choice's `act_bits`) and `flops [U, 1]`, both for its `m_u = f_u * B / p_u` tokens (see `latency_matrix`).
    Shared by the latency and the energy models, so both charge the same work."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    s = _shapes_array(shapes).astype(np.float64)
    f = np.asarray(frequencies, dtype=np.float64)
    if f.shape != (len(s),):
        raise ValueError(f"frequencies has shape {f.shape}, expected ({len(s)},) like shapes")
    if not np.all(np.isfinite(f)) or np.any(f < 0) or np.any(f > 1):
        raise ValueError("frequencies must be in [0, 1] (fraction of tokens routed to the unit)")
    out_f, in_f = s[:, 0:1], s[:, 1:2]
    weight_bytes = storage_matrix(shapes, choices, zero_points) / BITS_PER_BYTE  # [U, C]
    p = 1.0 - (1.0 - f) ** batch_tokens  # [U] probability the unit runs at all
    m = np.divide(f * batch_tokens, p, out=np.zeros_like(f), where=p > 0)[:, None]  # tokens when it runs
    # input activations: 16-bit, or a-bit codes + a 16-bit scale per token; outputs 16-bit
    act = np.array([c.act_bits for c in choices], dtype=np.float64)[None, :]  # [1, C]
    quantized = act < 16
    in_bytes_per_token = np.where(quantized, in_f * act / BITS_PER_BYTE + ACT_SCALE_BYTES, ACT_BYTES * in_f)  # [U, C]
    moved = weight_bytes + m * (in_bytes_per_token + ACT_BYTES * out_f)
    flops = 2.0 * m * in_f * out_f
    return p, moved, flops


def _shapes_array(shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    s = np.asarray(shapes, dtype=np.int64).reshape(-1, 2) if len(shapes) else np.zeros((0, 2), np.int64)
    if np.any(s <= 0):
        raise ValueError("unit shapes must be positive (out_features, in_features)")
    return s
