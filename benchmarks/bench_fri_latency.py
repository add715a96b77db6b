"""Latency FRI on the demo model's units: a few measured kernel anchors + FRI vs measuring every
(unit, choice) (`moebits.latency`).

    .venv/bin/python benchmarks/bench_fri_latency.py [--anchors 48] [--batch-tokens 4096]

Kernel: group-wise dequantization (uint8 codes, fp16 scale/zero per g128 group) + matmul, or a plain
matmul at 16 bits, on this machine's CPU (1 torch thread; the same code runs on CUDA). Tokens per unit:
m_u = f_u * batch_tokens (expected form of `cost.latency_matrix`, identical here since f_u * B >> 1).
For each code layout the latency FRI measures `--anchors` grid points + `--holdout` random held-out
points, then predicts the [U, C] matrix; the reference measures every distinct (M, N, K, bits) of the
model (units of one expert share M and shape) with the same kernel. Writes benchmarks/results/fri_latency.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from _common import write_table
from bench_fri_common import THREADS_NOTE, load_demo
from moebits.latency import KernelPoint, expected_tokens, latency_fri_matrix, measure_latency
from moebits.units import Choice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--anchors", type=int, default=48)
    ap.add_argument("--holdout", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # see bench_fri_common.THREADS_NOTE
    t_start = time.perf_counter()
    d = load_demo(args.model, seed=args.seed)
    units = d.table.units
    shapes = [d.adapter.shapes()[u] for u in units]
    freq = d.table.frequency
    choices = [Choice(b, 128, "gptq") for b in (2, 3, 4, 8)] + [Choice(16)]
    p, m = expected_tokens(freq, args.batch_tokens)
    m_int = np.maximum(1, np.rint(m)).astype(int)
    rows, notes = [], []
    for layout in ("bitplane", "byte"):
        lat, info = latency_fri_matrix(shapes, freq, choices, args.batch_tokens, anchors=args.anchors,
                                       holdout=args.holdout, seed=args.seed, layout=layout, repeats=args.repeats,
                                       threads=1)
        t0 = time.perf_counter()
        cache: dict[KernelPoint, float] = {}
        ref = np.zeros_like(lat)
        for u, (o, i) in enumerate(shapes):
            for c, ch in enumerate(choices):
                pt = KernelPoint(int(m_int[u]), o, i, ch.bits)
                if pt not in cache:
                    cache[pt] = measure_latency(pt, 128, layout, "cpu", 3, args.repeats, args.seed, threads=1)
                ref[u, c] = p[u] * cache[pt]
        t_ref = time.perf_counter() - t0
        ratio = lat / ref
        rho = spearmanr(lat.ravel(), ref.ravel()).statistic
        per_choice = " / ".join(f"{1e3 * lat[:, c].sum():.1f} ({1e3 * ref[:, c].sum():.1f})" for c in range(len(choices)))
        rows.append([layout, info["anchors"], f"{info['measure_seconds']:.1f}", len(cache), f"{t_ref:.1f}",
                     f"{100 * np.expm1(info['holdout_median_abs_log_ratio']):.1f} / {info['holdout_max_ratio']:.2f}",
                     f"{100 * np.expm1(np.median(np.abs(np.log(ratio)))):.1f} / {np.max(np.maximum(ratio, 1 / ratio)):.2f}",
                     f"{rho:.3f}", per_choice])
        print(rows[-1], flush=True)
    notes += [
        f"model `{args.model}`: {len(units)} units, shapes {sorted(set(map(tuple, shapes)))}, tokens per unit "
        f"{m_int.min()}..{m_int.max()} at batch {args.batch_tokens}; choices {', '.join(c.label for c in choices)}; "
        f"median of {args.repeats} timed calls after 3 warm-up calls; {THREADS_NOTE}.",
        "error columns: median |relative error| in % (as exp(median |log ratio|) - 1) / worst ratio max(pred/meas, "
        "meas/pred); held-out = the random points measured beside the anchors and never fitted; all units = the FRI "
        "matrix against every unit's own measurement (Spearman rho over all (unit, choice) entries).",
        "total ms per forward: sum over units of the FRI prediction (measured) for every unit at one choice, columns "
        f"{' / '.join(c.label for c in choices)} -- the cost a latency budget sees. The measurement noise of a shared "
        "CPU (other jobs running) is part of both columns.",
        "bitplane: codes stored as b bit-planes (b/8 bytes per weight, unpacking work ~ b); byte: one code per byte, "
        "so all quantized bit-widths cost the same and a latency budget cannot trade 2 against 8 bits.",
        f"total benchmark time {time.perf_counter() - t_start:.0f} s.",
    ]
    write_table("fri_latency", ["code layout", "anchors", "anchor + held-out measuring s", "points measured for all units",
                                "measuring all s", "held-out error % / worst ratio", "all units error % / worst ratio",
                                "rho (all entries)", "total ms per forward: FRI (measured)"], rows, notes)


if __name__ == "__main__":
    main()
