"""The packed grouped-experts Triton kernel reading zero points packed at the code width (format 2), under
Triton's interpreter on a CPU, against an independent reference: numpy bit packing, the zeros as drawn
(not read back), dequantize, matmul. Sets with fp16 zeros and sets with packed integer zeros side by side."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton")

from moebits.kernels import PackedGroupedWeight, Segment, dequantize_expert  # noqa: E402
from moebits.kernels.packed_weight import WeightSet  # noqa: E402
from moebits.kernels.triton_grouped import packed_grouped_matmul  # noqa: E402
from moebits.quant.pack import pack_zero_stream, unpack_zero_stream  # noqa: E402
from test_kernel import check, reference_matmul, routed  # noqa: E402  (the same helpers, not redefined)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def np_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """int values [rows, K] -> uint8 [rows, ceil(K*bits/8)], one LSB-first bitstream per row."""
    rows, k = q.shape
    stream = ((q[:, :, None] >> np.arange(bits)) & 1).reshape(rows, k * bits).astype(np.uint8)
    return np.packbits(stream, axis=1, bitorder="little")


def make_weight(seg_sets: list[list[tuple[int, bool]]], out: int, k: int, group_size: int, seed: int):
    """Experts split into row segments, each `(bits, packed_zero)`. A set is one (bits, packed_zero) pair;
    a packed-zero set stores its `[rows, G]` integer zeros flattened row-major as ONE bitstream.
    Returns the weight and the reference dequantized weights `[E, out, k]` from the values as drawn."""
    rng = np.random.default_rng(seed)
    g = k if group_size <= 0 else group_size
    G = -(-k // g)
    per_set: dict[tuple, list] = {}
    segments, rows_at = [], {}
    ref = np.zeros((len(seg_sets), out, k), dtype=np.float32)
    gi = np.arange(k) // g
    for e, parts in enumerate(seg_sets):
        step = out // len(parts)
        for i, (b, packed) in enumerate(parts):
            rows = step if i < len(parts) - 1 else out - step * i
            q = rng.integers(0, 2 ** b, size=(rows, k))
            s = (rng.random((rows, G)) * 0.05 + 0.01).astype(np.float16)
            z = rng.integers(0, 2 ** b, size=(rows, G))
            key = (b, packed)
            segments.append(Segment(e, key, rows_at.get(key, 0), rows, step * i))
            rows_at[key] = rows_at.get(key, 0) + rows
            per_set.setdefault(key, []).append((q, s, z))
            ref[e, step * i:step * i + rows] = (q - z[:, gi]) * s.astype(np.float32)[:, gi]
    sets = {}
    for (b, packed), items in per_set.items():
        codes = torch.from_numpy(np.concatenate([np_pack(q, b) for q, _, _ in items]))
        scales = torch.from_numpy(np.concatenate([s for _, s, _ in items]))
        z = np.concatenate([z for _, _, z in items])
        if packed:
            zeros = torch.from_numpy(np_pack(z.reshape(1, -1), b).reshape(-1))
            sets[(b, packed)] = WeightSet(b, group_size, codes, scales, zeros, zero_bits=b)
        else:
            sets[(b, packed)] = WeightSet(b, group_size, codes, scales, torch.from_numpy(z.astype(np.float16)))
    w = PackedGroupedWeight(len(seg_sets), out, k, sets, segments)
    return w, torch.from_numpy(ref).half().float()  # the kernel feeds fp16 weights to the dot


def test_zero_stream_matches_bitwise_reference_and_reads_any_rows():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for rows, G in ((1, 1), (5, 3), (7, 2), (13, 1)):  # streams ending mid-byte, rows sharing bytes
            z = rng.integers(0, 2 ** bits, size=(rows, G))
            stream = pack_zero_stream(torch.from_numpy(z).float(), bits)
            assert stream.tolist() == np_pack(z.reshape(1, -1), bits).reshape(-1).tolist()
            assert stream.numel() == -(-rows * G * bits // 8)
            assert (unpack_zero_stream(stream, bits, G, total_rows=rows).numpy() == z).all()
            pick = torch.tensor([rows - 1, 0] if rows > 1 else [0])
            assert (unpack_zero_stream(stream, bits, G, pick).numpy() == z[pick.numpy()]).all()
            assert (unpack_zero_stream(stream, bits, G, slice(rows // 2, rows)).numpy() == z[rows // 2:]).all()
    with pytest.raises(ValueError, match="not integers"):
        pack_zero_stream(torch.tensor([[1.5]]), 3)
    with pytest.raises(ValueError, match="not integers"):
        pack_zero_stream(torch.tensor([[8.0]]), 3)  # off the 3-bit grid


@pytest.mark.parametrize("bits", [3, 5])
@pytest.mark.parametrize("packed", [True, False], ids=["packed-zeros", "fp16-zeros"])
def test_odd_widths_partial_group(bits, packed):
    # K = 200 in groups of 64: a partial last group of 8 columns; 40 rows x 4 groups x odd bits straddle bytes
    w, ref = make_weight([[(bits, packed)]] * 3, out=40, k=200, group_size=64, seed=bits)
    x, start, count = routed([5, 0, 19], 200, seed=bits)
    y = packed_grouped_matmul(x.to(DEVICE), w.to(DEVICE), start.to(DEVICE), count.to(DEVICE), block_n=32).cpu()
    check(y, reference_matmul(x, ref, start, count))


@pytest.mark.parametrize("block_k", [32, 64], ids=["group-aligned", "unaligned"])
def test_both_zero_formats_in_one_weight(block_k):
    # gate and up of one expert in sets of different zero formats and widths, 2/3/4/5/8 bits
    parts = [[(3, True), (3, False)], [(5, True), (2, True)], [(8, True), (4, False)], [(4, True), (3, True)]]
    w, ref = make_weight(parts, out=48, k=96, group_size=32, seed=7)
    x, start, count = routed([3, 17, 0, 40], 96, seed=1)
    y = packed_grouped_matmul(x.to(DEVICE), w.to(DEVICE), start.to(DEVICE), count.to(DEVICE),
                              block_n=16, block_k=block_k).cpu()
    check(y, reference_matmul(x, ref, start, count))
    for e in range(len(parts)):  # the torch path reads the same zeros
        assert torch.equal(dequantize_expert(w, e, torch.float16).float(), ref[e])


@pytest.mark.parametrize("packed", [True, False], ids=["packed-zeros", "fp16-zeros"])
def test_per_channel(packed):
    w, ref = make_weight([[(3, packed)], [(5, packed)]], out=20, k=70, group_size=-1, seed=3)
    x, start, count = routed([2, 6], 70, seed=3)
    y = packed_grouped_matmul(x.to(DEVICE), w.to(DEVICE), start.to(DEVICE), count.to(DEVICE)).cpu()
    check(y, reference_matmul(x, ref, start, count))


def test_packed_zeros_of_the_wrong_size_or_width_are_refused():
    w, _ = make_weight([[(3, True)], [(3, True)]], out=8, k=16, group_size=8, seed=0)
    s = w.sets[(3, True)]
    with pytest.raises(ValueError, match="zeros must have shape"):
        PackedGroupedWeight(2, 8, 16, {(3, True): WeightSet(3, 8, s.codes, s.scales, s.zeros[:-1], 3)}, w.segments)
    with pytest.raises(ValueError, match="code width"):
        PackedGroupedWeight(2, 8, 16, {(3, True): WeightSet(3, 8, s.codes, s.scales, s.zeros, 4)}, w.segments)
