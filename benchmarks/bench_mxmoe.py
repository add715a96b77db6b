"""Demo-model perplexity at 2.25, 2.5 and 3.25 average bits: uniform GPTQ, MPQ-Freq, MxMoE per linear
block, MxMoE per expert (the paper's Table 5 granularity) -- all with GPTQ g128, same calibration.

    .venv/bin/python benchmarks/bench_mxmoe.py [--nsamples 128] [--budgets 2.25,3.25]

MxMoE = full expert-local profiling of every unit x {2,3,4,8} bits + exact ILP (HiGHS) on
sum f_u l_u(c). Writes benchmarks/results/mxmoe.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import write_table
from moebits.allocate import expert_level, plan_under_budget
from moebits.apply import apply_plan
from moebits.budget import Budget
from moebits.calibrate import calibrate
from moebits.data import calibration_windows, load_text, tokenize
from moebits.evaluate import perplexity
from moebits.models import load_model
from moebits.plan import Plan
from moebits.profile import new_table, profile
from moebits.units import Choice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--budgets", default="2.25,2.5,3.25")  # 2.25 = the floor of {2,3,4,8} g128: all-2-bit only
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    model, tok, ad = load_model(args.model)
    units, shapes = ad.units(), ad.shapes()
    original = {u: ad.weight(u).clone() for u in units}
    cal = calibrate(ad, calibration_windows(tok, "demo", args.nsamples, args.seqlen, args.seed), seed=args.seed)
    stats = cal.stats_by_unit()
    choices = [Choice(b, 128, "gptq") for b in (2, 3, 4, 8)]
    t0 = time.perf_counter()
    table = profile(ad, "expert", units, choices, stats, cal.inputs, table=new_table(ad, choices, stats))
    t_prof = time.perf_counter() - t0
    eval_ids = tokenize(tok, load_text("demo", "eval"))

    def run(plan: Plan) -> float:
        for u in units:
            ad.set_weight(u, original[u])
        apply_plan(ad, plan, cal.inputs, progress=False)
        return perplexity(model, eval_ids, args.seqlen, max_windows=args.eval_windows, progress=False).ppl

    fp = run(Plan.uniform(units, shapes, Choice(16)))
    rows = []
    for b in [float(x) for x in args.budgets.split(",")]:
        budget = Budget.build("bits", b, units, shapes, choices)
        methods = {
            "uniform GPTQ": dict(solver="uniform"),
            "freq (MPQ-Freq)": dict(solver="freq"),
            "mxmoe, linear-block": dict(solver="ilp"),
            "mxmoe, expert-level": dict(solver="ilp", groups=expert_level(units)),
        }
        for name, kw in methods.items():
            plan = plan_under_budget(table, budget, meta={"method": name}, **kw)
            ppl = run(plan)
            rows.append([f"{b:.2f}", name, f"{plan.avg_bits(shapes):.4f}", f"{plan.meta['total_loss']:.4g}", f"{ppl:.3f}",
                         f"{100 * (ppl / fp - 1):+.2f}"])
            print(rows[-1], flush=True)
    notes = [f"model `{args.model}`, fp perplexity {fp:.3f} on the held-out plays; calibration {args.nsamples} x "
             f"{args.seqlen} tokens; GPTQ g128 everywhere; full profiling {len(units) * len(choices):,} measurements "
             f"in {t_prof:.1f} s.",
             "objective = sum_u f_u l_u(c_u) (expert-local error per routed token times routed frequency)."]
    write_table("mxmoe", ["budget", "method", "avg bits", "objective", "ppl", "Δppl %"], rows, notes)


if __name__ == "__main__":
    main()
