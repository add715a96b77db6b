"""The packed mixed-bit Triton kernel vs fp16 on one real-size MoE layer's routed experts (GPU only).

Layer: 64 routed experts, hidden 2048, expert width 1408, top-6 (DeepSeek-V2-Lite / Qwen1.5-MoE scale),
gate/up fused as `[E, 2I, H]`, down `[E, H, I]`, SiLU-gated. A W3.25 plan: a quarter of the experts
at 2 bits, half at 3, a quarter at 4, all g128 (3.0 code bits + 0.25 of scale/zero = 3.25 bits per
weight). The codes are random bytes (every byte string is a valid code stream, and the kernel's time
does not depend on the values); the kernel's correctness is what `tests/test_kernel.py` checks, and
this script re-checks it on the GPU against the torch-dequantized weights before timing.

The same computation is timed three ways, routing (top-k sort) included in all of them:
  fp16 loop   transformers' eager path: for each routed expert, index its tokens, two fp16 matmuls;
  fp16 grouped torch._grouped_mm on the expert-sorted tokens (bf16; where this torch/GPU has it);
  packed      moebits' kernel on the packed codes (`moebits.kernels.moe.packed_experts_forward`).
At 1 token decode is memory-bound: the packed path reads 6 experts' codes (~3.25/16 of their fp16
bytes), so the goal is >= 2x over fp16.

    python benchmarks/bench_kernel.py                  # needs a CUDA GPU; refuses otherwise
    python benchmarks/bench_kernel.py --smoke          # CPU: tiny shapes through Triton's interpreter, no timings
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from _common import write_table  # noqa: E402
from moebits.kernels import PackedGroupedWeight, Segment, dequantize_expert, sort_by_expert  # noqa: E402


def packed_random(num_experts: int, out: int, k: int, expert_bits: list[int], group_size: int, device,
                  gen: torch.Generator) -> PackedGroupedWeight:
    """Every expert's rows at its own bit-width, rows grouped by bit-width; random codes and metadata."""
    G = -(-k // group_size)
    codes, scales, zeros, segments = {}, {}, {}, []
    for b in sorted(set(expert_bits)):
        experts = [e for e in range(num_experts) if expert_bits[e] == b]
        rows = len(experts) * out
        codes[b] = torch.randint(0, 256, (rows, -(-k * b // 8)), dtype=torch.uint8, generator=gen).to(device)
        scales[b] = (torch.rand(rows, G, generator=gen) * 0.01 / 2 ** b + 1e-4).half().to(device)
        zeros[b] = torch.randint(0, 2 ** b, (rows, G), generator=gen).half().to(device)
        segments += [Segment(e, b, i * out, out, 0) for i, e in enumerate(experts)]
    return PackedGroupedWeight.from_bits(num_experts, out, k, group_size, codes, scales, zeros, segments)


def w325_bits(num_experts: int, gen: torch.Generator) -> list[int]:
    bits = [2] * (num_experts // 4) + [4] * (num_experts // 4)
    bits += [3] * (num_experts - len(bits))
    return [bits[i] for i in torch.randperm(num_experts, generator=gen).tolist()]


def fp16_loop(x, topk_ids, topk_w, w_gate_up, w_down):
    r = sort_by_expert(topk_ids, topk_w, w_gate_up.shape[0])
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    starts, counts = r.start.tolist(), r.count.tolist()  # one sync, as transformers' loop does
    for e in range(w_gate_up.shape[0]):
        if counts[e] == 0:
            continue
        sl = slice(starts[e], starts[e] + counts[e])
        tok = r.token[sl]
        h = x[tok] @ w_gate_up[e].T
        o = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w_down[e].T
        out.index_add_(0, tok, o.float() * r.weight[sl, None].float())
    return out.to(x.dtype)


def fp16_grouped(x, topk_ids, topk_w, w_gate_up_t, w_down_t):
    """torch._grouped_mm over expert-sorted tokens; weights pre-transposed `[E, in, out]`."""
    r = sort_by_expert(topk_ids, topk_w, w_gate_up_t.shape[0])
    offs = torch.cumsum(r.count, 0).to(torch.int32)
    inter = w_down_t.shape[1]
    h = torch._grouped_mm(x[r.token], w_gate_up_t, offs=offs)
    o = torch._grouped_mm(torch.nn.functional.silu(h[:, :inter]) * h[:, inter:], w_down_t, offs=offs)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, r.token, o.float() * r.weight[:, None].float())
    return out.to(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter allowed, nothing timed or written")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("bench_kernel.py times a GPU kernel and needs a CUDA device; none is visible here "
                 "(torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU, or pass --smoke "
                 "to check the script end to end on tiny shapes under Triton's interpreter (no timings).")
    from moebits.kernels.moe import packed_experts_forward

    if args.smoke:
        args.experts, args.hidden, args.inter, args.top_k, args.tokens = 8, 64, 32, 2, [1, 5]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(args.seed)
    E, H, inter = args.experts, args.hidden, args.inter
    bits = w325_bits(E, gen)
    gate_up = packed_random(E, 2 * inter, H, bits, 128 if not args.smoke else 32, device, gen)
    down = packed_random(E, H, inter, bits, 128 if not args.smoke else 32, device, gen)
    w_gate_up = torch.stack([dequantize_expert(gate_up, e, torch.float16) for e in range(E)])  # [E, 2I, H]
    w_down = torch.stack([dequantize_expert(down, e, torch.float16) for e in range(E)])  # [E, H, I]
    fp16_bytes = 2 * (w_gate_up.numel() + w_down.numel())
    packed_bytes = gate_up.nbytes() + down.nbytes()
    avg_bits = 8 * packed_bytes / (w_gate_up.numel() + w_down.numel())

    has_grouped = False
    if device == "cuda" and hasattr(torch, "_grouped_mm"):
        try:
            gu_t, d_t = w_gate_up.bfloat16().transpose(1, 2).contiguous(), w_down.bfloat16().transpose(1, 2).contiguous()
            x0 = torch.randn(4, H, device=device, dtype=torch.bfloat16)
            fp16_grouped(x0, torch.zeros(4, 1, dtype=torch.long, device=device), torch.ones(4, 1, device=device), gu_t, d_t)
            has_grouped = True
        except Exception as exc:  # not every torch build / GPU has it
            print(f"torch._grouped_mm unavailable here: {exc}")

    rows = []
    for T in args.tokens:
        x = torch.randn(T, H, generator=gen).half().to(device)
        logits = torch.randn(T, E, generator=gen).to(device)
        topk_w, topk_ids = torch.softmax(logits, -1).topk(args.top_k, -1)
        y_packed = packed_experts_forward(x, topk_ids, topk_w, gate_up, down)
        y_ref = fp16_loop(x, topk_ids, topk_w, w_gate_up, w_down)
        rel = ((y_packed.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        if rel > 1e-2:
            raise SystemExit(f"packed kernel disagrees with the fp16 reference at {T} tokens: rel. error {rel:.3g}")
        if args.smoke:
            print(f"smoke: {T} tokens, packed vs dequantized fp16 reference rel. error {rel:.2e}")
            continue
        from triton.testing import do_bench

        t_loop = do_bench(lambda: fp16_loop(x, topk_ids, topk_w, w_gate_up, w_down), warmup=25, rep=200)
        t_grp = None
        if has_grouped:
            xb = x.bfloat16()
            t_grp = do_bench(lambda: fp16_grouped(xb, topk_ids, topk_w, gu_t, d_t), warmup=25, rep=200)
        t_packed = do_bench(lambda: packed_experts_forward(x, topk_ids, topk_w, gate_up, down), warmup=25, rep=200)
        best = min(t for t in (t_loop, t_grp) if t is not None)
        rows.append([T, f"{t_loop * 1e3:.1f}", "-" if t_grp is None else f"{t_grp * 1e3:.1f}", f"{t_packed * 1e3:.1f}",
                     f"{best / t_packed:.2f}x", f"{rel:.1e}"])
    if args.smoke:
        print("smoke run passed (no timings: not a GPU)")
        return
    notes = [
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; medians of triton.testing.do_bench",
        f"layer: {E} experts, hidden {H}, expert width {inter}, top-{args.top_k}; W3.25 plan (bits per expert "
        f"{ {b: bits.count(b) for b in sorted(set(bits))} }, g128): packed {packed_bytes / 2**20:.1f} MiB "
        f"({avg_bits:.2f} bits/weight) vs fp16 {fp16_bytes / 2**20:.1f} MiB",
        "speedup = best fp16 time / packed time; rel. err = packed vs fp16 on the dequantized weights",
        "fp16 grouped is torch._grouped_mm in bf16 (it has no fp16 path)",
    ]
    write_table("kernel", ["tokens", "fp16 loop (us)", "fp16 grouped (us)", "packed (us)", "speedup", "rel. err"],
                rows, notes)


if __name__ == "__main__":
    main()
