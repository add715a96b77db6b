"""Every stage against its floor (issue 25): calibration, evaluation, full profiling (MxMoE) and FRI.

For each model, each repetition runs side by side in one process: the pipeline's stages (calibration,
fp evaluation, MxMoE's full profiling, default FRI's profiling) and the floors of the same work, then
the table holds medians over repetitions of the seconds, the floors and their ratios.

Floors (what the stage cannot do without; each measured here, on the same tokens and settings):
- calibration: one plain forward over the calibration windows (no hooks) + the Hessian products
  `X^T X` of every expert's routed inputs and of its down projection's inputs, one matmul per expert
  and input (the down inputs are computed outside the timer; their FLOPs are in the notes);
- evaluation: one plain forward over the evaluation windows;
- full profiling: for each candidate choice, quantizing every unit once (one batched `quantize_weight`
  call per layer, kind and routed/shared, with its Hessians) + one expert forward per routed token;
- FRI: its share of the (unit, quantized choice) pairs x the full-profiling floor + its fit (the
  predictor fits, bootstraps and allocations between rounds, `fit_seconds`).
FRI's goal is also stated against measured full profiling: profile <= 1.3 x share x full.

Models: `demo` (the embedded trained model), `olmoe64` (OLMoE-shaped, random weights: hidden 128,
expert width 64, 6 layers, 64 experts, top-8) and `ds2` (DeepSeek-V2-Lite widths, random weights:
hidden 2048, expert width 1408, 2 shared experts, 2 decoder layers of which the first is dense as in
the real model; `--ds-experts` routed experts, top `--ds-topk`; a 260-token byte vocabulary instead
of 102,400, which only the embeddings would feel). Random models read a 200,000-character slice of
the demo's evaluation text (the byte tokenizer takes ~20 s on the whole training text, which is not a
stage). GPTQ g128, candidate bits {2,3,4,8} + fp16, 3.25-bit budget, calibration 32 x 256 tokens,
evaluation `--eval-windows` x 256 tokens, torch on 1 thread.

    python benchmarks/bench_stages.py                       # demo, olmoe64, ds2; 3 repetitions
    python benchmarks/bench_stages.py --experts 8,32,64,256  # + FRI at fixed --rules vs expert count
    python benchmarks/bench_stages.py --models olmoe64,demo --also score,per-cost
        # + a row per acquisition: FRI with --acquisition A, same calibration, same repetition

The experts sweep (OLMoE shape, E experts, top-8, fixed `--rules`) reports FRI's profile seconds and
their parts (pairs measured, RTN proxy, fit) per E: one repetition each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import write_table
from moebits.calibrate import calibrate  # noqa: F401  (the pipeline's own)
from moebits.data import load_text
from moebits.models.loading import byte_tokenizer, tiny_model
from moebits.job import Pipeline, QuantizeConfig, candidate_choices
from moebits.quant import quantize_weight
from moebits.units import Unit

DS_LITE = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_shared_experts=2,
               num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1, vocab_size=260,
               n_group=1, topk_group=1, topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
               max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, num_hidden_layers=2)


def random_model(root: Path, name: str, arch: str, **overrides) -> str:
    d = root / name
    if not (d / "config.json").exists():
        m = tiny_model(arch, seed=0, **overrides)
        m.save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
    return str(d)


def text_file(root: Path) -> str:
    p = root / "text.txt"
    if not p.exists():
        p.write_text(load_text("demo", "eval")[:200_000])
    return str(p)


def forward_seconds(model, windows: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[s:s + batch_size], use_cache=False)
    return time.perf_counter() - t0


@torch.no_grad()
def hessian_products(adapter, inputs) -> tuple[float, float]:
    """(seconds, GFLOP) of `X^T X` for every expert's routed inputs and down inputs, one matmul each."""
    seconds = flops = 0.0
    for (layer, expert), inp in inputs.items():
        if inp.fallback:
            continue
        w = adapter.weight(Unit(layer, expert, "gate"))
        x = inp.x.to(w.dtype)
        h = adapter.expert_intermediate(layer, expert, x).float()
        x = x.float()
        t0 = time.perf_counter()
        _ = x.T @ x
        _ = h.T @ h
        seconds += time.perf_counter() - t0
        flops += 2 * x.shape[0] * (x.shape[1] ** 2 + h.shape[1] ** 2)
    return seconds, flops / 1e9


@torch.no_grad()
def full_profiling_floor(adapter, inputs, choices) -> tuple[float, float]:
    """(quantization seconds, forward seconds): every unit quantized once per choice (batched per layer,
    kind, routed/shared), and one forward of every expert on its routed tokens per choice."""
    units = adapter.units()
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        groups.setdefault((u.layer, u.kind, u.is_shared), []).append(u)
    t_quant = 0.0
    for c in choices:
        for (_, kind, _), members in groups.items():
            w = torch.stack([adapter.weight(u) for u in members])
            h = None
            if c.quantizer == "gptq" and not c.is_fp:
                name = "h_down" if kind == "down" else "h_in"
                h = torch.stack([getattr(inputs[(u.layer, u.expert)], name) for u in members])
            t0 = time.perf_counter()
            quantize_weight(w, c, hessian=h)
            t_quant += time.perf_counter() - t0
    t0 = time.perf_counter()
    for (layer, expert), inp in inputs.items():
        adapter.expert_forward(layer, expert, inp.x.to(adapter.weight(Unit(layer, expert, "gate")).dtype))
    return t_quant, (time.perf_counter() - t0) * len(choices)


def config(model: str, method: str, text: str | None, eval_windows: int, **kw) -> QuantizeConfig:
    return QuantizeConfig(model=model, method=method, quantizer="gptq", bits=3.25, nsamples=32, seqlen=256,
                          calib=text or "demo", eval=text or "demo", eval_windows=eval_windows, save_model=False,
                          dtype="float32", seed=0, **kw)


def follow(p: Pipeline, base: Pipeline) -> None:
    """`p` takes `base`'s loaded model and calibration (the FRI run profiles the same calibration)."""
    for name in ("model", "tokenizer", "adapter", "rotation", "units", "shapes", "windows", "calib"):
        setattr(p, name, getattr(base, name))


def one_repetition(model: str, text: str | None, eval_windows: int, root: Path, batch_size: int = 8,
                   also: tuple[str, ...] = (), rep: int = 0) -> dict:
    out = {}
    mx = Pipeline(config(model, "mxmoe", text, eval_windows), Path(tempfile.mkdtemp(dir=root)), overwrite=True,
                  progress=False)
    mx.load()
    choices = candidate_choices(mx.cfg, mx.shapes)
    mx.calibrate()
    out["calibrate"] = mx.results["calibrate_seconds"]
    out["forward_calib"] = forward_seconds(mx.model, mx.windows, batch_size)
    out["hessian"], out["hessian_gflop"] = hessian_products(mx.adapter, mx.calib.inputs)
    ids = mx.eval_tokens()  # tokenized before the stage is timed: tokenization is not evaluation
    mx.evaluate("ppl_fp")
    out["evaluate"] = mx.results["ppl_fp_eval_seconds"]
    n = min(ids.numel() // mx.cfg.eval_seqlen, eval_windows)
    out["forward_eval"] = forward_seconds(mx.model, ids[: n * mx.cfg.eval_seqlen].view(n, -1), mx.cfg.batch_size)
    full_table = mx.fill_table(choices)
    out["full"] = mx.results["profile_seconds"]
    out["floor_quant"], out["floor_forward"] = full_profiling_floor(mx.adapter, mx.calib.profile_inputs(), choices)
    n_pairs = len(mx.units) * sum(not c.is_fp for c in choices)
    runs = (("fri", {}),) + tuple((f"fri_{a}", {"acquisition": a}) for a in also)
    for key, kw in (runs[::-1] if rep % 2 else runs):  # alternate which FRI runs first (the second is warmer)
        fri = Pipeline(config(model, "fri", text, eval_windows, **kw), Path(tempfile.mkdtemp(dir=root)),
                       overwrite=True, progress=False)
        follow(fri, mx)
        measured = fri.fill_table(choices).measured
        r = fri.results
        # what the same pairs cost inside full profiling (each pair's seconds there: its share of the GPTQ
        # calls and Hessians, its forward and a share of its expert's reference forward)
        out[f"{key}_own"] = float(full_table.seconds[measured].sum() / full_table.seconds.sum()) * out["full"]
        out[key] = r["profile_seconds"]
        out[f"{key}_proxy"] = r.get("proxy_seconds", 0.0)
        out[f"{key}_fit"] = r.get("fit_seconds", 0.0)
        out[f"{key}_pairs"] = r["profile_seconds"] - out[f"{key}_proxy"]
        out[f"{key}_share"] = r["rules"] / n_pairs
        out[f"{key}_experts"] = r["anchors"]  # experts with a measured pair
    out["share"] = out["fri_share"]
    out["units"] = len(mx.units)
    return out


def fmt(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def stage_rows(name: str, reps: list[dict]) -> list[list]:
    med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
    ratio = lambda a, b: statistics.median(r[a] / r[b] for r in reps)  # noqa: E731
    floor_calib = [r["forward_calib"] + r["hessian"] for r in reps]
    floor_full = [r["floor_quant"] + r["floor_forward"] for r in reps]
    floor_fri = [r["share"] * f + r["fri_fit"] for r, f in zip(reps, floor_full)]
    rows = [
        [name, "calibration", fmt(med["calibrate"]), f"{fmt(statistics.median(floor_calib))} (forward "
         f"{fmt(med['forward_calib'])} + XᵀX {fmt(med['hessian'])}, {med['hessian_gflop']:.1f} GFLOP)",
         fmt(statistics.median(r["calibrate"] / f for r, f in zip(reps, floor_calib)))],
        [name, "evaluation", fmt(med["evaluate"]), f"{fmt(med['forward_eval'])} (forward)",
         fmt(ratio("evaluate", "forward_eval"))],
        [name, "full profiling (MxMoE)", fmt(med["full"]), f"{fmt(statistics.median(floor_full))} (quantize "
         f"{fmt(med['floor_quant'])} + forwards {fmt(med['floor_forward'])})",
         fmt(statistics.median(r["full"] / f for r, f in zip(reps, floor_full)))],
        [name, f"FRI profile (default, {100 * med['share']:.1f} % of pairs)",
         f"{fmt(med['fri'])} (pairs {fmt(med['fri_pairs'])} + proxy {fmt(med['fri_proxy'])})",
         f"{fmt(statistics.median(floor_fri))} (share x full floor + fit {fmt(med['fri_fit'])})",
         f"{fmt(statistics.median(r['fri'] / f for r, f in zip(reps, floor_fri)))}; "
         f"{fmt(ratio('fri', 'full') / med['share'])} x share x full; "
         f"{fmt(ratio('fri', 'fri_own'))} x its pairs' seconds in full profiling ({fmt(med['fri_own'])} s), "
         f"{med['fri_experts']:.0f} experts touched"],
    ]
    for key in [k for k in med if k.startswith("fri_") and f"{k}_share" in med]:  # --also: one row each
        floor_a = [r[f"{key}_share"] * f + r[f"{key}_fit"] for r, f in zip(reps, floor_full)]
        rows.append([name, f"FRI profile (--acquisition {key[4:]}, {100 * med[f'{key}_share']:.1f} % of pairs)",
                     f"{fmt(med[key])} (pairs {fmt(med[f'{key}_pairs'])} + proxy {fmt(med[f'{key}_proxy'])})",
                     f"{fmt(statistics.median(floor_a))} (share x full floor + fit {fmt(med[f'{key}_fit'])})",
                     f"{fmt(statistics.median(r[key] / f for r, f in zip(reps, floor_a)))}; "
                     f"{fmt(ratio(key, 'full') / med[f'{key}_share'])} x share x full; "
                     f"{fmt(ratio(key, f'{key}_own'))} x its pairs' seconds in full profiling "
                     f"({fmt(med[f'{key}_own'])} s), {med[f'{key}_experts']:.0f} experts touched"])
    return rows


def sweep(experts: list[int], rules: int, root: Path, text: str, eval_windows: int) -> list[list]:
    rows = []
    for E in experts:
        model = random_model(root, f"olmoe{E}", "olmoe", hidden_size=128, intermediate_size=64, num_experts=E,
                             num_hidden_layers=6, num_experts_per_tok=8, vocab_size=260)
        p = Pipeline(config(model, "fri", text, eval_windows, rules=rules), Path(tempfile.mkdtemp(dir=root)),
                     overwrite=True, progress=False)
        p.load()
        choices = candidate_choices(p.cfg, p.shapes)
        p.calibrate()
        p.fill_table(choices)
        r = p.results
        proxy = r.get("proxy_seconds", 0.0)
        rows.append([E, len(p.units), r["rules"], fmt(r["profile_seconds"]), fmt(r["profile_seconds"] - proxy),
                     fmt(proxy), fmt(r.get("fit_seconds", 0.0)), fmt(r["calibrate_seconds"])])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,olmoe64,ds2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ds-experts", type=int, default=16)
    ap.add_argument("--ds-topk", type=int, default=2)
    ap.add_argument("--experts", default="", help="comma-separated expert counts for the FRI sweep (empty: none)")
    ap.add_argument("--rules", type=int, default=240, help="the sweep's fixed rule budget")
    ap.add_argument("--note", default="", help="a line added to the notes (e.g. which code was measured)")
    ap.add_argument("--name", default="stages")
    ap.add_argument("--also", default="", help="comma-separated FRI acquisitions also timed, one row each "
                                               "(e.g. score,per-cost; the default FRI row is unchanged)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load = [os.getloadavg()[0]]
    root = Path(tempfile.mkdtemp(prefix="moebits_stages_"))
    text = text_file(root)
    specs = {  # built when first run
        "demo": lambda: ("demo", None),
        "olmoe64": lambda: (random_model(root, "olmoe64", "olmoe", hidden_size=128, intermediate_size=64,
                                         num_experts=64, num_hidden_layers=6, num_experts_per_tok=8, vocab_size=260),
                            text),
        "ds2": lambda: (random_model(root, f"ds2_{args.ds_experts}", "deepseek_v2", n_routed_experts=args.ds_experts,
                                     num_experts_per_tok=args.ds_topk, **DS_LITE), text),
    }
    names = {"demo": "demo", "olmoe64": "OLMoE-shaped, 64 experts",
             "ds2": f"DeepSeek-V2-Lite widths, 2 layers, {args.ds_experts} experts top-{args.ds_topk}"}
    rows = []
    for key in [m for m in args.models.split(",") if m]:
        model, txt = specs[key]()
        reps = []
        for i in range(args.reps):
            reps.append(one_repetition(model, txt, args.eval_windows, root, also=tuple(a for a in args.also.split(",") if a), rep=i))
            load.append(os.getloadavg()[0])
            print(key, i, {k: round(v, 3) for k, v in reps[-1].items()}, flush=True)
        rows += stage_rows(names[key], reps)
        write_table(args.name, ["model", "stage", "seconds", "floor seconds", "ratio"], rows,
                    notes_for(args, load, t_start))  # after every model: a long run keeps what it measured
    notes = notes_for(args, load, t_start)
    sections = [("model", "stage", "seconds", "floor seconds", "ratio"), rows]
    if args.experts:
        sw = sweep([int(e) for e in args.experts.split(",")], args.rules, root, text, args.eval_windows)
        write_table(args.name + "_experts", ["experts", "units", "rules", "FRI profile s", "pairs s", "proxy s",
                                             "fit s", "calibration s"], sw,
                    [f"OLMoE shape (hidden 128, width 64, 6 layers, top-8), E experts, calibration 32 x 256 tokens, "
                     f"default FRI at --rules {args.rules}, one repetition per E (not medians); FRI profile = pairs "
                     "measured + RTN proxy; the fit (predictor, bootstraps, allocations between rounds) is not in it",
                     "why it is not flat: a measured pair is a forward over its expert's routed tokens, tokens x "
                     "top-k / E of them, so the pairs' seconds fall with E (the expert-local metric's cost per pair, "
                     "as in full profiling); the proxy is RTN of every unit at every bit-width (a feature every "
                     "prediction needs), O(weights) = O(E), while its forward part (each expert's down input on its "
                     "routed tokens) is constant in E at fixed tokens x top-k",
                     *notes_for(args, load, t_start)[1:]])
    if rows:
        write_table(args.name, list(sections[0]), sections[1], notes)


def notes_for(args, load, t_start) -> list[str]:
    notes = [f"seconds are medians of {args.reps} repetitions, each running every stage and floor side by side "
             "in one process; ratio = median over repetitions of stage / floor",
             f"machine: 2 shared cores, load average (1 min) {min(load):.1f}-{max(load):.1f} during the run "
             "(other agents' jobs); torch on 1 thread",
             "floors: see the script's docstring; FRI's profile seconds include the RTN proxy (every unit x bit-width, "
             "the predictor's feature)",
             f"total benchmark time {time.perf_counter() - t_start:.0f} s"]
    if args.note:
        notes.append(args.note)
    return notes


if __name__ == "__main__":
    sys.exit(main())
