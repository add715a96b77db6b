"""Bit packing of quantization codes: the storage layout of the moebits packed format.

Layout (fixed; the Triton kernel and the exporters read it):

- The codes of one row of K values at b bits (any b in 1..8) form one little-endian bitstream:
  value j occupies bits [j*b, (j+1)*b) of the row, bits counted LSB-first within each byte and
  bytes in order. A row takes ceil(K*b/8) bytes; the unused high bits of its last byte are 0.
  Rows are stored as a uint8 tensor `[rows, ceil(K*b/8)]`; rows never share a byte.
- Scales are fp16 `[rows, G]`, G = ceil(K / group_size) (a partial last group has its own scale
  and zero); per-channel (group_size <= 0) means G = 1. The weight is `(code - zero) * scale`, with
  column c in group c // group_size.
- Zeros are fp16 `[rows, G]` (real-valued, e.g. HQQ's, or format 1), or, when they are integer codes
  (RTN, GPTQ) and stored packed, one bitstream over the whole set at the code width b: the zero of
  (row r, group g) is value r*G + g of the set's `[rows, G]` zeros flattened row-major, in the same
  bit layout as a row of codes (`pack_zero_stream`), ceil(rows*G*b/8) bytes in all. Rows do share
  bytes there (a set pays its rounding once), so a unit's zeros start at bit (row0*G)*b.

So at b = 4, value 2j is the low nibble of byte j and value 2j+1 its high nibble; at b = 3 value 1
is bits 3..5 of byte 0 and value 2 straddles bytes 0 and 1 (bits 6..7 of byte 0, bit 0 of byte 1).

Both directions are vectorised (no Python loop over values): a b-bit value starting at bit
offset o lies in byte o // 8 and, when (o % 8) + b > 8, the next byte, so it is read from a
16-bit window `byte[o//8] | byte[o//8 + 1] << 8` shifted right by o % 8.
"""
from __future__ import annotations

import math

import torch


def packed_bytes(k: int, bits: int) -> int:
    """Bytes per packed row of `k` values at `bits`."""
    return math.ceil(k * bits / 8)


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, got {bits}")


def _positions(k: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    offset = torch.arange(k, device=device, dtype=torch.int64) * bits
    return offset // 8, (offset % 8).to(torch.int32)  # byte index, shift within it


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`codes` uint8 `[..., K]` with values < 2^bits -> uint8 `[..., ceil(K*bits/8)]`."""
    _check(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    k = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes.reshape(-1, k)
    if bits == 8:
        return c.clone().reshape(*lead, k)
    if c.numel() and int(c.max()) >= 2 ** bits:
        raise ValueError(f"a code exceeds {bits} bits (max {int(c.max())})")
    nbytes = packed_bytes(k, bits)
    byte, shift = _positions(k, bits, c.device)
    out = torch.zeros(c.shape[0], nbytes + 1, dtype=torch.int32, device=c.device)
    # a value's bits never overlap another's, so adding the shifted values is OR-ing them
    for r0 in range(0, c.shape[0], 4096):  # bound the int32 temporaries on large tensors
        v = c[r0:r0 + 4096].to(torch.int32) << shift  # up to 15 bits wide
        rows = out[r0:r0 + 4096]
        rows.index_add_(1, byte, v & 0xFF)
        rows.index_add_(1, byte + 1, v >> 8)
    return out[:, :nbytes].to(torch.uint8).reshape(*lead, nbytes)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 `[..., ceil(k*bits/8)]` -> uint8 `[..., k]`."""
    _check(bits)
    nbytes = packed_bytes(k, bits)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"a packed row of {k} values at {bits} bits has {nbytes} bytes, got {packed.shape[-1]}")
    lead = packed.shape[:-1]
    p = packed.reshape(-1, nbytes)
    if bits == 8:
        return p.clone().reshape(*lead, k)
    if 8 % bits == 0:  # values never straddle bytes: one shift per position in the byte
        per = 8 // bits
        shifts = torch.arange(per, device=p.device, dtype=torch.uint8) * bits
        v = (p[..., None] >> shifts) & (2 ** bits - 1)
        return v.reshape(p.shape[0], -1)[:, :k].reshape(*lead, k)
    if k % 8 == 0:  # 8 values fill exactly `bits` bytes: read them as one little-endian 64-bit word
        word = (p.reshape(-1, k // 8, bits).to(torch.int64)
                << (torch.arange(bits, device=p.device) * 8)).sum(-1)  # [rows, k/8]
        v = (word[..., None] >> (torch.arange(8, device=p.device) * bits)) & (2 ** bits - 1)
        return v.to(torch.uint8).reshape(*lead, k)
    byte, shift = _positions(k, bits, p.device)
    wide = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.uint8, device=p.device)], dim=1).to(torch.int32)
    window = wide[:, byte] | (wide[:, byte + 1] << 8)
    return ((window >> shift) & (2 ** bits - 1)).to(torch.uint8).reshape(*lead, k)


def pack_zero_stream(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zeros `[rows, G]` (any dtype holding integers in 0 .. 2^bits - 1) -> one uint8 bitstream
    `[ceil(rows*G*bits/8)]`, value r*G + g at bits [(r*G + g)*bits, ...) (the layout of a row of codes)."""
    _check(bits)
    z = zero.float()
    if z.numel() and (not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > 2 ** bits - 1):
        raise ValueError(f"zero points are not integers in 0..{2 ** bits - 1}; they cannot be stored packed at "
                         f"{bits} bits (store them as fp16: zero_points='fp16', or a quantizer with integer zeros)")
    return pack_codes(z.to(torch.uint8).reshape(1, -1), bits).reshape(-1)


def unpack_zero_stream(stream: torch.Tensor, bits: int, groups: int, rows: torch.Tensor | slice | None = None,
                       total_rows: int | None = None) -> torch.Tensor:
    """The zeros of `rows` (an index tensor, a slice, or None = all `total_rows`) as float32 `[len(rows), G]`,
    read from a set's bitstream (`pack_zero_stream`). Each value is read from the 16-bit window at its
    byte, as `unpack_codes` does; the stream is not copied."""
    _check(bits)
    if rows is None or isinstance(rows, slice):
        n = total_rows if total_rows is not None else stream.numel() * 8 // (bits * groups)
        rows = torch.arange(n, device=stream.device)[rows if rows is not None else slice(None)]
    rows = rows.to(device=stream.device, dtype=torch.int64)
    offset = (rows[:, None] * groups + torch.arange(groups, device=stream.device)) * bits  # [n, G] bit offsets
    byte, shift = offset // 8, offset % 8
    lo = stream[byte].to(torch.int32)
    nxt = (byte + 1).clamp(max=max(stream.numel() - 1, 0))
    hi = torch.where(byte + 1 < stream.numel(), stream[nxt].to(torch.int32), 0)
    return (((lo | (hi << 8)) >> shift) & (2 ** bits - 1)).float()
