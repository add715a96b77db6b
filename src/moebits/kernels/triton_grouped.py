"""Triton kernel: the routed experts' matmul on packed codes of mixed bit-widths.

    y[i, col0 + n] = sum_k x[i, k] * ((q[row0 + n, k] - zero) * scale)    for the tokens i routed to e

Tokens are sorted by expert (`sort_by_expert`), so expert `e` owns rows `[start[e], start[e] + count[e])`
of `x` and `y`. One launch per set (bits, group size, zero storage) present in the weight (the bit-width and the
zero width are compile-time constants, so the unpacking is specialised; 16 bits reads fp16 rows; a set
with packed integer zeros reads the zero of (row, group) from the set's bitstream at bit offset
`(row*G + g)*ZERO_BITS` with the same 16-bit window as the codes); its grid is (output
tiles of every segment in that set) x (token tiles). A program whose expert received fewer tokens than
its tile's first row does nothing, so at decode only the routed experts' codes are read from memory.
Codes are unpacked and dequantized in registers, in fp32, rounded to the activation dtype and fed to
`tl.dot` with an fp32 accumulator (full fp32 products for fp32 activations, no TF32): the result equals
`x @ dequant(W)^T` up to summation order.

`x` may hold two planes `[2, N, K]`: output columns from `alt_col` on read the second (gate and up of
one fused tensor fed different inputs, when their input transforms differ).

Requires a CUDA device, or `TRITON_INTERPRET=1` set before triton is first imported (CPU, slow: for
tests).
"""

import os

import torch
import triton
import triton.language as tl

from .packed_weight import FP16_BITS, PackedGroupedWeight


@triton.jit
def _packed_grouped_matmul(
    x_ptr, y_ptr, codes_ptr, scales_ptr, zeros_ptr, tile_seg_ptr, tile_n0_ptr, tok_start_ptr, tok_count_ptr,
    K, row_stride, G, group_size, ldx, ldy, plane_stride, alt_col, zero_nbytes,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GROUP_ALIGNED: tl.constexpr, ZERO_BITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert = tl.load(tile_seg_ptr + pid_n * 4)
    row0 = tl.load(tile_seg_ptr + pid_n * 4 + 1)
    seg_rows = tl.load(tile_seg_ptr + pid_n * 4 + 2)
    col0 = tl.load(tile_seg_ptr + pid_n * 4 + 3)
    n0 = tl.load(tile_n0_ptr + pid_n)
    count = tl.load(tok_count_ptr + expert)
    m0 = pid_m * BLOCK_M
    if m0 < count:
        start = tl.load(tok_start_ptr + expert)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seg_rows
        rows = (row0 + offs_n).to(tl.int64)  # rows of this set's codes
        tok = (start + offs_m).to(tl.int64)
        x_base = x_ptr + (col0 >= alt_col).to(tl.int64) * plane_stride
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_base + tok[:, None] * ldx + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            w_mask = mask_n[:, None] & mask_k[None, :]
            if BITS == 16:  # fp16 rows
                w = tl.load(codes_ptr + rows[:, None] * row_stride + offs_k[None, :], mask=w_mask,
                            other=0.0).to(x.dtype)
            else:
                bitpos = offs_k * BITS
                byte = bitpos >> 3
                shift = bitpos & 7
                c_ptr = codes_ptr + rows[:, None] * row_stride + byte[None, :]
                word = tl.load(c_ptr, mask=w_mask, other=0).to(tl.int32)
                if 8 % BITS != 0:  # a value may straddle two bytes (3, 5, 6, 7 bits)
                    hi_mask = w_mask & ((byte + 1) < row_stride)[None, :]
                    word = word | (tl.load(c_ptr + 1, mask=hi_mask, other=0).to(tl.int32) << 8)
                q = (word >> shift[None, :]) & ((1 << BITS) - 1)
                if GROUP_ALIGNED:  # the K block lies in one group: one scale and zero per row
                    meta = rows * G + k0 // group_size
                    meta_mask = mask_n
                else:
                    meta = rows[:, None] * G + (offs_k // group_size)[None, :]
                    meta_mask = w_mask
                scale = tl.load(scales_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
                if ZERO_BITS == 16:  # fp16 zeros [rows, G]
                    zero = tl.load(zeros_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
                else:  # integer zeros: value (row*G + g) of the set's bitstream, read as the codes are
                    zpos = meta * ZERO_BITS
                    zbyte = zpos >> 3
                    zword = tl.load(zeros_ptr + zbyte, mask=meta_mask, other=0).to(tl.int32)
                    if 8 % ZERO_BITS != 0:
                        zword = zword | (tl.load(zeros_ptr + zbyte + 1, mask=meta_mask & ((zbyte + 1) < zero_nbytes),
                                                 other=0).to(tl.int32) << 8)
                    zero = ((zword >> (zpos & 7).to(tl.int32)) & ((1 << ZERO_BITS) - 1)).to(tl.float32)
                if GROUP_ALIGNED:
                    scale = scale[:, None]
                    zero = zero[:, None]
                w = ((q.to(tl.float32) - zero) * scale).to(x.dtype)  # [BLOCK_N, BLOCK_K]
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + tok[:, None] * ldy + (col0 + offs_n)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(x: torch.Tensor) -> None:
    if x.is_cuda:
        return
    if not interpreted():
        raise RuntimeError("the packed Triton kernel needs a CUDA tensor; on a CPU it runs only under Triton's "
                           "interpreter (set TRITON_INTERPRET=1 before triton is first imported; slow, for tests)")


def block_m_for(max_tokens: int) -> int:
    """Decode (a few tokens per expert) pads to 16 rows, the smallest `tl.dot` tile; prefill uses 64."""
    return 16 if max_tokens <= 16 else (32 if max_tokens <= 32 else 64)


def packed_grouped_matmul(x_sorted: torch.Tensor, weight: PackedGroupedWeight, tok_start: torch.Tensor,
                          tok_count: torch.Tensor, max_tokens: int | None = None, block_n: int = 64,
                          block_k: int = 64, alt_col: int | None = None) -> torch.Tensor:
    """`x_sorted [N, in]` (tokens sorted by expert) -> `y [N, out]`, `y[i] = x[i] @ W_e^T` for i's expert e.

    `tok_start`, `tok_count` `[num_experts]` int32 locate each expert's tokens; `max_tokens` (an upper
    bound on the largest count, e.g. the number of tokens; computed, with a device sync, when not
    given) sizes the token grid. With `x_sorted [2, N, in]`, output columns `>= alt_col` read plane 1.
    Compensators (`weight.lowrank`) are not added here (see `moe.add_lowrank`).
    """
    _check_device(x_sorted)
    planes = x_sorted.dim() == 3
    if x_sorted.dim() not in (2, 3) or x_sorted.shape[-1] != weight.in_features or (planes and (
            x_sorted.shape[0] != 2 or alt_col is None)):
        raise ValueError(f"x must be [N, {weight.in_features}] (or [2, N, {weight.in_features}] with alt_col), "
                         f"got {tuple(x_sorted.shape)}")
    if x_sorted.dtype == torch.bfloat16 and not x_sorted.is_cuda:
        # Triton's interpreter multiplies bf16 wrongly and rounds to bf16 by truncation: there, bf16 runs in
        # fp32 (weights not rounded to bf16) and the result is rounded by torch
        y = packed_grouped_matmul(x_sorted.float(), weight, tok_start, tok_count, max_tokens, block_n, block_k, alt_col)
        return y.to(torch.bfloat16)
    x_sorted = x_sorted.contiguous()
    n = x_sorted.shape[-2]
    y = torch.empty(n, weight.out_features, dtype=x_sorted.dtype, device=x_sorted.device)
    if n == 0:
        return y
    tok_start, tok_count = tok_start.to(torch.int32), tok_count.to(torch.int32)
    if max_tokens is None:
        max_tokens = int(tok_count.max())
    if max_tokens <= 0:
        return y.zero_()
    block_m = block_m_for(max_tokens)
    plane_stride = x_sorted.stride(0) if planes else 0
    precision = "ieee" if x_sorted.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    for key, s in weight.sets.items():
        tile_seg, tile_n0 = weight.tiles(key, block_n, x_sorted.device)
        if tile_n0.numel() == 0:
            continue
        grid = (tile_n0.numel(), triton.cdiv(max_tokens, block_m))
        quantized = s.bits != FP16_BITS
        group = s.effective_group_size(weight.in_features)
        _packed_grouped_matmul[grid](
            x_sorted, y, s.codes, s.scales if quantized else s.codes, s.zeros if quantized else s.codes,
            tile_seg, tile_n0, tok_start, tok_count, weight.in_features, s.row_stride(weight.in_features),
            s.groups(weight.in_features), group, x_sorted.stride(-2), y.stride(0), plane_stride,
            weight.out_features if alt_col is None else alt_col, s.zeros.numel() if quantized else 0,
            BITS=s.bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision,
            GROUP_ALIGNED=group % block_k == 0, ZERO_BITS=s.zero_bits if quantized else 16,
        )
    return y
