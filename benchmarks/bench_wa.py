"""Weight-activation quantization on the demo model: the W-A rows of the FRI-MxMoE paper's Table 1
(GPTQ vs GPTQ* at W3.25 / W2.25, QuaRot-style W4A4, MxMoE and FRI-MxMoE at W5A5) and Table 5 (linear-block
vs expert granularity at W5A5), by perplexity and a small zero-shot average.

    python benchmarks/bench_wa.py [--seeds 0,1] [--eval-windows 160] [--zs-tasks arc_easy,piqa,winogrande,hellaswag]
                                  [--zs-limit 200] [--act-clip 0.9] [--variants plain,rotated] [--merge FILE.json]

Every run also writes its rows' raw numbers to results/NAME.json; `--merge` adds the rows of an earlier
run's JSON that this run did not measure, and `--rows-from-log LOG` the rows a run printed to its log
before it was stopped (the table's "seeds" column says how many seeds each row has) (e.g. `--variants rotated --merge results/wa.json` adds the GPTQ*
rows to a table measured before the rotation existed; the settings must match, which is checked).

Rows (GPTQ g128 weights everywhere; activations per-token symmetric, clip `--act-clip`, quant/act.py):
* `GPTQ W3.25A16`, `GPTQ W2.25A16`: uniform 3- / 2-bit weights, activations untouched.
* `GPTQ* ...`: the same after a seeded random Hadamard rotation (`moebits.rotate`, issue 16 item 1), when
  that module is present; otherwise the rows are left out and the notes say so.
* `W4A4 (QuaRot-style)`: rotation + GPTQ 4-bit weights + 4-bit activations on every unit (without the
  rotation when it is absent: then it is plain GPTQ W4A4, and labelled so).
* `MxMoE W5A5`: every unit x {2,3,4,8} weight bits x {4,5,8} activation bits profiled (expert-local
  metric, exact), exact ILP with two rows: average storage bits <= 5 and average activation bits <= 5
  (weighted by each unit's MACs per token, budget.ActBitsBudget).
* `FRI-MxMoE W5A5`: 20 % stratified anchors profiled, FRI predicts the rest (act_bits is a feature),
  the same ILP (the Lagrangian takes one constraint; see allocate/__init__.py).
* Table 5: MxMoE / FRI-MxMoE W5A5 with one choice per expert (gate, up, down share weight and act bits).

Each seed has its own calibration windows, tables and GPTQ; perplexity is on the same held-out windows
for every row. The zero-shot average runs `moebits.zeroshot.evaluate_tasks` (what `moebits eval --tasks`
runs) on the first `--zs-limit` documents of each task, seed 0 only. Writes benchmarks/results/wa.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import FP16_ZEROS, write_table  # noqa: E402

from moebits.allocate import expert_level, plan_under_budget  # noqa: E402
from moebits.apply import apply_plan  # noqa: E402
from moebits.budget import Budget, act_bits_average  # noqa: E402
from moebits.calibrate import calibrate  # noqa: E402
from moebits.data import calibration_windows, load_text, tokenize  # noqa: E402
from moebits.evaluate import perplexity  # noqa: E402
from moebits.models import load_model  # noqa: E402
from moebits.models.act_quant import install_act_quant, remove_act_quant  # noqa: E402
from moebits.plan import Plan  # noqa: E402
from moebits.methods.fri.predictors import fit_table, predict_table  # noqa: E402
from moebits.profile import new_table, profile  # noqa: E402
from moebits.methods.fri.samplers import sample_anchors  # noqa: E402
from moebits.units import Choice  # noqa: E402

WBITS, ABITS = (2, 3, 4, 8), (4, 5, 8)


def rotation_available():
    try:
        from moebits import rotate  # noqa: F401
    except ImportError:
        return None
    return rotate


def load(seed: int, rotated: bool):
    model, tok, ad = load_model("demo", dtype="float32")
    if rotated:
        rotate = rotation_available()
        rotate.rotate_model(model, ad, "hadamard", seed=seed)
    return model, tok, ad


def mean_sd(xs, fmt="{:.3f}"):
    return fmt.format(statistics.mean(xs)) + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=160)
    ap.add_argument("--zs-tasks", default="arc_easy,piqa,winogrande,hellaswag")
    ap.add_argument("--zs-limit", type=int, default=200, help="documents per zero-shot task (0: no zero-shot)")
    ap.add_argument("--data", default=None, help="zero-shot data folder (default: $MOEBITS_DATA or ../shared/data)")
    ap.add_argument("--act-clip", type=float, default=0.9, help="activation clipping ratio (QuaRot's 0.9)")
    ap.add_argument("--anchors", type=float, default=0.2)
    ap.add_argument("--variants", default="plain,rotated",
                    help="plain (unrotated rows, W5A5 allocations) and/or rotated (GPTQ*, QuaRot-style W4A4)")
    ap.add_argument("--merge", default=None, help="results JSON(s) of earlier runs (comma list) whose other rows "
                                                  "join the table")
    ap.add_argument("--rows-from-log", default=None,
                    help="log of a run of this script (same settings) stopped early: its printed rows join the table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="wa")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = set(args.variants.split(","))
    rotate_ok = rotation_available() is not None and "rotated" in wanted
    gq = lambda b, a=16: Choice(b, 128, "gptq", act_bits=a)  # noqa: E731
    joint = [gq(b, a) for b in WBITS for a in ABITS]

    cells: dict[str, dict] = {}
    zs_rows: dict[str, dict] = {}
    t_start = time.perf_counter()

    def record(name, plan, ppl, ppl_fp, ad, freq, seconds):
        units, shapes = ad.units(), ad.shapes()
        c = cells.setdefault(name, {"ppl": [], "dppl": [], "wbits": [], "abits": [], "s": []})
        c["ppl"].append(ppl)
        c["dppl"].append(100 * (ppl / ppl_fp - 1))
        c["wbits"].append(plan.avg_bits(shapes))
        c["abits"].append(act_bits_average([plan.choice(u) for u in units], [shapes[u] for u in units], freq))
        c["s"].append(seconds)
        print(f"{name}: ppl {ppl:.3f} ({c['dppl'][-1]:+.2f} %), W {c['wbits'][-1]:.3f} A {c['abits'][-1]:.3f}, "
              f"{seconds:.1f} s", flush=True)

    def zero_shot(name, model, tok):
        if args.zs_limit <= 0:
            return
        from moebits.zeroshot import evaluate_tasks

        res = evaluate_tasks(model, tok, args.zs_tasks, args.data, limit=args.zs_limit, batch_size=16, seqlen=256,
                             progress=False, bootstrap_iters=0, metric="acc_norm")
        zs_rows[name] = res
        print(f"  zero-shot {name}: {res['average']}", flush=True)

    variants = ([False] if "plain" in wanted else []) + ([True] if rotate_ok else [])
    for variant in variants:
        for seed in seeds:
            torch.manual_seed(seed)
            model, tok, ad = load(seed, variant)
            units, shapes = ad.units(), ad.shapes()
            original = {u: ad.weight(u).clone() for u in units}
            eval_ids = tokenize(tok, load_text("demo", "eval"))
            cal = calibrate(ad, calibration_windows(tok, "demo", args.nsamples, args.seqlen, seed), seed=seed,
                            progress=False)
            freq = cal.stats.aligned(units).frequency

            def run(plan: Plan, name: str, extra_seconds: float = 0.0):
                t0 = time.perf_counter()
                remove_act_quant(model)
                for u in units:
                    ad.set_weight(u, original[u])
                apply_plan(ad, plan, cal.inputs, progress=False)
                install_act_quant(model, {u: plan.choice(u).act_bits for u in units}, args.act_clip)
                ppl = perplexity(model, eval_ids, args.seqlen, max_windows=args.eval_windows, progress=False).ppl
                record(name, plan, ppl, ppl_fp, ad, freq, extra_seconds + time.perf_counter() - t0)
                if seed == seeds[0]:
                    zero_shot(name, model, tok)
                remove_act_quant(model)

            ppl_fp = perplexity(model, eval_ids, args.seqlen, max_windows=args.eval_windows, progress=False).ppl
            tag = "GPTQ*" if variant else "GPTQ"
            if not variant:
                record("fp16 (W16A16)", Plan.uniform(units, shapes, Choice(16)), ppl_fp, ppl_fp, ad, freq, 0.0)
                if seed == seeds[0]:
                    zero_shot("fp16 (W16A16)", model, tok)
            if variant:  # the rotated fp model: its function is the original's (rotation check)
                record("fp16 rotated (check)", Plan.uniform(units, shapes, Choice(16)), ppl_fp, ppl_fp, ad, freq, 0.0)
            for b in (3, 2):
                run(Plan.uniform(units, shapes, gq(b)), f"{tag} W{b}.25A16 (uniform)")
            w4a4 = "W4A4 QuaRot-style (rotated GPTQ)" if variant else "W4A4 GPTQ, no rotation"
            run(Plan.uniform(units, shapes, gq(4, 4)), w4a4)
            if variant:
                continue  # the W5A5 allocations run on the unrotated model, as the paper's MxMoE rows
            # --- MxMoE / FRI-MxMoE at W5A5: weight and activation bits allocated jointly
            t0 = time.perf_counter()
            full = profile(ad, "expert", units, joint, cal.stats, cal.inputs, table=new_table(ad, joint, cal.stats),
                           progress=False, act_clip=args.act_clip)
            t_full = time.perf_counter() - t0
            t0 = time.perf_counter()
            anchors = sample_anchors(units, "stratified", fraction=args.anchors, seed=seed, bits_per_unit=len(joint))
            part = profile(ad, "expert", anchors, joint, cal.stats, cal.inputs, table=new_table(ad, joint, cal.stats),
                           progress=False, act_clip=args.act_clip)
            fri = predict_table(part, fit_table(part, cal.stats))
            t_fri = time.perf_counter() - t0
            budget = Budget.build("bits", 5.0, units, shapes, joint, zero_points=FP16_ZEROS).with_act_bits(5.0, joint, freq)
            for gname, groups in (("linear", None), ("expert", expert_level(units))):
                for mname, table, t_fill in (("MxMoE", full, t_full), ("FRI-MxMoE", fri, t_fri)):
                    t0 = time.perf_counter()
                    plan = plan_under_budget(table, budget, "ilp", groups=groups, meta={"method": mname})
                    run(plan, f"{mname} W5A5, {gname}", t_fill + time.perf_counter() - t0)
            del model

    import json
    from pathlib import Path

    from _common import RESULTS

    settings = {k: getattr(args, k) for k in ("seeds", "nsamples", "seqlen", "eval_windows", "zs_tasks", "zs_limit",
                                              "act_clip", "anchors")}
    zs_avg = {n: {"acc_norm": r["average"]["acc_norm"], "label": r["average"]["label"]} for n, r in zs_rows.items()}
    merged_seconds = 0.0
    logged: set[str] = set()
    for f in (args.merge.split(",") if args.merge else []):
        old = json.loads(Path(f).read_text())
        if old["settings"] != settings:
            raise SystemExit(f"--merge {f}: settings differ ({old['settings']} vs {settings})")
        merged_seconds += old["seconds"]
        for name, c in old["cells"].items():
            cells.setdefault(name, c)
        for name, z in old["zero_shot"].items():
            zs_avg.setdefault(name, z)
        rotate_ok = rotate_ok or old.get("rotated", False)
    if args.rows_from_log:
        import ast
        import re

        row = re.compile(r"^(.+?): ppl ([\d.]+) \(([+-][\d.]+) %\), W ([\d.]+) A ([\d.]+), ([\d.]+) s$")
        zs_line = re.compile(r"^  zero-shot (.+?): (\{.*\})$")
        for line in Path(args.rows_from_log).read_text().splitlines():
            line = line.split("\r")[-1]  # progress bars share lines with the rows
            if m := row.match(line):
                name = m.group(1)
                if name in cells and len(cells[name]["ppl"]) and name not in logged:
                    continue  # measured by this run (or a merged one): keep those numbers
                logged.add(name)
                c = cells.setdefault(name, {"ppl": [], "dppl": [], "wbits": [], "abits": [], "s": []})
                for k, g in zip(("ppl", "dppl", "wbits", "abits", "s"), m.groups()[1:]):
                    c[k].append(float(g))
            elif m := zs_line.match(line):
                avg = ast.literal_eval(m.group(2))
                zs_avg.setdefault(m.group(1), {"acc_norm": avg["acc_norm"], "label": avg["label"]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"settings": settings, "cells": cells, "zero_shot": zs_avg, "rotated": rotate_ok,
         "seconds": time.perf_counter() - t_start + merged_seconds}, indent=1) + "\n")
    rotate_ok = rotate_ok or any(n.startswith("GPTQ*") for n in cells)
    order = ["fp16", "fp16 rotated", "GPTQ W3", "GPTQ* W3", "GPTQ W2", "GPTQ* W2", "W4A4", "MxMoE", "FRI"]
    rank = lambda n: next((i for i, p in enumerate(order) if n.startswith(p)), len(order))  # noqa: E731
    cells = dict(sorted(cells.items(), key=lambda kv: rank(kv[0])))
    rows = []
    for name, c in cells.items():
        zs = zs_avg.get(name)
        rows.append([name, f"{statistics.mean(c['wbits']):.3f}", f"{statistics.mean(c['abits']):.2f}",
                     mean_sd(c["ppl"]), mean_sd(c["dppl"], "{:+.2f}"),
                     "-" if zs is None else f"{100 * zs['acc_norm']:.1f}",
                     f"{statistics.mean(c['s']):.0f}", len(c["ppl"])])
    zs_label = next(iter(zs_avg.values()))["label"] if zs_avg else "-"
    notes = [
        f"demo model, float32; perplexity on {args.eval_windows} held-out windows of {args.seqlen} tokens (the same "
        f"for every row); calibration {args.nsamples} x {args.seqlen} tokens per seed; seeds {args.seeds} (mean ± sd "
        f"over seeds); torch threads {torch.get_num_threads()}; total "
        + ("(rows read from a log: see each row's seconds)" if args.rows_from_log else
           f"{time.perf_counter() - t_start + merged_seconds:.0f} s")
        + (f" (rows of several runs of these settings, merged: {args.merge})." if args.merge else "."),
        "W = average storage bits per weight over the expert units (g128 metadata included: 3-bit = 3.25); A = "
        "average activation bits weighted by each unit's MACs per token (routed frequency x out x in; 16 = not "
        "quantized).",
        f"activations: per-token symmetric fake quantization of every quantized unit's input, clip ratio "
        f"{args.act_clip}; attention, router, embeddings unquantized.",
        f"W5A5: candidates {{2,3,4,8}}-bit GPTQ g128 x {{4,5,8}} activation bits (12 per unit); exact ILP (HiGHS) "
        f"with average weight bits <= 5 and average activation bits <= 5; FRI-MxMoE profiles {args.anchors:.0%} "
        f"stratified anchor experts and predicts the rest; seconds = profiling/prediction + allocation + "
        f"quantization + evaluation.",
        (f"zero-shot: {zs_label} of acc_norm (acc where a task has none) over {args.zs_tasks}, first "
         f"{args.zs_limit} documents per task, seed {seeds[0]} only, through moebits.zeroshot.evaluate_tasks "
         f"(what `moebits eval --tasks` runs); the demo model was trained on Shakespeare's plays, so these "
         f"scores sit near chance and separate the rows far less than perplexity.") if zs_avg else
        "zero-shot: not run (--zs-limit 0).",
        ("GPTQ* = GPTQ after the seeded random Hadamard rotation of moebits.rotate (h16r's module); "
         "'fp16 rotated (check)' is the rotated unquantized model's perplexity.") if rotate_ok else
        "**GPTQ* rows absent: `moebits.rotate` (the Hadamard rotation, issue 16 item 1) was not on this tree "
        "when the benchmark ran, so the W4A4 row is plain GPTQ W4A4 without rotation.**",
    ]
    if args.rows_from_log:
        notes.append(f"rows also read from the log of a run stopped before its end ({Path(args.rows_from_log).name}): "
                     "'seeds' gives the seeds each row averages.")
    write_table(args.name, ["method", "W bits", "A bits", "ppl", "Δppl %", f"zero-shot {zs_label}", "s", "seeds"],
                rows, notes)


if __name__ == "__main__":
    main()
