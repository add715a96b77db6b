"""GPTQ and profiling, faithfully (issue 13): how far the `expert` metric measured on a 512-token sample
per expert is from MxMoE's `layer` metric, and how close it is on all routed tokens (the default now).

    python benchmarks/bench_faithful.py [--experts 64] [--nsamples 32] [--seqlen 256] [--layers 1]

A tiny random Qwen2-MoE (hidden 64, `--experts` routed experts, `--top-k` 6, one shared expert; random
weights std 0.08 as `tiny_model` builds them) is calibrated once on `nsamples x seqlen` random tokens;
its GPTQ Hessians cover every routed token in both cases (they are accumulated during calibration).
The units of the last `--layers` MoE layers are profiled at GPTQ 2/3 bits (g32) by:
  * the layer metric (quantize one block, re-run the decoder layer on every calibration token),
  * the expert metric on a sample of at most `--cap` routed tokens per expert,
  * the expert metric on all routed tokens;
and, as before issue 13, both metrics with GPTQ Hessians built from the sample.
Reported: relative difference |expert - layer| / layer (median, fraction above 10 %) and the
measurement seconds of each metric on the same entries. With `--holdout-results DIR` the script also
appends the `--holdout` perplexity comparison written by `bench_faithful_holdout.py` (see README).
Writes benchmarks/results/faithful.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from _common import write_table
from moebits.calibrate import Calibration, ExpertInputs, calibrate
from moebits.data import random_windows
from moebits.models import MoEAdapter, tiny_model
from moebits.profile import new_table, profile
from moebits.units import Choice


def rel_diff(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(a - ref) / np.maximum(ref, 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=6, help="experts per token (DeepSeek-V2-Lite: 64 experts, top-6)")
    ap.add_argument("--layers", type=int, default=1, help="profile the units of the last N MoE layers")
    ap.add_argument("--cap", type=int, default=512, help="the old per-expert token sample")
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--holdout-results", default=None, help="JSON from bench_faithful_holdout.py to append")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ad = MoEAdapter(tiny_model("qwen2_moe", seed=args.seed, num_experts=args.experts, num_hidden_layers=2,
                               num_experts_per_tok=args.top_k))
    tokens = torch.randint(0, 256, (args.nsamples * args.seqlen * 4,), generator=torch.Generator().manual_seed(args.seed))
    win = random_windows(tokens, args.nsamples, args.seqlen, args.seed)
    cal_all = calibrate(ad, win, max_tokens_per_expert=None, seed=args.seed, progress=False)
    cal_cap = calibrate(ad, win, max_tokens_per_expert=args.cap, seed=args.seed, progress=False)
    stats = cal_all.stats
    choices = [Choice(int(b), 32, "gptq") for b in args.bits.split(",")]
    layers = ad.moe_layers[-args.layers:]
    units = [u for u in ad.units() if u.layer in layers]

    def run(metric, cal):
        t = new_table(ad, choices, stats)
        return profile(ad, metric, units, choices, stats, cal.inputs, windows=win, table=t, progress=False)

    # before issue 13: GPTQ Hessians built from the same <= cap-token sample (no accumulated Hessians)
    old = Calibration(cal_cap.stats, {k: ExpertInputs(v.x, v.g, v.fallback) for k, v in cal_cap.inputs.items()},
                      cal_cap.total_tokens, cal_cap.never_routed)
    t_layer = run("layer", cal_all)
    t_cap = run("expert", cal_cap)
    t_all = run("expert", cal_all)
    t_layer_old = run("layer", old)
    t_old = run("expert", old)
    idx = [t_layer.unit_index(u) for u in units if stats[u].tokens > 0]  # never-routed: layer metric is 0
    tokens_routed = np.array([stats[u].tokens for u in units if stats[u].tokens > 0])
    rows = []
    for hess, name, t, ref in (
            ("all routed tokens", "layer (MxMoE, all tokens)", t_layer, t_layer),
            ("all routed tokens", f"expert, sample of <= {args.cap} tokens", t_cap, t_layer),
            ("all routed tokens", "expert, all routed tokens (default)", t_all, t_layer),
            (f"sample of <= {args.cap} (before)", "layer (MxMoE, all tokens)", t_layer_old, t_layer_old),
            (f"sample of <= {args.cap} (before)", f"expert, sample of <= {args.cap} tokens (before)", t_old,
             t_layer_old)):
        r = rel_diff(t.error[idx], ref.error[idx])
        secs = t.seconds[idx].sum()
        rows.append([hess, name, f"{np.median(r):.2e}", f"{(r > 0.10).mean() * 100:.1f} %", f"{r.max():.2e}",
                     f"{secs:.2f}", f"{ref.seconds[idx].sum() / secs:.1f}x"])
    capped = (tokens_routed > args.cap).mean() * 100
    notes = [f"tiny random qwen2_moe: hidden 64, {args.experts} routed experts (top-{args.top_k}) + 1 shared, "
             f"{len(ad.moe_layers)} MoE layers; calibration {args.nsamples} x {args.seqlen} = {win.numel():,} random "
             f"tokens; profiled: the {len(units)} units of MoE layer(s) {layers} x GPTQ {args.bits} bits g32 = "
             f"{len(idx) * len(choices)} entries of routed experts (never-routed ones left out: the layer metric is "
             f"0 there by definition); torch threads {args.threads}.",
             f"{capped:.0f} % of these units' experts are routed more than {args.cap} times, so the sample is a "
             "strict subset of their tokens. Rows 1-3: Hessians accumulated over all routed tokens (now); rows 4-5: "
             "Hessians built from the sample, as before issue 13 (both metrics then quantize with the sample's "
             "Hessians, and the layer metric of row 4 is their reference).",
             "relative difference = |expert - layer| / layer per entry; seconds = sum of the per-measurement "
             "times (quantize + error) over the same entries; speed = layer seconds / this row's seconds."]
    if args.holdout_results:
        notes += holdout_notes(Path(args.holdout_results))
    write_table("faithful", ["GPTQ Hessians from", "metric", "median rel. diff vs layer (same Hessians)", "entries > 10 %", "max rel. diff",
                             "seconds", "speed vs layer"], rows, notes)


def holdout_notes(path: Path) -> list[str]:
    """The --holdout comparison on the demo (bench_faithful_holdout.py), as lines under the table."""
    res = json.loads(path.read_text())
    lines = [f"--holdout on the demo model ({res['setup']}): final perplexity (fp16 {res['ppl_fp']:.4f})"]
    for r in res["rows"]:
        lines.append(f"  {r['method']} {r['bits']} bits, holdout {r['holdout']}: ppl "
                     + ", ".join(f"{p:.4f}" for p in r["ppl"]) + f" (seeds {r['seeds']}; mean {np.mean(r['ppl']):.4f})")
    lines.append(res["verdict"])
    return lines


if __name__ == "__main__":
    main()
