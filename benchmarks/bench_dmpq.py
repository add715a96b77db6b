"""DMPQ (seed 004) on the demo model: the RL allocator against the exact multiple-choice knapsack, MPQ-Freq
and uniform at equal memory; the RL search under a *measured* (non-additive) objective; analytic vs
measured latency; QAT vs PTQ at one plan; a reward-weight sweep with the memory/perplexity frontier.

    .venv/bin/python benchmarks/bench_dmpq.py [--rl-steps 3000] [--sweep-steps 1500] [--measured-steps 600]
        [--qat-steps 40] [--budgets 3.0,4.5] [--eval-windows 16] [--batch-tokens 16] [--threads 1]

Setting (all methods alike): RTN g128, bits {2, 4, 8, 16}, expert granularity (gate/up/down of an
expert share bits: 6 layers x 33 experts = 198 groups), calibration 32 x 256 tokens of the demo's training
split (seed 0), the profiled table = expert-local layer-output error (the additive proxy
sum_u f_u l_u(c_u)). Memory = exact storage bits of the expert weights. Perplexity is measured on two
slices: `held-out` = 8 x 256-token windows of the training split that share no token with the calibration
windows (what the measured-objective RL optimises), and `eval` = the first --eval-windows x 256 tokens of
the demo's held-out plays (never seen by any search).

Writes benchmarks/results/dmpq.md (proxy + measured comparison), dmpq_measured.md, dmpq_latency.md,
dmpq_qat.md, dmpq_sweep.md and dmpq_frontier.png (needs matplotlib, the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from _common import FP16_ZEROS, RESULTS, write_table
from moebits import cost as costs
from moebits.allocate import allocate, expert_level
from moebits.allocate.groups import reduce_groups
from moebits.apply import apply_plan
from moebits.calibrate import calibrate
from moebits.data import calibration_windows, held_out_windows, load_text, tokenize
from moebits.energy import energy_matrix
from moebits.expert_stats import gradient_contribution, table_sensitivity
from moebits.models import load_model
from moebits.plan import Assignment, Plan
from moebits.plan_scorer import MeasuredLoss
from moebits.profile import new_table, profile
from moebits.qat import quantization_aware_training
from moebits.rl import GroupProblem
from moebits.rl.agent import random_search
from moebits.units import Choice

BITS = (2, 4, 8, 16)
SEED = 0


def train_summary(model: str) -> str:
    if model != "demo":
        return model
    import moebits.demo

    p = Path(moebits.demo.__file__).parent / "checkpoint" / "train_summary.json"
    s = json.loads(p.read_text())
    return (f"demo checkpoint: {s['steps']} steps, {s['train_tokens']:,} tokens, final train loss "
            f"{s['final_train_loss']:.3f} (train_summary.json)")


def ppl(nll: float) -> float:
    return math.exp(nll)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--budgets", default="3.0,4.5", help="average storage bits per weight (memory budgets)")
    ap.add_argument("--rl-steps", type=int, default=3000)
    ap.add_argument("--sweep-steps", type=int, default=1500)
    ap.add_argument("--sweep-budget", type=float, default=6.0)
    ap.add_argument("--measured-steps", type=int, default=600)
    ap.add_argument("--measured-horizon", type=int, default=12)
    ap.add_argument("--qat-steps", type=int, default=40)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-tokens", type=int, default=16,
                    help="tokens per forward of the latency and energy models (16: a decoding batch, where the "
                         "weight traffic matters; at 4096 the roofline is compute-bound and blind to bits)")
    ap.add_argument("--latency-anchors", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    label = train_summary(args.model)

    # ---- setup: model, calibration, table, statistics, scorers -----------------------------------
    torch.manual_seed(SEED)
    model, tok, ad = load_model(args.model, "float32")
    source = "demo" if args.model == "demo" else args.model
    windows = calibration_windows(tok, source, 32, 256, SEED)
    cal = calibrate(ad, windows, max_tokens_per_expert=512, seed=SEED, progress=False)
    units, shapes = ad.units(), ad.shapes()
    shape_list = [shapes[u] for u in units]
    choices = [Choice(b, 128, "rtn") for b in BITS]
    stats = cal.stats
    t0 = time.perf_counter()
    table = profile(ad, "expert", units, choices, stats, cal.inputs, table=new_table(ad, choices, stats), progress=False)
    t_profile = time.perf_counter() - t0
    loss, freq = table.loss, table.frequency
    storage = costs.storage_matrix(shape_list, choices, FP16_ZEROS)
    objectives = {"lat": costs.latency_matrix(shape_list, freq, choices, "h100", args.batch_tokens),
                  "mem": storage / 8, "eng": energy_matrix(shape_list, freq, choices, args.batch_tokens)}
    t0 = time.perf_counter()
    contribution = gradient_contribution(ad, windows)
    t_contrib = time.perf_counter() - t0
    features = np.column_stack([freq, contribution, table_sensitivity(table, 2)])
    groups = expert_level(units)
    inverse = np.unique(groups, return_inverse=True)[1].reshape(-1)
    G = int(inverse.max()) + 1
    loss_g, cost_g, _, _ = reduce_groups(loss, storage, groups)
    obj_g = {k: reduce_groups(m, m, groups)[0] for k, m in objectives.items()}
    feat_g = reduce_groups(features, features, groups)[0]
    calib_ids = tokenize(tok, load_text(source, "calib"))
    held = held_out_windows(calib_ids, 8, 256, 32, SEED)
    eval_ids = tokenize(tok, load_text(source, "eval"))
    n_eval = min(args.eval_windows, eval_ids.numel() // 256)
    eval_win = eval_ids[: n_eval * 256].view(n_eval, 256)
    held_scorer = MeasuredLoss(ad, choices, held, cal.inputs, group_inverse=inverse)
    eval_scorer = MeasuredLoss(ad, choices, eval_win, cal.inputs, group_inverse=inverse)
    fp_idx = np.full(G, -1)
    nll_fp_held, nll_fp_eval = held_scorer(fp_idx), eval_scorer(fp_idx)
    print(f"setup {time.perf_counter() - t_start:.1f}s (profile {t_profile:.1f}s, contribution {t_contrib:.1f}s); "
          f"fp ppl held-out {ppl(nll_fp_held):.3f}, eval {ppl(nll_fp_eval):.3f}", flush=True)

    def measure_plan(idx_g):
        return held_scorer(idx_g), eval_scorer(idx_g)

    def plan_costs(idx_u):
        r = np.arange(len(units))
        return {"bits": float(storage[r, idx_u].sum()) / costs.num_weights(shape_list),
                "mem_mb": float(objectives["mem"][r, idx_u].sum()) / 1e6,
                "lat_ms": float(objectives["lat"][r, idx_u].sum()) * 1e3,
                "eng_mj": float(objectives["eng"][r, idx_u].sum()) * 1e3}

    def group_idx(idx_u):
        out = np.zeros(G, np.int64)
        out[inverse] = idx_u
        return out

    # ---- A: equal memory, additive proxy and measured perplexity --------------------------------
    budgets = [float(b) for b in args.budgets.split(",")]
    rows, plans = [], {}
    for b in budgets:
        total = costs.avg_bits_to_total_bits(b, shape_list)
        results = {}
        for name, solver, kw in [("exact MCKP (ILP, HiGHS)", "ilp", {}), ("Lagrangian", "lagrangian", {}),
                                 ("MPQ-Freq", "freq", {}), ("uniform", "uniform", {}),
                                 (f"RL (MaskablePPO, {args.rl_steps} steps)", "rl",
                                  {"steps": args.rl_steps, "seed": SEED, "objectives": objectives,
                                   "features": features})]:
            res = allocate(loss, storage, total, solver=solver, groups=groups, frequency=freq, **kw)
            results[name] = (res.choice_index, res.total_loss, res.seconds, res.info)
        rs = random_search(GroupProblem(loss_g, cost_g, total, obj_g, feat_g), steps=args.rl_steps, seed=SEED)
        idx_u = rs.choice_index[inverse]
        results[f"random valid moves ({args.rl_steps} steps, no learning)"] = (
            idx_u, float(loss[np.arange(len(units)), idx_u].sum()), rs.seconds, {})
        opt = results["exact MCKP (ILP, HiGHS)"][1]
        for name, (idx_u, total_loss, secs, info) in results.items():
            nh, ne = measure_plan(group_idx(idx_u))
            c = plan_costs(idx_u)
            plans[(b, name)] = idx_u
            rows.append([f"{b:.2f}", name, f"{c['bits']:.3f}", f"{total_loss:.4e}",
                         f"{100 * (total_loss / opt - 1):+.2f}%", f"{ppl(nh):.3f}", f"{ppl(ne):.3f}",
                         f"{secs:.2f}"])
            print(rows[-1], flush=True)
    gaps = {(b, name): float(r[4].rstrip("%")) for r in rows for b, name in [(float(r[0]), r[1])]}
    rl_name = f"RL (MaskablePPO, {args.rl_steps} steps)"
    rnd_name = f"random valid moves ({args.rl_steps} steps, no learning)"
    verdict = ("Verdict (proxy): RL does not beat the exact knapsack at any budget (it cannot: the ILP is optimal "
               "for the proxy); its gap is " + ", ".join(f"{gaps[(b, rl_name)]:+.1f}% at {b:.2f} bits" for b in budgets)
               + "; random valid moves with the same steps: "
               + ", ".join(f"{gaps[(b, rnd_name)]:+.1f}%" for b in budgets) + ". "
               + ("PPO's learning beats exploration alone at every budget."
                  if all(gaps[(b, rl_name)] < gaps[(b, rnd_name)] for b in budgets)
                  else "PPO's learning does not consistently beat exploration alone at this step count."))
    write_table("dmpq", ["budget (bits)", "method", "avg bits", "proxy loss Σ f·ℓ", "gap to exact",
                         "ppl held-out", "ppl eval", "solve s"], rows, notes=[
        label,
        f"fp16 ppl: held-out {ppl(nll_fp_held):.3f}, eval {ppl(nll_fp_eval):.3f} ({n_eval} x 256 tokens of the "
        "demo's held-out plays). Held-out = 8 x 256 training-split tokens disjoint from the calibration windows.",
        "All plans at expert granularity (198 groups), RTN g128, bits {2,4,8,16}, memory budget = average storage "
        "bits per weight over the expert weights (metadata included: 2-bit g128 = 2.25).",
        "The exact MCKP (ILP) is optimal for the proxy by construction: 'gap to exact' is each plan's proxy loss "
        "above it. RL = best plan within budget seen by MaskablePPO (MlpPolicy 64x64, seed 0, random repaired "
        "starts, horizon 3 x 198 moves) with reward w = (1,0,0,0) under the hard memory budget.",
        f"Setup: table profiling {t_profile:.1f}s, gradient contribution c_e {t_contrib:.1f}s; torch on "
        f"{args.threads} thread(s).",
        verdict,
    ])

    # ---- B: RL under the measured objective, warm-started from the knapsack plan -----------------
    b0 = budgets[0]
    total0 = costs.avg_bits_to_total_bits(b0, shape_list)
    ilp_g = group_idx(plans[(b0, "exact MCKP (ILP, HiGHS)")])
    mrows = []
    nh_ilp, ne_ilp = measure_plan(ilp_g)
    mrows.append([f"exact MCKP (proxy-optimal)", "-", f"{ppl(nh_ilp):.3f}", f"{ppl(ne_ilp):.3f}", "-", "-"])
    for name, fn in [("RL, measured ΔAcc (MaskablePPO)", "rl"), ("random valid moves, measured ΔAcc", "random")]:
        before = held_scorer.measurements
        t0 = time.perf_counter()
        if fn == "rl":
            res = allocate(loss, storage, total0, solver="rl", groups=groups, steps=args.measured_steps, seed=SEED,
                           objectives=objectives, features=features, accuracy=held_scorer, start=ilp_g,
                           horizon=args.measured_horizon)
            idx_g = group_idx(res.choice_index)
        else:
            rs = random_search(GroupProblem(loss_g, cost_g, total0, obj_g, feat_g), steps=args.measured_steps,
                               seed=SEED, accuracy=held_scorer, start=ilp_g, horizon=args.measured_horizon)
            idx_g = rs.choice_index
        secs = time.perf_counter() - t0
        nh, ne = measure_plan(idx_g)
        changed = int((idx_g != ilp_g).sum())
        mrows.append([name, f"{changed}", f"{ppl(nh):.3f}", f"{ppl(ne):.3f}",
                      f"{held_scorer.measurements - before}", f"{secs:.1f}"])
        print(mrows[-1], flush=True)
    def rel(x, ref):
        return 100 * (float(x) / ref - 1)

    (_, _, h_rl, e_rl, *_), (_, _, h_rnd, e_rnd, *_) = mrows[1], mrows[2]
    e_all2 = rel(ppl(eval_scorer(np.zeros(G, np.int64))), ppl(nll_fp_eval))
    ref_h, ref_e = ppl(nh_ilp), ppl(ne_ilp)
    mverdict = (f"Verdict (measured): against the exact plan, the RL plan moves held-out ppl {rel(h_rl, ref_h):+.2f}% and "
                f"eval ppl {rel(e_rl, ref_e):+.2f}%; random valid moves {rel(h_rnd, ref_h):+.2f}% / "
                f"{rel(e_rnd, ref_e):+.2f}%. " + ("RL beats the knapsack on both slices" if rel(h_rl, ref_h) < 0
                                                 and rel(e_rl, ref_e) < 0 else "RL does not beat the knapsack on both "
                                                 "slices") + f"; for scale, all-2-bit RTN costs {e_all2:+.1f}% eval ppl on this model, and differences below "
                "~0.5 % on 4k eval tokens are not evidence.")
    write_table("dmpq_measured", ["plan at " + f"{b0:.2f} bits", "groups changed vs exact", "ppl held-out (optimised)",
                                  "ppl eval (unseen)", "new measurements", "search s"], mrows, notes=[
        label,
        f"Objective: NLL of the really quantized model on the held-out slice (non-additive), cached per plan. "
        f"Every episode starts at the exact-MCKP plan and makes {args.measured_horizon} raise/lower moves under the "
        f"same memory budget; one measurement per episode; {args.measured_steps} steps in all.",
        "RL can beat the knapsack only here, where its objective differs from the knapsack's additive proxy; "
        "the eval column says whether a held-out gain carries over to unseen text.",
        mverdict,
    ])

    # ---- C: analytic vs measured latency ------------------------------------------------------------
    from moebits.latency import latency_fri_matrix

    t0 = time.perf_counter()
    lat_fri, info = latency_fri_matrix(shape_list, freq, choices, args.batch_tokens, anchors=args.latency_anchors,
                                       seed=SEED, threads=args.threads)
    t_lat = time.perf_counter() - t0
    lrows, roof, meas = [], [], []
    r = np.arange(len(units))
    for (b, name), idx_u in plans.items():
        a, m = float(objectives["lat"][r, idx_u].sum()), float(lat_fri[r, idx_u].sum())
        roof.append(a)
        meas.append(m)
        lrows.append([f"{b:.2f}", name, f"{a * 1e3:.4f}", f"{m * 1e3:.2f}"])
    for bits_col, bname in enumerate(BITS):
        idx_u = np.full(len(units), bits_col)
        a, m = float(objectives["lat"][r, idx_u].sum()), float(lat_fri[r, idx_u].sum())
        lrows.append(["-", f"all {bname}-bit", f"{a * 1e3:.4f}", f"{m * 1e3:.2f}"])
        roof.append(a)
        meas.append(m)
    rho = spearmanr(roof, meas).statistic
    r16, r2 = roof[-1] / roof[-4], meas[-1] / meas[-4]
    write_table("dmpq_latency", ["budget", "plan", "roofline H100 ms (analytic)", "latency-FRI ms (measured, this CPU)"],
                lrows, notes=[
        label,
        f"Spearman rank correlation of the two over these {len(roof)} plans: {rho:.3f}.",
        f"Roofline: cost.latency_matrix (H100 datasheet, {args.batch_tokens} tokens per forward, weight-only "
        "W{b}A16, dequantization hidden). Latency-FRI: latency.latency_fri_matrix, "
        f"{args.latency_anchors} measured dequantize+matmul kernel anchors (bit-plane codes) on this machine's "
        f"CPU, interpolated by FRI; held-out kernels: median |log(pred/measured)| "
        f"{info.get('holdout_median_abs_log_ratio', float('nan')):.3f}; {t_lat:.1f}s.",
        f"All-16-bit over all-2-bit: roofline x{r16:.4f}, measured x{r2:.3f}. The demo's expert matrices are 128 x 128 "
        "(32 KB at 16 bits): the roofline is dominated by the per-kernel launch overhead and barely sees bits, and "
        "this CPU's unfused dequantize-then-matmul kernel is *slower* with codes than the plain 16-bit matmul, so "
        "a latency term in the reward rewards nothing real on this model and machine.",
    ])

    # ---- D: QAT vs PTQ at the exact plan ------------------------------------------------------------
    plan0 = Plan({u: Assignment(choices[int(j)]) for u, j in zip(units, plans[(b0, "exact MCKP (ILP, HiGHS)")])})
    qrows = []
    held_scorer.restore()
    t0 = time.perf_counter()
    apply_plan(ad, plan0, cal.inputs, progress=False)
    t_ptq = time.perf_counter() - t0
    from moebits.evaluate import perplexity

    def eval_now():
        h = perplexity(model, held.reshape(-1), 256, 8, progress=False).ppl
        e = perplexity(model, eval_win.reshape(-1), 256, 8, progress=False).ppl
        return h, e

    h, e = eval_now()
    qrows.append(["PTQ (RTN)", "0", f"{h:.3f}", f"{e:.3f}", f"{t_ptq:.2f}", "-"])
    held_scorer.restore()
    res = quantization_aware_training(ad, plan0, windows, args.qat_steps, args.qat_lr, batch_size=4, seed=SEED)
    h, e = eval_now()
    qrows.append([f"QAT (STE, RTN grid)", f"{args.qat_steps}", f"{h:.3f}", f"{e:.3f}", f"{res.seconds:.2f}",
                  f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f}"])
    held_scorer.restore()
    res = quantization_aware_training(ad, plan0, windows, args.qat_steps, args.qat_lr, batch_size=4, seed=SEED,
                                      fake_quant=False)
    h, e = eval_now()
    qrows.append([f"control: fine-tune in fp, then RTN", f"{args.qat_steps}", f"{h:.3f}", f"{e:.3f}",
                  f"{res.seconds:.2f}", f"{res.losses[0]:.4f} -> {res.losses[-1]:.4f} (fp forward)"])
    held_scorer.restore()
    print(qrows, flush=True)
    qv = [float(r[3]) for r in qrows]
    qverdict = (f"Verdict: eval ppl PTQ {qv[0]:.3f}, QAT {qv[1]:.3f} ({rel(qv[1], qv[0]):+.2f}%), fp fine-tune control "
                f"{qv[2]:.3f} ({rel(qv[2], qv[0]):+.2f}%). " + ("QAT helps beyond the control."
                                                                if qv[1] < min(qv[0], qv[2]) else
                                                                "QAT does not beat PTQ and the control here."))
    write_table("dmpq_qat", [f"exact plan at {b0:.2f} bits", "steps", "ppl held-out", "ppl eval", "seconds",
                             "train loss first -> last"], qrows, notes=[
        label,
        f"QAT: latent weights start from the unquantized experts, Adam lr {args.qat_lr}, batch 4 x 256 calibration "
        "tokens (the 32 calibration windows only), fake quantization with the plan's bits on the RTN grid, scales "
        "and zeros recomputed every step (not learnable), straight-through estimator; attention, routers, norms, "
        "embeddings and 16-bit experts frozen. Step 0 of QAT is exactly the PTQ model.",
        "The control row trains the same weights on the same batches without fake quantization and quantizes "
        "afterwards: the demo model is undertrained, so more training on its own training text lowers perplexity by "
        "itself; QAT's gain over PTQ is only what it adds beyond that control.",
        f"fp16 ppl: held-out {ppl(nll_fp_held):.3f}, eval {ppl(nll_fp_eval):.3f}.",
        qverdict,
    ])

    # ---- E: reward-weight sweep and the frontier ----------------------------------------------------
    total_s = costs.avg_bits_to_total_bits(args.sweep_budget, shape_list)
    sweep = [(1, 0, 0, 0), (1, 0, 0.1, 0), (1, 0, 0.5, 0), (1, 0, 2, 0), (1, 0.5, 0, 0), (1, 0, 0, 0.5), (1, 1, 1, 1)]
    srows, points = [], []
    for w in sweep:
        res = allocate(loss, storage, total_s, solver="rl", groups=groups, steps=args.sweep_steps, seed=SEED,
                       objectives=objectives, features=features, weights=w)
        idx_u = res.choice_index
        c = plan_costs(idx_u)
        nh, ne = measure_plan(group_idx(idx_u))
        points.append((c["mem_mb"], ppl(ne), w))
        srows.append([",".join(f"{x:g}" for x in w), f"{c['bits']:.3f}", f"{c['mem_mb']:.3f}", f"{c['lat_ms']:.4f}",
                      f"{c['eng_mj']:.4f}", f"{res.total_loss:.4e}", f"{ppl(ne):.3f}", f"{res.seconds:.1f}"])
        print(srows[-1], flush=True)
    frontier = []
    for b in (2.5, 3.0, 3.5, 4.25, 5.0, 6.0):
        res = allocate(loss, storage, costs.avg_bits_to_total_bits(b, shape_list), solver="ilp", groups=groups)
        c = plan_costs(res.choice_index)
        frontier.append((c["mem_mb"], ppl(measure_plan(group_idx(res.choice_index))[1]), b, res.total_loss))
    fnote = "; ".join(f"{b:.2f} bits: {m:.3f} MB, ppl {p:.3f}" for m, p, b, _ in frontier)
    write_table("dmpq_sweep", ["w_acc,w_lat,w_mem,w_eng", "avg bits", "memory MB", "latency ms (roofline H100)",
                               "energy mJ (Horowitz 45nm)", "proxy loss", "ppl eval", "search s"], srows, notes=[
        label,
        f"Budget {args.sweep_budget} bits per weight (a ceiling); {args.sweep_steps} PPO steps per setting, seed 0. "
        "L, M, E enter the reward relative to the all-16-bit plan, ΔAcc on the log scale of the proxy loss.",
        f"Exact-MCKP frontier (memory budget sweep, eval ppl): {fnote}.",
        f"{sum(p < ppl(nll_fp_eval) for _, p, _ in points)} of {len(points)} sweep plans score below fp16 "
        f"({ppl(nll_fp_eval):.3f}) on the eval slice; the sweep's eval ppl spans "
        f"{min(p for _, p, _ in points):.3f}-{max(p for _, p, _ in points):.3f} while its memory spans "
        f"{min(m for m, _, _ in points):.3f}-{max(m for m, _, _ in points):.3f} MB: the reward weights barely move "
        "the plan off the budget ceiling at this step count.",
        f"Wall time of the whole benchmark: {time.perf_counter() - t_start:.0f}s.",
    ])
    if not args.no_plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed (pip install 'moebits[bench]'): no plot")
            return
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        fm = sorted(frontier)
        ax.plot([m for m, *_ in fm], [p for _, p, *_ in fm], "o-", label="exact MCKP over memory budgets")
        ax.scatter([m for m, _, _ in points], [p for _, p, _ in points], marker="x", color="C3", zorder=3,
                   label=f"RL reward sweep (budget {args.sweep_budget} bits)")
        for m, p, w in points:
            ax.annotate(",".join(f"{x:g}" for x in w), (m, p), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(ppl(nll_fp_eval), color="gray", ls=":", label="fp16")
        ax.set_xlabel("expert weight memory (MB)")
        ax.set_ylabel(f"eval perplexity ({n_eval} x 256 tokens)")
        ax.set_title("DMPQ on the demo MoE: memory / perplexity")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "dmpq_frontier.png", dpi=120)
        print(f"wrote {RESULTS / 'dmpq_frontier.png'}")


if __name__ == "__main__":
    main()
