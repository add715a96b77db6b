"""FRI prediction quality on the demo model vs rule-base size, stratified vs random anchors (paper
Tables 3 and 9), and the choice of FRIRegressor's `target`, K (`n_neighbors`) and epsilon.

    .venv/bin/python benchmarks/bench_fri_prediction.py [--seeds 5] [--fractions 0.05,0.1,0.15,0.2,0.25]

Ground truth: the full expert-local GPTQ g128 table (see bench_fri_common.py). For each anchor
budget (a fraction of the units; whole experts are anchors, shared experts always) and seed, FRI is
fitted on the anchor units' measured errors and evaluated on the *held-out* units only.

Hyperparameters are chosen without looking at held-out units: for every (target, K, epsilon) of the
grid, a 5-fold cross-validation *over the anchor experts* (shared experts always kept in training)
gives the within-bit Spearman rho of the out-of-fold predictions; the configuration with the best
mean CV rho over all budgets and seeds is the selection. Held-out numbers for the grid are printed
next to it for information only. Writes benchmarks/results/fri_prediction.md.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from _common import write_table
from bench_fri_common import FRACTIONS, THREADS_NOTE, anchor_units, heldout_metrics, load_demo, mean_std, predict
from moebits.methods.fri.interpolation import FRIRegressor

DEFAULT = FRIRegressor()  # the defaults under test


TIE = 0.005  # CV rho differences below this count as ties, broken by the CV MAE log10
MIN_CV_EXPERTS = 10  # anchor sets with fewer routed anchor experts are left out of the CV criterion


def cv_score(table, stats, anchors: np.ndarray, estimator, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """(within-bit Spearman rho, MAE log10) of out-of-fold predictions over the routed anchor experts."""
    experts = sorted({(u.layer, u.expert) for u, a in zip(table.units, anchors) if a and not u.is_shared})
    if len(experts) < MIN_CV_EXPERTS:  # 5-fold CV over 3 experts ranks 6-9 units: noise, not a criterion
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(experts))
    fold_of = {experts[i]: k % min(folds, len(experts)) for k, i in enumerate(order)}
    key = np.array([fold_of.get((u.layer, u.expert), -1) if a and not u.is_shared else -1
                    for u, a in zip(table.units, anchors)])
    oof = np.full(table.error.shape, np.nan)
    for k in range(min(folds, len(experts))):
        val = key == k
        oof[val] = predict(table, stats, anchors & ~val, estimator)[val]
    m = heldout_metrics(table.error, oof, key >= 0)
    return m["rho_bit"], m["mae_log"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--ks", default="1,2,4,8,16,32")
    ap.add_argument("--epsilons", default="1e-6,0.1,1.0")
    args = ap.parse_args()
    torch.set_num_threads(1)  # see bench_fri_common.THREADS_NOTE
    t_start = time.perf_counter()
    d = load_demo(args.model)
    table, stats = d.table, d.stats
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = list(range(args.seeds))

    # ---- 1. rule-base size x sampler, FRI with its defaults (Tables 3 and 9)
    rows = []
    per_bit = {}
    for method in ("stratified", "random"):
        for frac in fractions:
            ms, n_units = [], []
            for seed in seeds:
                a = anchor_units(table, method, frac, seed)
                ms.append(heldout_metrics(table.error, predict(table, stats, a), ~a))
                n_units.append(int(a.sum()))
            per_bit[(method, frac)] = np.nanmean([m["rho_per_bit"] for m in ms], axis=0)
            get = lambda k: [m[k] for m in ms]  # noqa: E731
            rows.append([method, f"{100 * frac:.0f}%", f"{np.mean(n_units):.0f}", f"{4 * np.mean(n_units):.0f}",
                         f"{len(table.units) - np.mean(n_units):.0f}", mean_std(np.array(get("mae")) * 1e3),
                         mean_std(np.array(get("rmse")) * 1e3), mean_std(get("mae_log")), mean_std(get("rmse_log")),
                         mean_std(get("rho_pooled")), mean_std(get("rho_bit")), mean_std(get("rho_bit_min"))])
            print(rows[-1], flush=True)
    bit_labels = [c.label for c in table.choices]
    notes = [
        f"model `{args.model}`: {len(table.units)} units ({len({(u.layer, u.expert) for u in table.units})} experts) x "
        f"{len(table.choices)} choices ({', '.join(bit_labels)}); ground truth `{d.table_source}` (full expert-local "
        "profiling); calibration 32 x 256 tokens, seed 0, frequencies checked against the table.",
        f"FRI with its defaults (target={DEFAULT.target!r}, K={DEFAULT.n_neighbors}, epsilon={DEFAULT.epsilon:g}), "
        "Table 7 features (`FeatureSpec()`: bits, type, M/N/K/FLOPs/AI, activation variance, weight scale).",
        f"anchor budget = fraction of units; anchors are whole experts (3 units x 4 bit-widths = 12 rules each), the "
        f"{sum(u.is_shared for u in table.units)} shared-expert units always included; rules = anchor units x 4. "
        f"Mean ± std over seeds {seeds[0]}..{seeds[-1]}.",
        "all metrics on held-out (non-anchor) units only, all 4 bit-widths. MAE/RMSE: linear domain, in units of "
        "1e-3 of the intrinsic error l_u (squared output error per routed token) -- dominated by the 2-bit "
        "entries, since l spans ~3 decades across bit-widths; MAE/RMSE log10: on log10 l (0.301 = a factor 2), "
        "the scale FRI interpolates on and the one that treats all bit-widths alike -- it makes more sense here.",
        "rho pooled: Spearman over all held-out (unit, bit) pairs (inflated: bit-width alone orders most of them); "
        "rho within-bit: mean over the 4 bit-widths of Spearman across held-out units at equal bits (what the "
        "allocator needs); worst bit: the smallest of the 4.",
    ]
    write_table("fri_prediction", ["sampler", "anchors", "anchor units", "rules", "held-out units",
                                   "MAE (1e-3)", "RMSE (1e-3)", "MAE log10", "RMSE log10", "rho pooled",
                                   "rho within-bit", "rho worst bit"], rows, notes)

    # per-bit rho (stratified) -- which bit-widths are hard
    pb_rows = [[m, f"{100 * f:.0f}%"] + [f"{v:.3f}" for v in per_bit[(m, f)]] for (m, f) in per_bit]

    # ---- 2. hyperparameters: anchor-only CV selects, held-out reported alongside
    ks = [int(k) for k in args.ks.split(",")]
    eps = [float(e) for e in args.epsilons.split(",")]
    grid = list(itertools.product(("log", "linear"), ks, eps))
    cv = {g: [] for g in grid}
    cv_mae = {g: [] for g in grid}
    ho = {g: [] for g in grid}
    ho_log = {g: [] for g in grid}
    for frac in fractions:
        for seed in seeds:
            a = anchor_units(table, "stratified", frac, seed)
            for g in grid:
                est = FRIRegressor(n_neighbors=g[1], epsilon=g[2], target=g[0])
                r, e = cv_score(table, stats, a, est, seed=seed)
                cv[g].append(r)
                cv_mae[g].append(e)
                m = heldout_metrics(table.error, predict(table, stats, a, est), ~a)
                ho[g].append(m["rho_bit"])
                ho_log[g].append(m["mae_log"])
    score = {g: np.nanmean(cv[g]) for g in grid}
    score_mae = {g: np.nanmean(cv_mae[g]) for g in grid}
    top = max(score.values())
    best = min((g for g in grid if score[g] >= top - TIE), key=lambda g: score_mae[g])
    default = (DEFAULT.target, DEFAULT.n_neighbors, DEFAULT.epsilon)
    hp_rows = []
    for g in sorted(grid, key=lambda g: -score[g]):
        tag = " ".join(t for t, on in (("**CV best**", g == best), ("(default)", g == default)) if on)
        hp_rows.append([g[0], g[1], f"{g[2]:g}", f"{score[g]:.3f}", f"{score_mae[g]:.3f}", mean_std(ho[g]),
                        mean_std(ho_log[g]), tag])
    # per-target summary: best K/eps per target by CV
    tgt_rows = []
    for tgt in ("log", "linear"):
        top_t = max(score[g] for g in grid if g[0] == tgt)
        gb = min((g for g in grid if g[0] == tgt and score[g] >= top_t - TIE), key=lambda g: score_mae[g])
        tgt_rows.append([tgt, gb[1], f"{gb[2]:g}", f"{score[gb]:.3f}", mean_std(ho[gb]), mean_std(ho_log[gb])])
    hp_notes = [
        f"stratified anchors at {', '.join(f'{100 * f:.0f}%' for f in fractions)} x seeds {seeds[0]}..{seeds[-1]} "
        f"({len(fractions) * len(seeds)} anchor sets) per configuration.",
        "CV rho: 5-fold cross-validation over the routed anchor experts only (shared experts always in training), "
        "within-bit Spearman of the out-of-fold predictions, mean over the anchor sets with at least "
        f"{MIN_CV_EXPERTS} routed anchor experts (the 5% sets have 3, so 5-fold CV would rank 6-9 units; they are "
        "left out) -- the selection criterion; "
        f"configurations within {TIE} of the best CV rho count as tied and the lowest CV MAE log10 among them wins "
        "(the tie rule was fixed before the first run; that run averaged CV over all 25 sets, 5% included, and "
        "picked K=2 because of the 5% sets, where CV rho was 0.32 for K=2 vs 0.19 for K=8; over the 10-25% sets "
        "K = 2, 4, 8 lie within 0.013. Excluding the degenerate 5% sets was decided after seeing those results -- "
        "and the held-out ones -- and is stated here for that reason). "
        "Held-out columns use the non-anchor units and are reported for information; they were not used to choose.",
        f"selected by CV: target={best[0]!r}, K={best[1]}, epsilon={best[2]:g} (CV rho {score[best]:.3f}); "
        f"the defaults at the time of the run: target={default[0]!r}, K={default[1]}, epsilon={default[2]:g} "
        f"(CV rho {score.get(default, float('nan')):.3f}); before this benchmark the default K was 8 -- this "
        "selection is why fri/interpolation.py now defaults to K=4.",
        f"best per target (by CV): " + "; ".join(f"{r[0]}: K={r[1]}, eps={r[2]}, CV {r[3]}, held-out rho {r[4]}"
                                                  for r in tgt_rows) + ".",
        f"per-bit held-out rho (FRI defaults, mean over seeds), columns {', '.join(bit_labels)}: "
        + "; ".join(f"{r[0]} {r[1]}: {' / '.join(r[2:])}" for r in pb_rows) + ".",
        f"total benchmark time {time.perf_counter() - t_start:.0f} s on 2 shared CPU cores; {THREADS_NOTE}.",
    ]
    write_table("fri_prediction_hparams", ["target", "K", "epsilon", "CV rho within-bit (anchors only)",
                                           "CV MAE log10",
                                           "held-out rho within-bit", "held-out MAE log10", ""], hp_rows, hp_notes)


if __name__ == "__main__":
    main()
