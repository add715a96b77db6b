"""FRI beyond the paper (issue 15) on the demo model: rule budget vs the plan's true objective, for
{stratified, random, adaptive} samplers x {FRI (paper), Ridge on log error, Ridge + RTN proxy (the default)};
the predictor chosen by anchor-only cross-validation *and* by the plans' true objective; perplexity of the
default configuration vs MxMoE (full profiling + ILP) and vs the paper-faithful configuration.

    .venv/bin/python benchmarks/bench_fri_rules.py [--seeds 0,1,2] [--fractions 0.05,0.1,0.15,0.2]
        [--predictors fri,ridge,knn,gbm,mlp] [--eval-windows 200] [--skip-ppl]

Ground truth: the full expert-local GPTQ table of each seed (bench_fri_common.load_demo: seed 0 is the
committed `demo_table_gptq.csv`, other seeds are profiled in-process once and cached). A configuration
*measures* pairs by reading them from that table, so each configuration costs only prediction and
allocation; its profiling cost is the measured seconds (`table.seconds`) of the pairs it used, plus the
RTN proxy's seconds (measured here, in-process) when it uses the proxy, as a fraction of the seconds of
every pair (full profiling). The proxy is timed against a full profiling wall time measured in the same
process, so both parts of the fraction compare work done under the same conditions.

True objective: sum_u f_u l_u(c_u) of the plan under the full table; gap = true objective / the full
table's ILP optimum - 1, same budget and seed. Plans: Lagrangian + greedy fill unless named otherwise.
Rule budget: fraction x units x 4 bit-widths (pairs); the expert samplers profile whole experts within it.
Writes benchmarks/results/fri_rules.md, fri_rules_predictors.md, fri_rules_ppl.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.model_selection import GroupKFold

from _common import FP16_ZEROS, write_table
from bench_fri_ablation import Evaluator
from bench_fri_common import THREADS_NOTE, anchor_units, heldout_metrics, load_demo, sparse
from moebits import cost as costs
from moebits.methods.fri.adaptive import adaptive_fill
from moebits.allocate import allocate
from moebits.allocate.problem import totals
from moebits.methods.fri.features import PAPER_GROUPS, FeatureSpec, build_features
from moebits.methods.fri.predictors import _prepare, fit_table, make_estimator, predict_table
from moebits.profile import new_table, profile
from moebits.methods.fri.proxy import rtn_proxy
from moebits.table import SensitivityTable

PAPER = FeatureSpec(PAPER_GROUPS)
WITH_PROXY = FeatureSpec(PAPER_GROUPS + ("proxy",))
SAMPLERS = ("stratified", "random", "adaptive")


class Seed:
    """Everything one calibration seed needs: truth, costs, optimum, proxy and its cost."""

    def __init__(self, seed: int, budgets: list[float]):
        self.d = d = load_demo(seed=seed)
        self.seed, self.table, self.stats = seed, d.table, d.stats
        units = self.table.units
        shapes = d.adapter.shapes()
        self.shape_list = [shapes[u] for u in units]
        self.storage = costs.storage_matrix(self.shape_list, self.table.choices, FP16_ZEROS)
        self.budget = {b: costs.avg_bits_to_total_bits(b, self.shape_list) for b in budgets}
        self.opt = {b: allocate(self.table.loss, self.storage, B, solver="ilp") for b, B in self.budget.items()}
        runs = []
        for _ in range(3):  # median of 3: the machine is shared
            runs.append(rtn_proxy(d.adapter, units, self.table.choices, d.cal.inputs))
        self.proxy = sorted(runs, key=lambda p: p.seconds)[1]
        t0 = time.perf_counter()  # full profiling wall time in this process, the proxy's reference
        profile(d.adapter, "expert", units, self.table.choices, d.cal.stats, d.cal.inputs,
                table=new_table(d.adapter, self.table.choices, d.cal.stats), progress=False)
        self.full_wall = time.perf_counter() - t0
        self.all_seconds = float(self.table.seconds.sum())

    def cost_fraction(self, measured: np.ndarray, uses_proxy: bool) -> float:
        f = float(self.table.seconds[measured].sum()) / self.all_seconds
        return f + (self.proxy.seconds / self.full_wall if uses_proxy else 0.0)

    def gap(self, error: np.ndarray, b: float, fill: bool = True) -> tuple[float, np.ndarray]:
        loss = self.table.frequency[:, None] * error
        idx = allocate(loss, self.storage, self.budget[b], solver="lagrangian", fill=fill).choice_index
        return 100 * (totals(self.table.loss, self.storage, idx)[0] / self.opt[b].total_loss - 1), idx

    def empty(self) -> SensitivityTable:
        t = self.table
        return SensitivityTable(list(t.units), list(t.choices), frequency=t.frequency.copy())

    def measure_into(self, table: SensitivityTable):
        def measure(pairs):
            for u, c in pairs:
                if table.measured[u, c]:
                    raise AssertionError(f"pair {(u, c)} measured twice")
                table.error[u, c] = self.table.error[u, c]
                table.seconds[u, c] = self.table.seconds[u, c]
                table.measured[u, c] = True
        return measure


def fill(s: Seed, sampler: str, predictor: str, spec: FeatureSpec, rules: int, b: float):
    """-> (filled table, measured mask) for one configuration."""
    proxy = s.proxy.values if "proxy" in spec.groups else None
    est = make_estimator(predictor, s.seed)
    if sampler == "adaptive":
        table = s.empty()
        res = adaptive_fill(table, s.stats, s.measure_into(table), rules, s.storage, s.budget[b], est, spec, proxy,
                            seed=s.seed)
        assert res.rules <= rules
        return res.table, table.measured.copy()
    frac = (rules // len(s.table.choices)) / len(s.table.units)
    mask = anchor_units(s.table, sampler, frac, s.seed)
    sp = sparse(s.table, mask)
    return predict_table(sp, fit_table(sp, s.stats, est, spec, proxy), unit_offset=True), sp.measured.copy()


def ms(xs, digits=2) -> str:
    xs = np.asarray(xs, float)
    return f"{xs.mean():+.{digits}f} ± {xs.std(ddof=1):.{digits}f}" if len(xs) > 1 else f"{xs.mean():+.{digits}f}"


def anchor_cv(s: Seed, predictor: str, spec: FeatureSpec, fraction: float, folds: int = 5) -> tuple[float, float]:
    """5-fold cross-validation over the stratified anchor experts only (grouped by expert): log10 RMSE
    and within-bit Spearman of the held-out folds' predictions."""
    from scipy.stats import spearmanr

    mask = anchor_units(s.table, "stratified", fraction, s.seed)
    proxy = s.proxy.values if "proxy" in spec.groups else None
    F = build_features(s.stats, s.table.choices, spec, proxy)
    C = len(s.table.choices)
    units = np.flatnonzero(mask)
    groups = np.array([f"{s.table.units[u].layer}.{s.table.units[u].expert}" for u in units])
    y = np.log(s.table.error[units])
    pred = np.zeros_like(y)
    for tr, te in GroupKFold(n_splits=folds).split(units, groups=groups):
        rows = (units[tr][:, None] * C + np.arange(C)).ravel()
        est = _prepare(make_estimator(predictor, s.seed), F)
        est.fit(F.X[rows], s.table.error.ravel()[rows])
        q = (units[te][:, None] * C + np.arange(C)).ravel()
        pred[te] = np.log(est.predict(F.X[q])).reshape(len(te), C)
    rmse = float(np.sqrt(((pred - y) ** 2).mean()) / np.log(10))
    rho = float(np.mean([spearmanr(pred[:, c], y[:, c]).statistic for c in range(C)]))
    return rmse, rho


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fractions", default="0.05,0.1,0.15,0.2")
    ap.add_argument("--budgets", default="2.5,3.25")
    ap.add_argument("--default-fraction", type=float, default=0.15)
    ap.add_argument("--predictors", default="fri,ridge,knn,gbm,mlp")
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--skip-ppl", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # see bench_fri_common.THREADS_NOTE
    t_start = time.perf_counter()
    seeds = [int(x) for x in args.seeds.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    configs = [("FRI (paper)", "fri", PAPER), ("Ridge, log target", "ridge", PAPER),
               ("Ridge + proxy (default)", "ridge", WITH_PROXY)]
    cells: dict[tuple, dict[str, list]] = {}
    pred_cells: dict[tuple, dict[str, list]] = {}
    ppl_rows, info = [], {}
    for seed in seeds:
        s = Seed(seed, budgets)
        info[seed] = (s.proxy.seconds, s.full_wall, s.all_seconds)
        print(f"seed {seed}: proxy {s.proxy.seconds:.2f} s, full profiling {s.full_wall:.1f} s wall "
              f"({s.all_seconds:.1f} s in the table)", flush=True)
        U = len(s.table.units)
        # ---- 1. rule budget x sampler x predictor
        for frac in fractions:
            rules = int(np.floor(frac * U + 1e-9)) * len(s.table.choices)
            for sampler in SAMPLERS:
                for label, pred, spec in configs:
                    c = cells.setdefault((frac, rules, sampler, label), {"cost": [], **{b: [] for b in budgets}})
                    table = mask = None
                    for b in budgets:
                        if table is None or sampler == "adaptive":  # adaptive sampling depends on the budget
                            table, mask = fill(s, sampler, pred, spec, rules, b)
                            c["cost"].append(100 * s.cost_fraction(mask, "proxy" in spec.groups))
                        c[b].append(s.gap(table.error, b)[0])
                    print(seed, frac, sampler, label, [f"{c[b][-1]:+.2f}" for b in budgets], f"{c['cost'][-1]:.1f} %",
                          flush=True)
        # ---- 2. predictors: anchor-only CV and the true objective of adaptive plans at the default budget
        rules = int(np.floor(args.default_fraction * U + 1e-9)) * len(s.table.choices)
        for pred in args.predictors.split(","):
            for spec_name, spec in (("Table 7", PAPER), ("Table 7 + proxy", WITH_PROXY)):
                c = pred_cells.setdefault((pred, spec_name), {"cv_rmse": [], "cv_rho": [], "fit_s": [],
                                                              **{b: [] for b in budgets}})
                rmse, rho = anchor_cv(s, pred, spec, args.default_fraction)
                c["cv_rmse"].append(rmse)
                c["cv_rho"].append(rho)
                t0 = time.perf_counter()
                for b in budgets:
                    table, _ = fill(s, "adaptive", pred, spec, rules, b)
                    c[b].append(s.gap(table.error, b)[0])
                c["fit_s"].append((time.perf_counter() - t0) / len(budgets))
                print(seed, pred, spec_name, f"cv {rmse:.3f} {rho:.3f}", [f"{c[b][-1]:+.2f}" for b in budgets], flush=True)
        # ---- 3. perplexity: MxMoE vs the default vs the paper-faithful configuration (+ the solver variants)
        if not args.skip_ppl:
            ev = Evaluator(s.d, 256, args.eval_windows or None)
            fp = ev.fp()
            choices = s.table.choices
            for b in budgets:
                ref = s.opt[b].choice_index
                plans = {"MxMoE: full profiling + ILP": (ref, 100.0, 0.0)}
                table, mask = fill(s, "adaptive", "ridge", WITH_PROXY, rules, b)
                cost = 100 * s.cost_fraction(mask, True)
                for fill_, name in ((True, "default: adaptive + Ridge + proxy, Lagrangian + fill"),
                                    (False, "default sensitivities, Lagrangian without fill (Alg. 1)")):
                    g, idx = s.gap(table.error, b, fill_)
                    plans[name] = (idx, cost, g)
                table, mask = fill(s, "stratified", "fri", PAPER, rules, b)
                cost = 100 * s.cost_fraction(mask, False)
                for fill_, name in ((False, "paper: stratified + FRI, Lagrangian without fill (Alg. 1)"),
                                    (True, "paper sensitivities, Lagrangian + fill")):
                    g, idx = s.gap(table.error, b, fill_)
                    plans[name] = (idx, cost, g)
                for name, (idx, cost, g) in plans.items():
                    d_nll = ev.nll_of(idx, choices) - ev.nll_of(ref, choices)
                    ppl_rows.append((b, name, seed, cost, g, 100 * np.expm1(d_nll.mean()),
                                     100 * (ev(idx, choices) / fp - 1)))
                    print(ppl_rows[-1], flush=True)

    # ---------------------------------------------------------------- tables
    rows = []
    for (frac, rules, sampler, label), c in cells.items():
        rows.append([f"{100 * frac:.0f} %", rules, sampler, label, f"{np.mean(c['cost']):.1f}"]
                    + [ms(c[b]) for b in budgets])
    p0, w0, a0 = info[seeds[0]]
    notes = [
        f"model `demo`, GPTQ g128 bits {{2,3,4,8}}; seeds {args.seeds}: each seed has its own calibration (32 x 256 "
        "tokens), full ground-truth table, anchors and adaptive draws; cells are mean ± sd over seeds.",
        "gap = true objective (sum_u f_u l_u under the full table) of the plan / full-profiling ILP optimum - 1, at the "
        "same budget; plans by the Lagrangian with greedy fill.",
        "rules = fraction x units x 4 bit-widths; stratified / random profile whole experts (all 4 bits) within it, "
        "adaptive profiles single (unit, bit) pairs: 1/3 of the budget as stratified routed experts, then 4 rounds.",
        f"cost % = seconds of the pairs profiled / seconds of all pairs (the full table), + RTN proxy seconds / full "
        f"profiling wall seconds when the proxy is used (seed {seeds[0]}: proxy {p0:.2f} s, full profiling {w0:.1f} s "
        f"wall here, {a0:.1f} s summed in the table); GPTQ Hessians are not in `table.seconds` (both sides need them "
        "for the units they profile).",
        "FRI (paper) = FRIRegressor defaults on Table 7's features; Ridge = Ridge(alpha=1) on log error, same features; "
        "+ proxy = plus the RTN weight-space proxy (proxy.py); every table is hybrid with per-unit offsets "
        "(predictors.py; no effect on whole-expert anchors).",
        f"{THREADS_NOTE}; total benchmark time {time.perf_counter() - t_start:.0f} s.",
    ]
    write_table("fri_rules", ["rule budget", "rules", "sampler", "predictor", "cost % of full profiling"]
                + [f"gap % at {b} bits" for b in budgets], rows, notes)

    rows = []
    for (pred, spec_name), c in pred_cells.items():
        rows.append([pred, spec_name, f"{np.mean(c['cv_rmse']):.3f} ± {np.std(c['cv_rmse'], ddof=1):.3f}"
                     if len(seeds) > 1 else f"{c['cv_rmse'][0]:.3f}",
                     f"{np.mean(c['cv_rho']):.3f}"] + [ms(c[b]) for b in budgets] + [f"{np.mean(c['fit_s']):.1f}"])
    notes = [
        f"anchor-only CV: 5-fold, grouped by expert, over the stratified anchor experts of a {100 * args.default_fraction:.0f} % "
        "budget (no held-out unit is used): log10 RMSE and within-bit Spearman of the held-out folds.",
        f"plan gap: adaptive sampler at {100 * args.default_fraction:.0f} % rules with that predictor and feature set, "
        "Lagrangian + fill; mean ± sd over seeds. seconds = one adaptive fill (4 rounds, 8 bootstrap refits each).",
        "knn = KNeighborsRegressor(4, distance weights), gbm = GradientBoostingRegressor(300, depth 3), mlp = "
        "MLPRegressor(64, 64), all on log error (predict.make_estimator).",
    ]
    write_table("fri_rules_predictors", ["predictor", "features", "CV log10 RMSE", "CV within-bit rho"]
                + [f"plan gap % at {b}" for b in budgets] + ["seconds"], rows, notes)

    if ppl_rows:
        rows = []
        names = list(dict.fromkeys(r[1] for r in ppl_rows))
        for b in budgets:
            for name in names:
                rs = [r for r in ppl_rows if r[0] == b and r[1] == name]
                d = np.array([r[5] for r in rs])
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
                verdict = "identical" if not d.any() else ("within noise" if abs(d.mean()) <= 2 * se else
                                                           ("worse" if d.mean() > 0 else "better"))
                rows.append([f"{b}", name, f"{np.mean([r[3] for r in rs]):.1f}", ms([r[4] for r in rs]),
                             f"{ms(d)} {verdict}", ms([r[6] for r in rs])])
        notes = [
            f"held-out perplexity of the demo's plays (first {args.eval_windows} windows of 256 tokens), plans applied "
            "with GPTQ g128 on each seed's calibration; Δppl vs MxMoE = the same seed's full-profiling ILP plan, mean ± "
            "sd over seeds; 'within noise' when |mean| <= 2 standard errors over seeds.",
            f"rule budget {100 * args.default_fraction:.0f} % of units x 4 bits; paper = `--sampler stratified --predictor "
            "fri --no-proxy --solver lagrangian --no-fill`; default = `moebits quantize --method fri`.",
        ]
        write_table("fri_rules_ppl", ["avg bits", "configuration", "cost % of full profiling",
                                      "true objective gap %", "Δppl vs MxMoE %", "Δppl vs fp %"], rows, notes)


if __name__ == "__main__":
    main()
