"""GPTQ vs GPTQ* (GPTQ after `--rotate hadamard`) on the demo model: held-out perplexity at 3.25 and 2.25
average bits (3- and 2-bit codes, g128, every unit), over several seeds; RTN vs RTN* alongside.

    .venv/bin/python benchmarks/bench_rotate.py [--model demo] [--seeds 0,1,2] [--eval-windows 160]

Writes benchmarks/results/rotate.md. As in `moebits quantize --rotate hadamard --seed S`, seed S chooses both
the calibration windows and the rotation's random signs, so the spread of a rotated row includes the
rotation's randomness. Per (rotation, seed) the model is loaded, rotated, calibrated once, evaluated in
fp, then each quantizer x bits restores the fp weights, quantizes every unit and evaluates on the same
held-out tokens. Also reported: the rotated fp model's perplexity (function preservation at this scale)
and max|w|/rms of the expert weights before and after rotation (incoherence).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import write_table
from moebits.apply import apply_plan
from moebits.calibrate import calibrate
from moebits.data import calibration_windows, load_text, tokenize
from moebits.evaluate import perplexity
from moebits.models import load_model
from moebits.plan import Plan
from moebits.rotate import incoherence, rotate_model
from moebits.units import Choice


def mean_incoherence(ad, kind: str) -> float:
    return float(torch.cat([incoherence(ad.routed_weights_batched(l, kind)) for l in ad.moe_layers]).mean())


def gaussian_incoherence(shape: tuple[int, int], n: int = 64) -> float:
    """max|w|/rms of i.i.d. Gaussian matrices of `shape` (mean of n draws): what an incoherent matrix shows."""
    g = torch.Generator().manual_seed(0)
    return float(incoherence(torch.randn(n, *shape, generator=g, dtype=torch.float64)).mean())


def fmt(vals: list[float]) -> str:
    m = statistics.mean(vals)
    return f"{m:+.2f}" if len(vals) == 1 else f"{m:+.2f} ± {statistics.stdev(vals):.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--calib", default="demo")
    ap.add_argument("--eval", default="demo")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="3,2", help="code widths (g128): 3 -> 3.25, 2 -> 2.25 average bits")
    ap.add_argument("--quantizers", default="gptq,rtn")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    widths = [int(b) for b in args.bits.split(",")]
    quantizers = args.quantizers.split(",")

    ppl: dict[tuple, list[float]] = {}  # (rotation, quantizer, bits) -> ppl per seed; bits 16 = fp
    incoh, checks, secs = {}, [], {}
    eval_ids = None
    for rot in ("none", "hadamard"):
        for s in seeds:
            model, tok, ad = load_model(args.model, dtype="float32")
            if eval_ids is None:
                eval_ids = tokenize(tok, load_text(args.eval, "eval"))
            if rot != "none":
                before = {k: mean_incoherence(ad, k) for k in ("gate", "up", "down")}
                t0 = time.perf_counter()
                r = rotate_model(model, ad, rot, seed=s)
                secs.setdefault("rotate", []).append(time.perf_counter() - t0)
                checks.append(r.check_max_abs_diff / r.check_logit_scale)
                incoh[s] = {k: (before[k], mean_incoherence(ad, k)) for k in before}
            units, shapes = ad.units(), ad.shapes()
            shape_gate = (ad.intermediate, ad.hidden)
            fp = {u: ad.weight(u).clone() for u in units}
            t0 = time.perf_counter()
            cal = calibrate(ad, calibration_windows(tok, args.calib, args.nsamples, args.seqlen, s), seed=s,
                            progress=False)
            secs.setdefault("calibrate", []).append(time.perf_counter() - t0)

            def evaluate() -> float:
                return perplexity(model, eval_ids, args.seqlen, max_windows=args.eval_windows, progress=False).ppl

            ppl.setdefault((rot, "fp", 16), []).append(evaluate())
            for q in quantizers:
                for b in widths:
                    for u in units:
                        ad.set_weight(u, fp[u])
                    plan = Plan.uniform(units, shapes, Choice(b, 128, q))
                    t0 = time.perf_counter()
                    apply_plan(ad, plan, cal.inputs, progress=False)
                    secs.setdefault(f"quantize {q}", []).append(time.perf_counter() - t0)
                    ppl.setdefault((rot, q, b), []).append(evaluate())
                    print(f"{rot} seed {s} {q} {b}-bit: ppl {ppl[(rot, q, b)][-1]:.3f}", flush=True)

    fp_ref = ppl[("none", "fp", 16)][0]
    rows = []
    for q in quantizers:
        for b in widths:
            for rot in ("none", "hadamard"):
                vals = ppl[(rot, q, b)]
                d = [100 * (v / fp_ref - 1) for v in vals]
                name = q.upper() + ("*" if rot != "none" else "")
                rows.append([name, f"{b + 0.25:.2f}", f"{statistics.mean(vals):.3f}", fmt(d), len(vals)])
            a, r = ppl[("none", q, b)], ppl[("hadamard", q, b)]
            gap = [100 * (y / x - 1) for x, y in zip(a, r)]
            rows.append([f"{q.upper()}* vs {q.upper()}, same seed", f"{b + 0.25:.2f}", "-", fmt(gap), len(gap)])
    fp_rot = ppl[("hadamard", "fp", 16)]
    notes = [
        f"model `{args.model}`; calibration {args.nsamples} x {args.seqlen} tokens of `{args.calib}` per seed (seeds "
        f"{args.seeds}); perplexity on `{args.eval}` held-out text ({len(eval_ids):,} tokens, "
        f"{args.eval_windows or 'all'} windows of {args.seqlen}); fp32 compute.",
        "Δppl %: against the unrotated fp model's perplexity, mean ± sd over the seeds; 'X* vs X, same seed': "
        "relative perplexity of the rotated run against the unrotated run of the same calibration seed.",
        f"fp perplexity: unrotated {fp_ref:.4f}, rotated {', '.join(f'{v:.4f}' for v in fp_rot)} (per seed); "
        f"rotation probe max |Δlogit| / max |logit| = {max(checks):.2e}.",
        "incoherence max|w|/rms of the routed experts (mean over experts and layers), before -> after rotation, "
        "seed " + str(seeds[0]) + ": " + ", ".join(f"{k} {a:.2f} -> {b:.2f}" for k, (a, b) in incoh[seeds[0]].items())
        + f" (an i.i.d. Gaussian matrix of the gate's shape: {gaussian_incoherence(shape_gate):.2f}; rotation lowers "
        "max|w|/rms only where weights have outliers to spread).",
        "seconds (mean): " + ", ".join(f"{k} {statistics.mean(v):.1f}" for k, v in secs.items()) + "; torch threads: "
        f"{args.threads}.",
    ]
    write_table("rotate", ["method", "avg bits", "ppl (mean)", "Δppl %", "n seeds"], rows, notes)


if __name__ == "__main__":
    main()
