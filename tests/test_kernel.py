"""The packed grouped-experts Triton kernel, run on the CPU under Triton's interpreter, against a plain
reference: an independent numpy bit reader, dequantize, matmul."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # read when triton is first imported (its own library functions are jit-decorated then)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from moebits.kernels import PackedGroupedWeight, Segment, dequantize_expert, sort_by_expert, unpack_codes  # noqa: E402
from moebits.kernels.moe import packed_experts_forward  # noqa: E402
from moebits.kernels.triton_grouped import packed_grouped_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def np_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """int codes [rows, K] -> uint8 [rows, ceil(K*bits/8)]: one LSB-first bitstream per row."""
    rows, k = q.shape
    stream = ((q[:, :, None] >> np.arange(bits)) & 1).reshape(rows, k * bits).astype(np.uint8)
    return np.packbits(stream, axis=1, bitorder="little")


def np_unpack(codes: np.ndarray, bits: int, k: int) -> np.ndarray:
    stream = np.unpackbits(codes, axis=1, bitorder="little")[:, :k * bits].reshape(codes.shape[0], k, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(-1)


def make_weight(seg_bits: list[list[int]], out: int, k: int, group_size: int, seed: int, integer_zero: bool = True):
    """Experts' weights split into len(seg_bits[e]) equal row segments with the given bit-widths.
    Returns the packed weight and, per expert, the dequantized weight from the independent reader."""
    rng = np.random.default_rng(seed)
    g = k if group_size <= 0 else group_size
    G = -(-k // g)
    codes, scales, zeros, segments = {}, {}, {}, []
    rows_at: dict[int, int] = {}
    per_bits: dict[int, list] = {}
    for e, parts in enumerate(seg_bits):
        step = out // len(parts)
        for i, b in enumerate(parts):
            rows = step if i < len(parts) - 1 else out - step * i
            q = rng.integers(0, 2 ** b, size=(rows, k))
            s = (rng.random((rows, G)) * 0.05 + 0.01).astype(np.float16)
            z = rng.integers(0, 2 ** b, size=(rows, G)).astype(np.float16) if integer_zero else \
                (rng.random((rows, G)) * (2 ** b - 1)).astype(np.float16)
            segments.append(Segment(e, b, rows_at.get(b, 0), rows, step * i))
            rows_at[b] = rows_at.get(b, 0) + rows
            per_bits.setdefault(b, []).append((q, s, z))
    for b, items in per_bits.items():
        packed = np.concatenate([np_pack(q, b) for q, _, _ in items])
        assert (np_unpack(packed, b, k) == np.concatenate([q for q, _, _ in items])).all()
        codes[b] = torch.from_numpy(packed)
        scales[b] = torch.from_numpy(np.concatenate([s for _, s, _ in items]))
        zeros[b] = torch.from_numpy(np.concatenate([z for _, _, z in items]))
    weight = PackedGroupedWeight.from_bits(len(seg_bits), out, k, group_size, codes, scales, zeros, segments)
    ref = np.zeros((len(seg_bits), out, k), dtype=np.float32)
    gi = np.arange(k) // g
    for s in segments:  # reference dequantization from the independent reader
        q = np_unpack(codes[s.set].numpy()[s.row0:s.row0 + s.rows], s.set, k).astype(np.float32)
        sc = scales[s.set].numpy()[s.row0:s.row0 + s.rows].astype(np.float32)[:, gi]
        ze = zeros[s.set].numpy()[s.row0:s.row0 + s.rows].astype(np.float32)[:, gi]
        ref[s.expert, s.col0:s.col0 + s.rows] = (q - ze) * sc
    return weight, torch.from_numpy(ref).half().float()  # the kernel feeds fp16 weights to the dot


def routed(counts: list[int], k: int, seed: int):
    x = torch.randn(sum(counts), k, generator=torch.Generator().manual_seed(seed)).half()
    count = torch.tensor(counts, dtype=torch.int32)
    return x, torch.cumsum(count, 0).to(torch.int32) - count, count


def reference_matmul(x, ref_w, start, count):
    y = torch.zeros(x.shape[0], ref_w.shape[1])
    for e in range(ref_w.shape[0]):
        rows = slice(int(start[e]), int(start[e] + count[e]))
        y[rows] = x[rows].float() @ ref_w[e].T
    return y


def check(y, y_ref):
    assert torch.isfinite(y).all()
    err = (y.float() - y_ref).abs().max().item()
    tol = 2e-3 * max(1.0, y_ref.abs().max().item())  # fp16 output rounding + summation order
    assert err <= tol, f"max abs error {err} > {tol}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_bits_partial_group(bits):
    # K = 200 with groups of 64: three full groups and a partial one of 8 columns
    w, ref = make_weight([[bits]] * 3, out=40, k=200, group_size=64, seed=bits)
    x, start, count = routed([5, 0, 19], 200, seed=bits)
    w = w.to(DEVICE)
    y = packed_grouped_matmul(x.to(DEVICE), w, start.to(DEVICE), count.to(DEVICE), block_n=32).cpu()
    check(y, reference_matmul(x, ref, start, count))


@pytest.mark.parametrize("counts", [[1, 0, 0, 0], [1, 1, 0, 2], [3, 17, 0, 40]])
def test_mixed_bits_per_expert_and_segment(counts):
    # gate and up of one expert at different widths, experts at different widths; HQQ-like fp zeros
    seg_bits = [[2, 4], [3, 3], [8, 2], [4, 3]]
    w, ref = make_weight(seg_bits, out=48, k=96, group_size=32, seed=7, integer_zero=False)
    x, start, count = routed(counts, 96, seed=sum(counts))
    y = packed_grouped_matmul(x.to(DEVICE), w.to(DEVICE), start.to(DEVICE), count.to(DEVICE),
                              block_n=16, block_k=32).cpu()
    check(y, reference_matmul(x, ref, start, count))


def test_per_channel_groups():
    w, ref = make_weight([[3], [4]], out=20, k=70, group_size=-1, seed=3)
    x, start, count = routed([2, 6], 70, seed=3)
    y = packed_grouped_matmul(x.to(DEVICE), w.to(DEVICE), start.to(DEVICE), count.to(DEVICE)).cpu()
    check(y, reference_matmul(x, ref, start, count))


@pytest.mark.parametrize("tokens", [1, 9])
def test_experts_forward_matches_reference(tokens):
    E, H, inter, top_k = 6, 64, 32, 2
    gate_up, ref_gu = make_weight([[b1, b2] for b1, b2 in [(2, 3), (4, 4), (8, 3), (3, 2), (4, 8), (2, 2)]],
                                  out=2 * inter, k=H, group_size=32, seed=11)
    down, ref_d = make_weight([[b] for b in (3, 2, 4, 8, 3, 4)], out=H, k=inter, group_size=16, seed=12)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen).half()
    logits = torch.randn(tokens, E, generator=gen)
    topk_w, topk_ids = torch.softmax(logits, -1).topk(top_k, -1)
    y = packed_experts_forward(x.to(DEVICE), topk_ids.to(DEVICE), topk_w.to(DEVICE), gate_up.to(DEVICE),
                               down.to(DEVICE)).cpu()
    y_ref = torch.zeros(tokens, H)
    for t in range(tokens):
        for j in range(top_k):
            e = int(topk_ids[t, j])
            h = x[t].float() @ ref_gu[e].T
            a = (torch.nn.functional.silu(h[:inter]) * h[inter:]).half().float()  # the kernel's activations are fp16
            y_ref[t] += topk_w[t, j] * (a @ ref_d[e].T)
    check(y, y_ref)


def test_torch_unpack_matches_independent_reader():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        q = rng.integers(0, 2 ** bits, size=(5, 37))
        packed = np_pack(q, bits)
        assert (unpack_codes(torch.from_numpy(packed), bits, 37).numpy() == q).all()


def test_dequantize_expert_matches_reference():
    w, ref = make_weight([[2, 8], [3, 4]], out=10, k=50, group_size=16, seed=5)
    for e in range(2):
        assert torch.equal(dequantize_expert(w, e, torch.float16).float(), ref[e])


def test_sort_by_expert():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    r = sort_by_expert(ids, torch.rand(3, 2), 4)
    assert r.count.tolist() == [2, 1, 3, 0] and r.start.tolist() == [0, 2, 3, 6] and r.max_count == 3
    assert r.token.tolist() == [0, 2, 1, 0, 1, 2]


def test_bad_segments_refused():
    w, _ = make_weight([[4], [4]], out=8, k=16, group_size=8, seed=0)
    s = w.sets[4]
    with pytest.raises(ValueError, match="exactly once"):
        PackedGroupedWeight.from_bits(2, 8, 16, 8, {4: s.codes}, {4: s.scales}, {4: s.zeros}, w.segments[:1])
    with pytest.raises(ValueError, match="uint8"):
        PackedGroupedWeight.from_bits(2, 8, 16, 8, {4: s.codes[:, :3]}, {4: s.scales}, {4: s.zeros}, w.segments)


def test_kernel_runs_a_packed_checkpoint_layer(tmp_path):
    """The kernel on a real packed checkpoint (mixed bits per expert and per gate/up) computes what the
    quantized model's own experts module computes."""
    from safetensors.torch import load_file

    from moebits.apply import apply_plan
    from moebits.kernels.from_packed import grouped_weights
    from moebits.models import load_model
    from moebits.packed import read_index, save_packed
    from moebits.plan import Assignment, Plan
    from moebits.units import Choice

    model, tok, adapter = load_model("tiny:qwen2_moe", "float32", "cpu", False, seed=0)
    widths, kinds = (2, 3, 4, 8), ("gate", "up", "down")

    def bits(u):  # gate and up of an expert at different widths, experts at different widths
        return 4 if u.is_shared else widths[(3 * u.expert + kinds.index(u.kind) + u.layer) % 4]

    plan = Plan({u: Assignment(Choice(bits(u), 32, "rtn")) for u in adapter.units()})
    qweights = {}
    apply_plan(adapter, plan, progress=False, codes=qweights)
    save_packed(model, adapter, plan, qweights, tmp_path / "m", tokenizer=tok)
    index, tensors = read_index(tmp_path / "m"), load_file(str(tmp_path / "m" / "model.safetensors"))
    layer = adapter.moe_layers[1]
    prefix = next(p for p, m in index.modules.items() if m.type == "experts" and f"layers.{layer}." in p)
    w = grouped_weights(index, tensors, prefix)
    assert len({s.bits for s in w["gate_up"].sets.values()}) > 1  # several bit-widths in one fused tensor
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, adapter.hidden, generator=gen)
    topk_w, topk_ids = torch.softmax(torch.randn(7, adapter.num_experts, generator=gen), -1).topk(2, -1)
    got = packed_experts_forward(x.to(DEVICE), topk_ids.to(DEVICE), topk_w.to(DEVICE), w["gate_up"].to(DEVICE),
                                 w["down"].to(DEVICE)).cpu()
    with torch.no_grad():
        want = adapter.experts(layer)(x, topk_ids, topk_w)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_padding_ids_contribute_nothing_and_synced_grid(monkeypatch):
    """Expert ids outside [0, E) (padding) add nothing; the grid sized by the true largest count (past
    SYNC_TOKENS) gives the same result as the one sized by the token count."""
    import moebits.kernels.moe as moe

    E, H, inter = 4, 32, 16
    gate_up, _ = make_weight([[3, 4]] * E, out=2 * inter, k=H, group_size=16, seed=21)
    down, _ = make_weight([[2]] * E, out=H, k=inter, group_size=16, seed=22)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, H, generator=gen).half()
    ids = torch.tensor([[0, 2], [1, -1], [3, E], [2, 0], [E, -1]])
    w = torch.rand(5, 2, generator=gen)
    got = packed_experts_forward(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE)).cpu()
    valid = (ids >= 0) & (ids < E)
    kept = packed_experts_forward(x.to(DEVICE), ids.clamp(0, E - 1).to(DEVICE), (w * valid).to(DEVICE),
                                  gate_up.to(DEVICE), down.to(DEVICE)).cpu()
    assert torch.equal(got, kept) and got[4].abs().max() == 0
    monkeypatch.setattr(moe, "SYNC_TOKENS", 2)
    synced = packed_experts_forward(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), gate_up.to(DEVICE),
                                    down.to(DEVICE)).cpu()
    assert torch.equal(got, synced)


def test_bf16_activations():
    """bf16 activations: weights rounded to bf16, fp32 accumulator, bf16 result (under the interpreter,
    whose bf16 dot and rounding are wrong, in fp32 with the result rounded by torch)."""
    w, ref = make_weight([[3], [4, 2]], out=32, k=96, group_size=32, seed=9)
    x, start, count = routed([4, 7], 96, seed=9)
    xb = x.bfloat16()
    y = packed_grouped_matmul(xb.to(DEVICE), w.to(DEVICE), start.to(DEVICE), count.to(DEVICE)).cpu()
    assert y.dtype == torch.bfloat16
    y_ref = reference_matmul(xb.float(), ref.bfloat16().float(), start, count)
    err = (y.float() - y_ref).abs().max().item()
    assert err <= 8e-3 * y_ref.abs().max().item(), err  # bf16 output rounding (2^-8 relative) + order
