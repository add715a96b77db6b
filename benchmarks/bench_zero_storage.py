"""What storing integer zero points at the code width buys at equal storage (issue 25).

    python benchmarks/bench_zero_storage.py [--seeds 0,1,2] [--budgets 2.5,3.25] [--methods mxmoe,fri]
        [--eval-windows 200] [--models demo,olmoe64]

For each model, calibration seed, budget (`--bits`) and method, the same run is allocated twice: with
`zero_points="fp16"` (every zero in 16 bits, the papers' W3.25 accounting) and with `"packed"` (GPTQ's
integer zeros at the code width, the default), at the *same* budget. Packed pays 3 + 19/128 bits per
weight for 3-bit g128 instead of 3.25, and the allocator spends the difference on wider codes.

- demo (the embedded trained model; real perplexity): one `moebits quantize` pipeline per seed (calibration
  32 x 256 tokens of the demo text, GPTQ g128, bits {2,3,4,8}); MxMoE's full table is measured once per seed
  (it does not depend on how zeros are stored), FRI (the default: adaptive sampler, Ridge + RTN proxy,
  Lagrangian + fill) profiles per budget and setting (its sampler looks at the costs). Each plan is applied
  with GPTQ to the fp weights, evaluated on the first `--eval-windows` held-out windows of 256 tokens, and
  saved as a packed checkpoint whose stored bytes (codes / scales / zeros) are counted from the file.
  Δppl = packed - fp16 of the same seed, mean ± sd over seeds.
- olmoe64 (OLMoE-shaped, random weights: hidden 128, expert width 64, 6 layers, 64 experts, top-8; the
  shape `bench_stages.py` times): random-weight perplexity means nothing, so it reports the bits per
  weight freed and the plans' true objective sum_u f_u l_u(c_u) under the *full* measured table (MxMoE's
  own table of the same seed) for the MxMoE ILP plan and for default FRI's plan, fp16 vs packed.

Writes benchmarks/results/zero_storage.md (and every run's numbers to zero_storage.json).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moebits.data import load_text
from moebits.job import Pipeline, QuantizeConfig, candidate_choices
from moebits.models import tiny_model
from moebits.models.loading import byte_tokenizer
from moebits.packed import read_index
from moebits.plan import Plan
from moebits.units import FP_BITS

SETTINGS = ("fp16", "packed")
# HiGHS proves fp16-costed plans optimal in milliseconds (the Lagrangian bound closes the gap); under packed
# costs on the 64-expert model, proving 1e-4 took it 47-129 s per plan at --bits 2.5, so the run's default
# node limit (--ilp-nodes, see allocate/ilp.py) stops it and the table reports the gap it proved
OLMOE = dict(hidden_size=128, intermediate_size=64, num_experts=64, num_hidden_layers=6, num_experts_per_tok=8,
             vocab_size=260)


def config(model: str, method: str, seed: int, bits: float, zero_points: str, text: str | None,
           eval_windows: int) -> QuantizeConfig:
    return QuantizeConfig(model=model, method=method, quantizer="gptq", bits=bits, nsamples=32, seqlen=256,
                          calib=text or "demo", eval=text or "demo", eval_windows=eval_windows, dtype="float32",
                          seed=seed, zero_points=zero_points, save_model=True, save_format="packed")


def follow(p: Pipeline, base: Pipeline) -> None:
    """`p` takes `base`'s loaded model and calibration (every run of a seed quantizes the same calibration)."""
    for name in ("model", "tokenizer", "adapter", "rotation", "units", "shapes", "windows", "calib"):
        setattr(p, name, getattr(base, name))
    p.results["ppl_fp"] = base.results.get("ppl_fp")


def plan_components(plan: Plan, shapes: dict) -> dict[str, float]:
    """Bits per weight of the plan in codes (and fp16 rows), scales and zeros, counted from its choices."""
    out = {"codes": 0, "scales": 0, "zeros": 0}
    n = 0
    for u, a in plan.assignments.items():
        o, i = shapes[u]
        c = a.choice
        n += o * i
        if c.is_fp:
            out["codes"] += FP_BITS * o * i
            continue
        g = o * c.groups_per_row(i)
        out["codes"] += c.bits * o * i
        out["scales"] += 16 * g
        out["zeros"] += c.zero_bits(plan.zero_points) * g
    return {k: v / n for k, v in out.items()}


def stored_components(path: Path, n_weights: int) -> dict[str, float]:
    """Bits per weight of the packed checkpoint's unit tensors, by kind, as stored in the file."""
    from safetensors import safe_open

    index = read_index(path)
    out = {"codes": 0, "scales": 0, "zeros": 0}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in index.tensor_names():
            sl = f.get_slice(name)
            nbytes = int(np.prod(sl.get_shape())) * {"U8": 1, "F16": 2, "BF16": 2, "F32": 4}[sl.get_dtype()]
            kind = {"codes": "codes", "weight": "codes", "scale": "scales", "zero": "zeros"}.get(name.rsplit(".", 1)[-1])
            out[kind or "codes"] += 8 * nbytes
    return {k: v / n_weights for k, v in out.items()}


def true_objective(table, plan: Plan) -> float:
    idx = [table.choices.index(plan.choice(u)) for u in table.units]
    return float(table.loss[np.arange(len(table.units)), idx].sum())


def mean_sd(xs: list[float], fmt: str = "{:+.3f}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {statistics.stdev(xs):.3f}"


def run_seed(model: str, text: str | None, seed: int, budgets, methods, eval_windows: int, root: Path,
             evaluate: bool) -> list[dict]:
    """Every (method, budget, setting) run of one seed on one model, sharing its load and calibration."""
    base = Pipeline(config(model, "mxmoe", seed, budgets[0], "packed", text, eval_windows),
                    Path(tempfile.mkdtemp(dir=root)), overwrite=True, progress=False)
    base.load()
    base.calibrate()
    if evaluate:
        base.evaluate("ppl_fp")
    original = {u: base.adapter.weight(u).clone() for u in base.units}
    choices = candidate_choices(base.cfg, base.shapes)
    full = base.fill_table(choices)  # MxMoE's table: every unit x bit-width (independent of the zero format)
    n_weights = sum(o * i for o, i in base.shapes.values())
    rows = []
    for method in methods:
        for bits in budgets:
            for zp in SETTINGS:
                p = Pipeline(config(model, method, seed, bits, zp, text, eval_windows),
                             Path(tempfile.mkdtemp(dir=root)), overwrite=True, progress=False)
                follow(p, base)
                for u in p.units:  # the fp weights: FRI profiles them, GPTQ quantizes them
                    p.adapter.set_weight(u, original[u])
                t0 = time.perf_counter()
                table = full if method == "mxmoe" else p.fill_table(choices)
                plan = p.allocate(choices, table)  # mxmoe: the ILP with the run's default --ilp-nodes
                row = {"model": model, "seed": seed, "method": method, "bits": bits, "zp": zp,
                       "avg_bits": plan.avg_bits(p.shapes), "plan": plan_components(plan, p.shapes),
                       "objective": true_objective(full, plan), "hist": plan.bits_histogram(),
                       "solver_seconds": plan.meta.get("seconds"), "optimal": plan.meta.get("optimal"),
                       "gap": plan.meta.get("gap")}
                if evaluate:
                    p.quantize(plan)
                    p.evaluate("ppl_q")
                    sizes = p.save(plan)
                    row.update(ppl=p.results["ppl_q"], ppl_fp=base.results["ppl_fp"],
                               expert_bytes=sizes["expert_bytes"],
                               stored=stored_components(p.run.path("model"), n_weights))
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print({k: v for k, v in row.items() if k != "hist"}, flush=True)
    for u in base.units:
        base.adapter.set_weight(u, original[u])
    return rows


def demo_table(rows: list[dict], budgets, methods) -> list[list]:
    out = []
    for bits in budgets:
        for method in methods:
            by = {zp: sorted([r for r in rows if r["bits"] == bits and r["method"] == method and r["zp"] == zp],
                             key=lambda r: r["seed"]) for zp in SETTINGS}
            for zp in SETTINGS:
                rs = by[zp]
                st = {k: statistics.mean(r["stored"][k] for r in rs) for k in ("codes", "scales", "zeros")}
                widths = sorted({int(k[1:].split("g")[0]) for r in rs for k in r["hist"] if k.startswith("w")})
                hist = " / ".join(f"{b}:{statistics.mean(sum(v for k, v in r['hist'].items() if k.startswith(f'w{b}g')) for r in rs):.0f}"
                                  for b in widths)
                d_ppl = [100 * (p["ppl"] / f["ppl"] - 1) for p, f in zip(by["packed"], by["fp16"])]
                d_obj = [100 * (p["objective"] / f["objective"] - 1) for p, f in zip(by["packed"], by["fp16"])]
                out.append([
                    bits, method, zp, f"{statistics.mean(r['avg_bits'] for r in rs):.4f}",
                    f"{st['codes']:.4f} / {st['scales']:.4f} / {st['zeros']:.4f}",
                    f"{statistics.mean(r['expert_bytes'] for r in rs):,.0f}",
                    hist,
                    mean_sd([r["objective"] for r in rs], "{:.4g}"),
                    "" if zp == "fp16" else mean_sd(d_obj, "{:+.2f}"),
                    mean_sd([r["ppl"] for r in rs], "{:.3f}"),
                    mean_sd([100 * (r["ppl"] / r["ppl_fp"] - 1) for r in rs], "{:+.2f}"),
                    "" if zp == "fp16" else mean_sd(d_ppl, "{:+.2f}"),
                ])
    return out


def olmoe_table(rows: list[dict], budgets, methods) -> list[list]:
    out = []
    for bits in budgets:
        for method in methods:
            by = {zp: sorted([r for r in rows if r["bits"] == bits and r["method"] == method and r["zp"] == zp],
                             key=lambda r: r["seed"]) for zp in SETTINGS}
            for zp in SETTINGS:
                rs = by[zp]
                pc = {k: statistics.mean(r["plan"][k] for r in rs) for k in ("codes", "scales", "zeros")}
                freed = [f["plan"]["zeros"] - p["plan"]["zeros"] for p, f in zip(by["packed"], by["fp16"])]
                d_obj = [100 * (p["objective"] / f["objective"] - 1) for p, f in zip(by["packed"], by["fp16"])]
                out.append([
                    bits, method, zp, f"{statistics.mean(r['avg_bits'] for r in rs):.4f}",
                    f"{pc['codes']:.4f} / {pc['scales']:.4f} / {pc['zeros']:.4f}",
                    "" if zp == "fp16" else f"{statistics.mean(freed):.4f}",
                    mean_sd([r["objective"] for r in rs], "{:.4g}"),
                    "" if zp == "fp16" else mean_sd(d_obj, "{:+.2f}"),
                ])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="2.5,3.25")
    ap.add_argument("--methods", default="mxmoe,fri")
    ap.add_argument("--models", default="demo,olmoe64")
    ap.add_argument("--eval-windows", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the shared 2-core machine: one intra-op thread measures work, not stalls
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    models = args.models.split(",")
    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="moebits_zero_storage_"))
    notes = []
    demo_rows, olmoe_rows = [], []
    if "demo" in models:
        for seed in seeds:
            demo_rows += run_seed("demo", None, seed, budgets, methods, args.eval_windows, root, evaluate=True)
    if "olmoe64" in models:
        d = root / "olmoe64"
        tiny_model("olmoe", seed=0, **OLMOE).save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        text = root / "text.txt"
        text.write_text(load_text("demo", "eval")[:200_000])
        for seed in seeds:
            olmoe_rows += run_seed(str(d), str(text), seed, budgets, methods, args.eval_windows, root, evaluate=False)
    headers_demo = ["--bits", "method", "zero points", "avg bits (plan)", "stored bits/weight: codes / scales / zeros",
                    "expert bytes", "units per width (mean)", "true objective", "Δ objective packed vs fp16 %", "ppl", "Δppl vs fp %", "Δppl packed - fp16 %"]
    headers_olmoe = ["--bits", "method", "zero points", "avg bits (plan)", "bits/weight: codes / scales / zeros",
                     "zero bits/weight freed", "true objective", "Δ objective packed vs fp16 %"]
    notes += [
        f"seeds {seeds} (calibration windows, samplers, solvers); GPTQ g128, bits {{2,3,4,8}}, calibration 32 x 256 "
        "tokens; fp16 = every zero in 16 bits (the papers' W3.25), packed = GPTQ's integer zeros at the code width "
        "(`--zero-points`, default packed); the same budget for both",
        f"demo: perplexity on the first {args.eval_windows} held-out windows of 256 tokens of the demo text; stored "
        "bits counted from each packed checkpoint's unit tensors (codes include fp16 rows of 16-bit units); "
        "units per width = bits:count, mean over seeds; true objective = sum_u f_u l_u(c_u) under the seed's full MxMoE table (lower is better); Δppl packed - fp16 = relative difference "
        "of the same seed's two perplexities, mean ± sd over seeds",
        "OLMoE-shaped: random weights (perplexity meaningless); true objective = sum_u f_u l_u(c_u) under MxMoE's "
        "full measured table of the same seed (both methods' plans scored on it), Δ objective < 0: packed's plan is "
        "better; zero bits/weight freed = the fp16 plan's zero bits per weight minus the packed plan's (gate/up rows "
        "are 128 wide, one group; down rows 64 wide, one partial group: metadata per weight doubles there)",
        ilp_note(demo_rows + olmoe_rows),
        f"machine: 2 shared cores, load average (1 min) {load:.1f} at start; torch on 1 thread; total "
        f"{time.perf_counter() - t_start:.0f} s",
    ]
    sections = []
    if demo_rows:
        sections.append(("demo (trained; real perplexity)", headers_demo, demo_table(demo_rows, budgets, methods)))
    if olmoe_rows:
        sections.append(("OLMoE-shaped, 64 experts (random weights)", headers_olmoe,
                         olmoe_table(olmoe_rows, budgets, methods)))
    write_sections("zero_storage", sections, notes)
    import json

    from _common import RESULTS

    (RESULTS / "zero_storage.json").write_text(json.dumps(demo_rows + olmoe_rows, indent=1, default=str) + "\n")


def ilp_note(rows: list[dict]) -> str:
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for zp in SETTINGS:
            rs = [r for r in rows if r["model"] == model and r["zp"] == zp and r["method"] == "mxmoe"]
            if not rs:
                continue
            stopped = [r for r in rs if not r["optimal"]]
            gaps = [100 * r["gap"] for r in rs if r["gap"] is not None]
            name = "demo" if model == "demo" else "OLMoE-shaped"
            parts.append(f"{name} {zp}: ILP seconds max {max(r['solver_seconds'] for r in rs):.2f}, "
                         f"{len(stopped)} of {len(rs)} stopped at the node limit, largest proven gap "
                         f"{max(gaps) if gaps else float('nan'):.3f} %")
    return (f"mxmoe = full table + exact ILP (HiGHS, mip_rel_gap 1e-4, --ilp-nodes {QuantizeConfig().ilp_nodes}, "
            "the default: deterministic); "
            + "; ".join(parts))


def write_sections(name: str, sections, notes: list[str]) -> None:
    """One markdown file with a table per section (the format of _common.write_table)."""
    import sys

    from _common import RESULTS

    text = f"# {name}\n"
    for title, headers, rows in sections:
        text += f"\n## {title}\n\n| " + " | ".join(headers) + " |\n|" + "|".join("---" for _ in headers) + "|\n"
        text += "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    cmd = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
    text += "\n" + "".join(f"- {n}\n" for n in notes) + f"\nCommand: `{cmd}`\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
