"""FRI's adaptive sampler by acquisition (issue 25) on the demo model: `expert` (whole-expert rounds, the
default), `score` (the default before) and `per-cost` (opt-in): the plans' true-objective gap vs the
full-profiling ILP plan, pairs measured, experts touched, the modelled and table-measured profiling cost,
and (`--ppl`) the plans' perplexity paired with MxMoE's, at the default 15 % rule budget.

    .venv/bin/python benchmarks/bench_fri_acquisition.py [--seeds 0,1,2] [--budgets 2.5,3.25] [--fraction 0.15]
        [--acquisitions expert,score,per-cost] [--ppl WINDOWS]

A variant is `expert[:pairs per expert[:pairs per unit[:start share]]]` (defaults 3, 1 and
`adaptive.INITIAL_SHARE`), `score` or `per-cost`. Pairs are read from each seed's full ground-truth GPTQ
table (bench_fri_rules.Seed: seed 0 is the committed `demo_table_gptq.csv`, other seeds are profiled
in-process once and cached), so only sampling, prediction and allocation run; the default configuration
(Ridge + RTN proxy, Lagrangian + fill). Writes benchmarks/results/fri_acquisition.md (`--name`). The wall
clock side is `bench_stages.py` (results/stages.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import write_table
from bench_fri_ablation import Evaluator
from bench_fri_common import THREADS_NOTE
from bench_fri_rules import WITH_PROXY, Seed
from moebits.methods.fri.adaptive import EXPERT_OVERHEAD, adaptive_fill, expert_ids, relative_pair_cost
from moebits.methods.fri.predictors import make_estimator

ACQ = ("expert", "score", "per-cost")


def run(s: Seed, variant: str, rules: int, b: float) -> dict:
    acquisition, *rest = variant.split(":")
    kw = dict(zip(("per_expert", "per_unit", "initial"), [t(v) for t, v in zip((int, int, float), rest)]))
    table = s.empty()
    res = adaptive_fill(table, s.stats, s.measure_into(table), rules, s.storage, s.budget[b],
                        make_estimator("ridge", s.seed), WITH_PROXY, s.proxy.values, seed=s.seed,
                        acquisition=acquisition, **kw)
    m = table.measured
    assert res.rules == int(m.sum()) <= rules
    touched = np.unique(expert_ids(table)[m.any(axis=1)])
    n_experts = expert_ids(table).max() + 1
    model_cost = float(relative_pair_cost(table)[:, None].repeat(m.shape[1], 1)[m].sum()) + EXPERT_OVERHEAD * len(touched)
    full_cost = float(relative_pair_cost(table).sum()) * m.shape[1] + EXPERT_OVERHEAD * n_experts
    gap, idx = s.gap(res.table.error, b)
    return {"gap": gap, "idx": idx, "pairs": int(m.sum()), "experts": len(touched),
            "n_experts": int(n_experts), "model": 100 * model_cost / full_cost,
            "table": 100 * float(s.table.seconds[m].sum()) / s.all_seconds}


def ms(xs, digits=2, sign=True) -> str:
    xs = np.asarray(xs, float)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(xs.mean()) + (f" ± {xs.std(ddof=1):.{digits}f}" if len(xs) > 1 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="2.5,3.25")
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--acquisitions", default=",".join(ACQ),
                    help="variants: score, per-cost, expert[:pairs per expert[:pairs per unit]]")
    ap.add_argument("--name", default="fri_acquisition")
    ap.add_argument("--ppl", type=int, default=0, metavar="WINDOWS",
                    help="also the plans' held-out perplexity on this many 256-token windows, paired with the "
                         "same seed's MxMoE (full table + ILP) plan (0: not measured)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    seeds = [int(x) for x in args.seeds.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    cells: dict[tuple, list[dict]] = {}
    for seed in seeds:
        s = Seed(seed, budgets)
        rules = int(np.floor(args.fraction * len(s.table.units) + 1e-9)) * len(s.table.choices)
        ev = Evaluator(s.d, 256, args.ppl) if args.ppl else None
        for b in budgets:
            for acq in args.acquisitions.split(","):
                r = run(s, acq, rules, b)
                r["rules"] = rules
                if ev is not None:  # paired over windows: the same tokens for both plans
                    ref = ev.nll_of(s.opt[b].choice_index, s.table.choices)
                    r["dppl"] = 100 * float(np.expm1((ev.nll_of(r["idx"], s.table.choices) - ref).mean()))
                del r["idx"]
                cells.setdefault((b, acq), []).append(r)
                print(seed, b, acq, {k: round(v, 3) for k, v in r.items()}, flush=True)
    rows = []
    for (b, acq), rs in cells.items():
        g = lambda k: [r[k] for r in rs]  # noqa: E731
        rows.append([f"{b}", acq + (" (default)" if acq == "expert" else ""), ms(g("gap")),
                     f"{np.mean(g('pairs')):.0f} / {rs[0]['rules']}",
                     f"{ms(g('experts'), 1, False)} / {rs[0]['n_experts']}",
                     f"{np.mean(g('pairs')) / np.mean(g('experts')):.2f}",
                     ms(g("model"), 1, False), ms(g("table"), 1, False)]
                    + ([ms(g("dppl"))] if args.ppl else []))
    notes = [
        f"model `demo`, GPTQ g128 bits {{2,3,4,8}}, seeds {args.seeds} (each its own calibration, full table, "
        f"draws); rule budget {100 * args.fraction:.0f} % of units x 4 bits; adaptive sampler, Ridge + RTN proxy, "
        "Lagrangian + fill (the default FRI); cells are mean ± sd over seeds.",
        "gap = true objective (sum_u f_u l_u under the full table) of the plan / full-profiling ILP optimum - 1, "
        "same budget and seed (as fri_rules.md).",
        "experts touched = experts (gate, up, down together; a layer's shared expert counts once) with at least "
        "one measured pair; the per-expert overhead (reference forward + two prepared GPTQ Hessians) is paid once "
        "per touched expert.",
        f"modelled cost % = (sum of measured pairs' relative costs (0.4 + 0.6 x routed tokens relative to the mean routed expert, adaptive.relative_pair_cost) + {EXPERT_OVERHEAD} "
        "average pairs per touched expert) / the same for full profiling: the cost model per-cost ranks by "
        f"(adaptive.EXPERT_OVERHEAD = {EXPERT_OVERHEAD}, from stages.md's OLMoE-shaped FRI pairs: 688 pairs on 260 "
        "experts in 1.06 s at ~1.5 ms per expert leaves ~1.0 ms per pair).",
        "table cost % = the measured pairs' seconds in the full table (GPTQ + forward per pair, without the "
        "per-expert overhead beyond the pair's share of it there, as in fri_rules.md) / all pairs' seconds; the wall clock is stages.md (`bench_stages.py --also score`).",
        (f"Δppl vs MxMoE = held-out perplexity of the plan (GPTQ g128, each seed's calibration; first {args.ppl} "
         "windows of 256 tokens of the demo's evaluation text) / that of the same seed's full-profiling ILP plan - 1, "
         "paired by window" if args.ppl else "perplexity not measured (`--ppl WINDOWS`); the gap is the objective "
         "both plans optimise."),
        f"{THREADS_NOTE}; total benchmark time {time.perf_counter() - t_start:.0f} s.",
    ]
    write_table(args.name, ["avg bits", "acquisition", "true objective gap %", "pairs / rule budget",
                                    "experts touched / all", "pairs per expert", "modelled cost % of full",
                                    "table cost % of full"] + (["Δppl vs MxMoE %"] if args.ppl else []), rows, notes)


if __name__ == "__main__":
    main()
