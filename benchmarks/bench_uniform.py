"""Uniform quantization of the demo model: held-out perplexity and wall time of fp16 and of uniform
RTN / GPTQ / HQQ at 2.25, 3.25, 4.25 and 8.25 average bits (2/3/4/8-bit codes, g128), plus the time
of GPTQ over all experts of one layer, one expert at a time vs batched.

    .venv/bin/python benchmarks/bench_uniform.py [--model demo] [--nsamples 128] [--seqlen 256]

Writes benchmarks/results/uniform.md. One calibration pass serves every row (the same as each
`moebits quantize` run would compute); each row restores the fp weights, quantizes, evaluates.
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import write_table
from moebits.apply import apply_plan, layer_hessians
from moebits.calibrate import calibrate
from moebits.data import calibration_windows, load_text, tokenize
from moebits.evaluate import perplexity
from moebits.models import load_model
from moebits.plan import Plan
from moebits.quant import quantize_gptq
from moebits.units import Choice, Unit


def gptq_batched_vs_single(adapter, calib, layer: int, bits: int = 3, repeats: int = 2) -> tuple[float, float, bool]:
    """Seconds to GPTQ all routed experts of `layer` (gate, up, down) per expert vs as one batch."""
    E = adapter.num_experts
    H = layer_hessians(adapter, layer, calib.inputs, list(range(E)))
    jobs = []
    for kind in ("gate", "up", "down"):
        w = torch.stack([adapter.weight(Unit(layer, e, kind)) for e in range(E)]).float()
        h = torch.stack([H[(e, "down" if kind == "down" else "in")] for e in range(E)])
        jobs.append((w, h))
    single, batched, same = [], [], True
    for _ in range(repeats):  # alternate, so drift in machine load hits both alike
        t0 = time.perf_counter()
        outs_s = [torch.stack([quantize_gptq(w[e], h[e], bits) for e in range(E)]) for w, h in jobs]
        single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs_b = [quantize_gptq(w, h, bits) for w, h in jobs]
        batched.append(time.perf_counter() - t0)
        same &= all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs_s, outs_b))
    return min(single), min(batched), same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--calib", default="demo")
    ap.add_argument("--eval", default="demo")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    model, tok, ad = load_model(args.model)
    units, shapes = ad.units(), ad.shapes()
    original = {u: ad.weight(u).clone() for u in units}
    t0 = time.perf_counter()
    calib = calibrate(ad, calibration_windows(tok, args.calib, args.nsamples, args.seqlen, args.seed), seed=args.seed)
    t_cal = time.perf_counter() - t0
    eval_ids = tokenize(tok, load_text(args.eval, "eval"))

    def evaluate():
        t = time.perf_counter()
        r = perplexity(model, eval_ids, args.seqlen, max_windows=args.eval_windows)
        return r, time.perf_counter() - t

    fp, t_fp = evaluate()
    rows = [["fp16 (fp32 compute)", "-", "16.00", f"{fp.ppl:.3f}", "-", "-", f"{t_fp:.1f}"]]
    for quantizer in ("rtn", "gptq", "hqq"):
        for bits in (2, 3, 4, 8):
            for u in units:
                ad.set_weight(u, original[u])
            plan = Plan.uniform(units, shapes, Choice(bits, 128, quantizer))
            t_q = apply_plan(ad, plan, calib.inputs, progress=False)
            r, t_e = evaluate()
            rows.append([quantizer, str(bits), f"{plan.avg_bits(shapes):.2f}", f"{r.ppl:.3f}",
                         f"{100 * (r.ppl / fp.ppl - 1):+.1f}", f"{t_q:.1f}", f"{t_e:.1f}"])
            print(rows[-1], flush=True)
    for u in units:
        ad.set_weight(u, original[u])

    layer = ad.moe_layers[len(ad.moe_layers) // 2]
    t_single, t_batched, same = gptq_batched_vs_single(ad, calib, layer)
    notes = [
        f"model `{args.model}`: {ad.summary()['num_units']} units; calibration {args.nsamples} x {args.seqlen} tokens "
        f"of `{args.calib}` ({t_cal:.1f} s, shared by all rows); perplexity on `{args.eval}` held-out text, "
        f"{fp.tokens:,} tokens in {fp.windows} windows of {args.seqlen}.",
        "avg bits = exact storage over the expert units (codes + fp16 scale and zero per group of 128).",
        f"GPTQ over all {ad.num_experts} routed experts of layer {layer} (gate, up, down; 3-bit g128): one expert at a "
        f"time {t_single:.2f} s, batched {t_batched:.2f} s, ratio {t_single / t_batched:.2f}x "
        f"(best of 2, alternated; identical results: {same}).",
        f"torch threads: {torch.get_num_threads()}.",
    ]
    write_table("uniform", ["quantizer", "bits", "avg bits", "ppl", "Δppl %", "quantize s", "eval s"], rows, notes)


if __name__ == "__main__":
    main()
