"""Allocator speed and quality at DeepSeek-V2 scale: Lagrangian (paper-exact and with greedy fill) vs the
exact ILP (HiGHS alone, and HiGHS after reduced-cost fixing), plus the MPQ-Freq and uniform baselines.

Why 155,520 units. The seed's Table 2 lists DeepSeek-V2's "search space" as 155,520. For the other
models that number is layers x routed experts x 27 (Mixtral 32 x 8 x 27 = 6,912; Qwen1.5-MoE
24 x 60 x 27 = 38,880; DeepSeek-V2-Lite 27 x 64 x 27 = 46,656), i.e. 3 kinds x 9 candidate settings
per expert. For DeepSeek-V2 (60 layers x 160 routed experts) the same rule gives 259,200; 155,520 =
36 x 160 x 27 does not decompose with its real 60 layers. We take 155,520 as the number of *units*
(each with 4 choices: 622,080 binaries, more than either reading of the paper) as a stress size:
60 layers x (863 routed + 1 shared expert) x 3 kinds, with DeepSeek-V2-Lite shapes (hidden 2048, expert
width 1408, shared width 2816). The real DeepSeek-V2 (59 MoE layers x (160 routed + 1 shared MLP) x 3 =
28,497 units, hidden 5120, width 1536, shared 3072) is the second instance.

Synthetic sensitivities (seeded): intrinsic error l_u(b) = s_u * 2^(-a_u b) * noise, s_u lognormal and
larger for `down` and for shallow layers, a_u in [1.7, 2.1] (a uniform quantizer's MSE falls ~4x per
bit), 10 % lognormal noise, made non-increasing in bits; the objective weights it by the routed
frequency f_u (per layer lognormal(0, 1.2) over the routed experts, normalised to top-6, capped at 1;
shared expert f = 1). Costs: exact storage bits of {2, 3, 4, 8}-bit g128.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import FP16_ZEROS, write_table
from moebits.allocate import allocate, layer_uniform
from moebits.budget import Budget
from moebits.table import SensitivityTable
from moebits.units import KINDS, SHARED, Choice, Unit

CHOICES = [Choice(b, 128) for b in (2, 3, 4, 8)]


def make_instance(layers, routed, hidden, width, shared_width, top_k=6, seed=0):
    rng = np.random.default_rng(seed)
    units, shapes, freq = [], [], []
    for layer in range(layers):
        f = rng.lognormal(0.0, 1.2, routed)
        f = np.minimum(f / f.sum() * top_k, 1.0)
        for e, fe in [(e, f[e]) for e in range(routed)] + [(SHARED, 1.0)]:
            w = shared_width if e == SHARED else width
            for kind in KINDS:
                units.append(Unit(layer, e, kind))
                shapes.append((hidden, w) if kind == "down" else (w, hidden))
                freq.append(fe)
    U = len(units)
    freq = np.array(freq)
    depth = np.array([u.layer for u in units]) / max(1, layers - 1)
    kind_factor = np.array([2.0 if u.kind == "down" else 1.0 for u in units])
    s = rng.lognormal(0.0, 1.0, U) * kind_factor * (1.5 - depth)
    a = rng.uniform(1.7, 2.1, U)
    bits = np.array([c.bits for c in CHOICES], dtype=float)
    err = s[:, None] * 2.0 ** (-a[:, None] * bits[None, :]) * rng.lognormal(0.0, 0.1, (U, len(bits)))
    err = np.minimum.accumulate(err, axis=1)
    return SensitivityTable(units, CHOICES, error=err, frequency=freq), dict(zip(units, shapes))


def timed(fn, repeats):
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return res, float(np.median(times))


def fmt_gap(x):
    x = None if x is None else max(x, 0.0) if x > -1e-12 else x
    return "—" if x is None else f"{100 * x:.2e}" if 0 < 100 * x < 1e-3 else f"{100 * x:.4f}"


def bench(name, table, shapes, budgets, args, rows, plain_budgets=None):
    units, freq, loss = table.units, table.frequency, table.loss
    U = len(units)
    print(f"{name}: {U:,} units x {len(CHOICES)} choices", flush=True)
    for avg in budgets:
        b = Budget.build("bits", avg, units, shapes, CHOICES, zero_points=FP16_ZEROS)
        cost, budget = b.cost, b.total
        for grouping, groups in (("linear", None), ("layer", layer_uniform(units) if args.grouped else None)):
            if grouping == "layer" and groups is None:
                continue
            opt, t_opt = timed(lambda: allocate(loss, cost, budget, "ilp", groups=groups, mip_rel_gap=args.mip_gap,
                                                time_limit=args.ilp_limit), 1)
            ref = opt.total_loss

            def row(solver, res, seconds, proven=None, note=""):
                used = res.total_cost / budget * avg
                rows.append([name, f"{avg:.2f}", grouping, solver, f"{seconds * 1e3:,.1f}",
                             fmt_gap((res.total_loss - ref) / ref), fmt_gap(proven), f"{used:.4f}", note])
                print("  ", rows[-1], flush=True)

            for fill, label in ((False, "lagrangian, paper (bisection only)"), (True, "lagrangian + greedy fill (ours)")):
                res, t = timed(lambda: allocate(loss, cost, budget, "lagrangian", groups=groups, fill=fill), args.repeats)
                row(label, res, t, res.gap, f"{res.info['iterations']} bisection steps"
                    + (f", {res.info['fill_upgrades']} upgrades" if fill else ""))
            row("ilp: HiGHS after reduced-cost fixing", opt, t_opt, opt.gap,
                f"{opt.info.get('free_units', 0):,} {'groups' if groups is not None else 'units'} left to HiGHS" + (", optimal" if opt.optimal else f", stopped at the {args.ilp_limit:.0f} s limit"))
            if grouping == "linear" and args.plain_limit > 0 and (plain_budgets is None or avg in plain_budgets):
                t = time.perf_counter()
                try:
                    plain = allocate(loss, cost, budget, "ilp", reduce=False, mip_rel_gap=args.mip_gap,
                                     time_limit=args.plain_limit)
                    row("ilp: HiGHS alone", plain, time.perf_counter() - t, plain.gap,
                        "optimal" if plain.optimal else f"stopped at the {args.plain_limit:.0f} s limit")
                except RuntimeError as e:
                    rows.append([name, f"{avg:.2f}", grouping, "ilp: HiGHS alone", f"{(time.perf_counter() - t) * 1e3:,.0f}",
                                 "—", "—", "—", f"no plan within {args.plain_limit:.0f} s ({e})"])
            if grouping == "linear":
                for solver in ("freq", "uniform"):
                    try:
                        res, t = timed(lambda: allocate(loss, cost, budget, solver, frequency=freq), 1)
                        row(solver, res, t)
                    except ValueError as e:
                        print("  ", solver, e)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", default="2.25,2.5,3.25")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats of the fast solvers (median)")
    p.add_argument("--plain-limit", type=float, default=20.0, help="time limit of plain HiGHS (s); 0 skips it")
    p.add_argument("--ilp-limit", type=float, default=20.0, help="time limit of HiGHS after reduced-cost fixing (s)")
    p.add_argument("--mip-gap", type=float, default=1e-6, help="relative gap HiGHS must prove (its default is 1e-4)")
    p.add_argument("--no-grouped", dest="grouped", action="store_false", help="skip the layer-uniform rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    rows: list[list] = []
    stress = make_instance(60, 863, 2048, 1408, 2816, seed=args.seed)
    assert len(stress[0].units) == 155_520
    # plain HiGHS needs ~40 s per budget here before its time limit bites: run it at the largest budget only
    bench("stress 155,520", *stress, budgets, args, rows, plain_budgets=budgets[-1:])
    real = make_instance(59, 160, 5120, 1536, 3072, seed=args.seed)
    bench("DeepSeek-V2 28,497", *real, budgets, args, rows)
    notes = [
        "instances: `stress 155,520` = 60 layers x (863 routed + 1 shared expert) x 3 kinds with DeepSeek-V2-Lite "
        "shapes (the seed's Table 2 calls 155,520 DeepSeek-V2's search space, but with 60 layers x 160 experts x 27 "
        "settings, the rule that reproduces its other rows, it would be 259,200; we use 155,520 as a unit count, "
        "622,080 binaries); `DeepSeek-V2 28,497` = its real unit count, 59 MoE layers x (160 routed + 1 shared MLP) x 3.",
        "time: wall seconds of `allocate(...)` on 2 shared CPU cores (median of "
        f"{args.repeats} for the Lagrangian rows); gap to opt: (loss - ILP optimum) / ILP optimum; proven gap: "
        "(loss - proven lower bound) / loss, from HiGHS's dual bound or the Lagrangian dual; avg bits: storage "
        "actually used, incl. g128 metadata.",
        "`ilp: HiGHS alone` on the stress instance is run at the largest budget only: it does not leave the root "
        "node within the limit (~40 s per budget, the limit is checked late) and returns the all-2-bit plan; without a "
        "limit it needed 745 s on an earlier variant of this instance. Time limits are HiGHS's; its presolve can "
        "overrun them (DeepSeek-V2 at 2.5 bits: ~65 s of presolve on the 7,537-unit core; no HiGHS incumbent, so the "
        "row returns the Lagrangian plan with its proven gap).",
        "2.25 bits is the floor of {2,3,4,8}-bit g128 (every unit at 2 bits): a sanity row, every solver must "
        "return the same plan.",
        "granularity `layer`: all routed experts of a layer share one choice per kind (`layer_uniform`); the "
        "problem has 360 / 354 groups with huge steps, which is where bisection alone leaves budget unused.",
        "reduced-cost fixing: the Lagrangian incumbent and its dual bound fix every variable whose reduced cost "
        "exceeds the gap (exact); HiGHS then proves optimality of what is left. Both ILP rows must prove a relative "
        f"gap of {args.mip_gap:g} (HiGHS's default is 1e-4, which the Lagrangian bound alone meets in every `linear` row here, "
        "not in most `layer` rows); `gap to opt` is measured against the reduced ILP's plan (never worse than the "
        "Lagrangian's; where it stopped at the limit, against the best plan found, with the proven gap beside it).",
        f"total benchmark time {time.perf_counter() - t0:.0f} s; instances seeded ({args.seed}); see the module "
        "docstring for how 155,520 decomposes and how sensitivities are drawn.",
    ]
    write_table("solvers", ["instance", "budget (avg bits)", "granularity", "solver", "time (ms)",
                            "gap to opt (%)", "proven gap (%)", "avg bits used", "notes"], rows, notes)


if __name__ == "__main__":
    main()
