"""Full profiling of the demo model, both metrics, one run: MxMoE's `layer` metric (re-run the
decoder layer on every calibration token) vs the exact `expert`-local metric.

    .venv/bin/python benchmarks/bench_profiling.py [--nsamples 32] [--quantizer gptq]

Both metrics see the same calibration tokens (the expert metric's sample cap is set above every
expert's routed count), so their tables must agree; the script reports the largest relative
difference next to the times. It also writes the full table as the ground truth that the FRI
benchmarks compare against: benchmarks/results/demo_table_<quantizer>.csv (expert metric).
Writes benchmarks/results/profiling.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, write_table
from moebits.calibrate import calibrate
from moebits.data import calibration_windows
from moebits.models import load_model
from moebits.profile import new_table, profile
from moebits.units import Choice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--skip-layer", action="store_true", help="only the expert metric (ground truth table)")
    ap.add_argument("--layer-metric-layers", type=int, default=None,
                    help="time the layer metric on the units of this many MoE layers (evenly spread) and "
                         "extrapolate to all units (default: all layers, no extrapolation)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    model, tok, ad = load_model(args.model)
    win = calibration_windows(tok, "demo" if args.model == "demo" else args.model, args.nsamples, args.seqlen, args.seed)
    cal = calibrate(ad, win, max_tokens_per_expert=win.numel(), seed=args.seed)  # no cap: both metrics see all tokens
    stats = cal.stats
    choices = [Choice(int(b), 128, args.quantizer) for b in args.bits.split(",")]
    units = ad.units()

    te = profile(ad, "expert", units, choices, stats, cal.inputs, table=new_table(ad, choices, stats))
    out = RESULTS / f"demo_table_{args.quantizer}.csv"
    te.to_csv(out)
    rows = [["expert (exact, expert-local)", f"{len(units) * len(choices):,}", f"{te.measured_seconds:.1f}", "1.0x"]]
    notes = [f"model `{args.model}`: {len(units)} units x {len(choices)} choices ({args.quantizer}, bits {args.bits}, "
             f"g128); calibration {args.nsamples} x {args.seqlen} = {win.numel():,} tokens, every routed token used "
             f"by both metrics; torch threads {torch.get_num_threads()}.",
             f"ground-truth table (expert metric): `{out.relative_to(RESULTS.parent.parent)}`."]
    if not args.skip_layer:
        layers = ad.moe_layers
        if args.layer_metric_layers is not None and args.layer_metric_layers < len(layers):
            layers = [layers[i] for i in np.linspace(0, len(layers) - 1, args.layer_metric_layers).round().astype(int)]
        subset = [u for u in units if u.layer in layers]
        tl = profile(ad, "layer", subset, choices, stats, cal.inputs, windows=win, table=new_table(ad, choices, stats))
        idx = [te.unit_index(u) for u in subset]
        t_layer = tl.measured_seconds * len(units) / len(subset)  # per-measurement cost is uniform across units
        t_expert_subset = te.seconds[idx].sum()
        speedup = tl.measured_seconds / t_expert_subset  # same measurements, side by side
        extrap = "" if len(subset) == len(units) else f" (measured {tl.measured_seconds:.1f} s on layers {layers}, extrapolated)"
        rows.insert(0, ["layer (MxMoE layer_out_norm)", f"{len(units) * len(choices):,}", f"{t_layer:.1f}{extrap}",
                        f"{1 / speedup:.3f}x"])
        rows[1][3] = f"{speedup:.1f}x"
        # never-routed experts: the layer metric is exactly 0 (no token reaches them), the expert metric is
        # measured on fallback tokens by design -- they are not comparable, so they are left out here
        routed = [i for i, u in zip(idx, subset) if stats[u].tokens > 0]
        rel = np.abs(te.error[routed] - tl.error[routed]) / np.maximum(tl.error[routed], 1e-30)
        notes.append(f"speedup of the expert metric over the layer metric on the same {len(subset) * len(choices):,} "
                     f"measurements: {speedup:.1f}x; on routed experts the two agree to a max relative "
                     f"difference of {rel.max():.2e} (median {np.median(rel):.2e}).")
    notes.append("seconds = sum of per-measurement times (quantize + error), excluding the shared calibration pass.")
    write_table("profiling", ["metric", "measurements", "seconds", "speed"], rows, notes)


if __name__ == "__main__":
    main()
