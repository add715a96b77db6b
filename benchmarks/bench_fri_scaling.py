"""Profiling cost at a fixed rule budget (`--rules`) as the number of experts grows (issue 15, the paper's
Table 2 / Fig. 3 claim: the rule base, hence profiling, does not grow with E).

    .venv/bin/python benchmarks/bench_fri_scaling.py [--experts 8,16,32,64,128,256] [--rules 120] [--repeats 1]

Models: Qwen2-MoE-shaped random models (bench_fri_cost.scaling_model: 2 layers, hidden 256, expert width
128, shared expert 256, top-4) with E routed experts per layer; calibration 16 x 128 tokens of the demo text.
Rows per E, all wall seconds measured here with the real profiler (expert-local metric, GPTQ g128,
bits {2,3,4,8}):

* full profiling: every unit x bit (MxMoE's table);
* stratified, `--rules N`: whole anchor experts within N pairs (the paper's sampler), FRI fit + predict;
* adaptive, `--rules N` (the default sampler): RTN proxy of every unit (grows with E: one RTN per pair, no
  GPTQ), then the adaptive rounds, each profiling exactly the pairs it picked (one profiler call per
  bit-width per round), Ridge fits and bootstraps in between. The seconds are the sum.

Writes benchmarks/results/fri_scaling.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import FP16_ZEROS, write_table
from bench_fri_common import CHOICES, THREADS_NOTE
from bench_fri_cost import scaling_model
from moebits import cost as costs
from moebits.methods.fri.adaptive import adaptive_fill
from moebits.calibrate import calibrate
from moebits.data import calibration_windows
from moebits.methods.fri.features import PAPER_GROUPS, FeatureSpec
from moebits.models.loading import byte_tokenizer
from moebits.methods.fri.predictors import fit_table, make_estimator, predict_table
from moebits.profile import new_table, profile
from moebits.methods.fri.proxy import rtn_proxy
from moebits.methods.fri.samplers import sample_anchors


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def full(ad, cal, units):
    return timed(lambda: profile(ad, "expert", units, CHOICES, cal.stats, cal.inputs,
                                 table=new_table(ad, CHOICES, cal.stats), progress=False))[1]


def stratified(ad, cal, units, rules, seed):
    anchors = sample_anchors(units, "stratified", rules=rules, seed=seed, bits_per_unit=len(CHOICES))

    def run():
        t = profile(ad, "expert", anchors, CHOICES, cal.stats, cal.inputs, table=new_table(ad, CHOICES, cal.stats),
                    progress=False)
        predict_table(t, fit_table(t, cal.stats, make_estimator("fri")))
        return int(t.measured.sum())
    return timed(run)


def adaptive(ad, cal, units, rules, seed):
    shapes = ad.shapes()
    shape_list = [shapes[u] for u in units]
    storage = costs.storage_matrix(shape_list, CHOICES, FP16_ZEROS)
    budget = costs.avg_bits_to_total_bits(3.25, shape_list)
    prof = {"s": 0.0}

    def run():
        px = rtn_proxy(ad, units, CHOICES, cal.inputs)
        table = new_table(ad, CHOICES, cal.stats)

        def measure(pairs):
            t0 = time.perf_counter()
            for j in sorted({c for _, c in pairs}):
                profile(ad, "expert", [units[u] for u, c in pairs if c == j], [CHOICES[j]], cal.stats, cal.inputs,
                        table=table, progress=False)
            prof["s"] += time.perf_counter() - t0

        res = adaptive_fill(table, cal.stats, measure, rules, storage, budget, make_estimator("ridge"),
                            FeatureSpec(PAPER_GROUPS + ("proxy",)), px.values, seed=seed)
        return res.rules, px.seconds
    (n, t_proxy), total = timed(run)
    return n, t_proxy, prof["s"], total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", default="8,16,32,64,128,256")
    ap.add_argument("--rules", type=int, default=120)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of the rule-budget rows (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # see bench_fri_common.THREADS_NOTE
    t_start = time.perf_counter()
    tok = byte_tokenizer()
    win = calibration_windows(tok, "demo", 16, 128, args.seed)
    rows = []
    for E in [int(e) for e in args.experts.split(",")]:
        model, ad = scaling_model(E, args.layers, args.seed)
        cal = calibrate(ad, win, max_tokens_per_expert=win.numel(), seed=args.seed, progress=False)
        units = ad.units()
        space = len(units) * len(CHOICES)
        t_full = full(ad, cal, units)
        st = sorted((stratified(ad, cal, units, args.rules, args.seed) for _ in range(args.repeats)), key=lambda r: r[1])
        (n_st, t_st) = st[len(st) // 2]
        ad_runs = sorted((adaptive(ad, cal, units, args.rules, args.seed) for _ in range(args.repeats)),
                         key=lambda r: r[3])
        n_ad, t_px, t_prof, t_ad = ad_runs[len(ad_runs) // 2]
        rows.append([E, len(units), f"{space:,}", f"{t_full:.1f}", f"{n_st} / {t_st:.1f}",
                     f"{n_ad} / {t_ad:.1f}", f"{t_px:.2f}", f"{t_prof:.1f}", f"{t_ad - t_px - t_prof:.1f}",
                     f"{t_full / t_ad:.1f}x"])
        print(rows[-1], flush=True)
        del model, ad, cal
    notes = [
        f"random Qwen2-MoE models, {args.layers} layers, hidden 256, expert width 128, shared expert 256, top-4, E routed "
        "+ 1 shared expert per layer; calibration 16 x 128 tokens of the demo text; GPTQ g128, bits {2,3,4,8}.",
        f"rule budget fixed at --rules {args.rules} profiled (unit, bit) pairs; stratified = whole anchor experts "
        "(shared experts first) + FRI; adaptive = the default sampler (proxy + 1/3 stratified start + 4 rounds, Ridge + "
        "proxy, 3.25-bit Lagrangian decision boundary).",
        "adaptive seconds = proxy (RTN of every pair: grows with E, no GPTQ) + profiling of the picked pairs (one "
        "profiler call per bit-width per round, Hessians of the layers touched recomputed per call) + fits / bootstraps "
        "/ scoring between rounds.",
        f"full profiling: one run; rule-budget rows: median of {args.repeats}; {THREADS_NOTE}; the machine was shared "
        f"with other jobs, so absolute seconds vary between rows; total benchmark time {time.perf_counter() - t_start:.0f} s.",
    ]
    write_table("fri_scaling", ["E", "units", "search space (pairs)", "full profiling s", "stratified: rules / s",
                                "adaptive: rules / s", "of which proxy s", "of which profiling s", "of which fits s",
                                "full / adaptive"], rows, notes)


if __name__ == "__main__":
    main()
