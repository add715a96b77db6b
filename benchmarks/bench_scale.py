"""Streaming at real widths: peak memory and seconds per layer of `moebits quantize --stream` on random-weight
checkpoints with DeepSeek-V2-Lite's shapes, up to its full depth (larger than this machine's RAM); and
streaming against in-memory on the demo model (same plan, perplexity).

    .venv/bin/python benchmarks/bench_scale.py [--layers 2,4,8,27] [--tmp /tmp] [--nsamples 8] [--seqlen 128]
                                               [--skip-demo] [--skip-scale]

Each checkpoint is synthesized with DeepSeek-V2-Lite's config (transformers' `deepseek_v2`: hidden 2048,
64 routed experts of width 1408, 2 shared, top-6, MLA attention with kv_lora_rank 512, vocab 102400; the
first layer dense as in the real config, intermediate 10944), weights ~ N(0, 1/fan_in) in bf16, written as
one safetensors shard per decoder layer (+ one for embeddings/head) with an index, in the per-expert
layout of the hub checkpoint; it is deleted after its run. Each quantize runs as a subprocess (1 thread,
CPU, float32 compute) and reports its own `ru_maxrss`. The demo comparison runs FRI at 3.25 bits with
RTN (pass 2 sees the same Hessian-free quantizer, so plan and perplexity must agree exactly) and with
GPTQ (sequential: layer l's Hessians come from the quantized layers below, so perplexity may differ).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, write_table

POOL = 8  # distinct random matrices per expert kind and layer (see synthesize)
LITE = dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
            n_shared_experts=2, num_experts_per_tok=6, num_attention_heads=16, num_key_value_heads=16,
            kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            first_k_dense_replace=1, vocab_size=102400, n_group=1, topk_group=1, topk_method="greedy",
            routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=4096, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=257, eos_token_id=258, pad_token_id=259)


def synthesize(directory: Path, layers: int, seed: int = 0) -> int:
    """A random DeepSeek-V2-Lite-shaped checkpoint with `layers` decoder layers; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV2Config

    from moebits.models.loading import byte_tokenizer

    torch.set_num_threads(1)
    directory.mkdir(parents=True)
    cfg = DeepseekV2Config(num_hidden_layers=layers, **LITE)
    cfg.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    g = torch.Generator().manual_seed(seed)
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    heads, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim

    def lin(out_f, in_f):
        return (torch.randn(out_f, in_f, generator=g) * in_f ** -0.5).to(torch.bfloat16)

    def expert_pool():
        """POOL random matrices per expert kind, drawn per layer; expert e takes pool[e % POOL] times its own
        random scale (drawing 64 x 3 fresh matrices per layer would dominate the benchmark's time)."""
        return {k: [torch.randn(*shape, generator=g) * shape[1] ** -0.5 for _ in range(POOL)]
                for k, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))}

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map, total = {}, 0

    def shard(name: str, tensors: dict):
        nonlocal total
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += (directory / name).stat().st_size

    for l in range(layers):
        p = f"model.layers.{l}."
        t = {p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
             p + "self_attn.q_proj.weight": lin(heads * qk, H),
             p + "self_attn.kv_a_proj_with_mqa.weight": lin(cfg.kv_lora_rank + cfg.qk_rope_head_dim, H),
             p + "self_attn.kv_a_layernorm.weight": ones(cfg.kv_lora_rank),
             p + "self_attn.kv_b_proj.weight": lin(heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
             p + "self_attn.o_proj.weight": lin(H, heads * cfg.v_head_dim)}
        if l < cfg.first_k_dense_replace:
            t.update({p + "mlp.gate_proj.weight": lin(cfg.intermediate_size, H),
                      p + "mlp.up_proj.weight": lin(cfg.intermediate_size, H),
                      p + "mlp.down_proj.weight": lin(H, cfg.intermediate_size)})
        else:
            t[p + "mlp.gate.weight"] = lin(E, H)
            pool = expert_pool()
            scales = 1 + 0.25 * torch.rand(E, 3, generator=g)
            for e in range(E):
                for j, (kind, name) in enumerate((("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))):
                    t[f"{p}mlp.experts.{e}.{name}.weight"] = (pool[kind][e % POOL] * scales[e, j]).to(torch.bfloat16)
            Is = I * cfg.n_shared_experts
            t.update({p + "mlp.shared_experts.gate_proj.weight": lin(Is, H),
                      p + "mlp.shared_experts.up_proj.weight": lin(Is, H),
                      p + "mlp.shared_experts.down_proj.weight": lin(H, Is)})
        shard(f"model-L{l:03d}.safetensors", t)
        del t
    shard("model-rest.safetensors", {"model.embed_tokens.weight": (torch.randn(cfg.vocab_size, H, generator=g)).to(torch.bfloat16),
                                      "model.norm.weight": ones(H), "lm_head.weight": lin(cfg.vocab_size, H)})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    return total


def run_child(args: list[str], log: Path) -> dict:
    """`moebits quantize ARGS` in a subprocess; returns its results.json plus its peak RSS and wall seconds."""
    out = Path(args[args.index("--out") + 1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ moebits quantize {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, __file__, "--child", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"quantize failed (exit {proc.returncode}); see {log}")
    r = json.loads((out / "results.json").read_text())
    r["peak_rss_bytes"] = json.loads((out / "rss.json").read_text())["ru_maxrss_kib"] * 1024
    r["wall_seconds"] = wall
    return r


def child(args: list[str]) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    from moebits.cli import app

    out = Path(args[args.index("--out") + 1])
    try:
        app(["quantize", *args], standalone_mode=False)
    finally:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
        out.mkdir(parents=True, exist_ok=True)
        (out / "rss.json").write_text(json.dumps({"ru_maxrss_kib": kib}))


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f}"


def scale(opts, log: Path) -> tuple[list, list]:
    rows, notes = [], []
    for layers in opts.layers:
        ckpt = Path(opts.tmp) / f"moebits-scale-L{layers}"
        run_dir = Path(opts.tmp) / f"moebits-scale-run-L{layers}"
        for d in (ckpt, run_dir):
            shutil.rmtree(d, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            # in a subprocess: the generator's freed buffers would otherwise stay in this process during the run
            subprocess.run([sys.executable, __file__, "--synth", str(ckpt), str(layers)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            synth = time.perf_counter() - t0
            print(f"L={layers}: synthesized {gib(size)} GiB in {synth:.0f} s; disk: {shutil.disk_usage(opts.tmp).free / 2**30:.0f} GiB free",
                  flush=True)
            r = run_child(["--model", str(ckpt), "--method", "fri", "--quantizer", opts.quantizer, "--bits", "3.25",
                           "--calib", str(opts.text), "--nsamples", str(opts.nsamples), "--seqlen", str(opts.seqlen),
                           "--eval", str(opts.text), "--eval-windows", str(opts.eval_windows),
                           "--anchors", str(opts.anchors), "--candidate-bits", opts.candidate_bits,
                           "--sampler", "stratified", "--predictor", "fri", "--no-proxy",
                           "--stream", "--out", str(run_dir)], log)
            s = r["stream"]
            p1, p2 = s["pass1_layer_seconds"], s["pass2_layer_seconds"]
            moe = [k for k in p1 if k != "0"]  # layer 0 is dense
            per_layer = sum(p1[k] + p2[k] for k in moe) / len(moe)
            model_bytes = r["model_bytes"]
            rows.append([layers, gib(size), gib(r["peak_rss_bytes"]), gib(s["peak_materialised_bytes"]),
                         f"{per_layer:.1f}", f"{sum(p1[k] for k in moe) / len(moe):.1f}",
                         f"{sum(p2[k] for k in moe) / len(moe):.1f}", f"{r['wall_seconds']:.0f}",
                         gib(model_bytes), f"{r['ppl_fp']:.1f}", f"{r['ppl_q']:.1f}"])
            print(rows[-1], flush=True)
        finally:
            for d in (ckpt, run_dir):
                shutil.rmtree(d, ignore_errors=True)
    return rows, notes


def demo(opts, log: Path) -> list:
    from moebits.plan import Plan

    rows = []
    for q in ("rtn", "gptq"):
        res = {}
        for mode in ("--no-stream", "--stream"):
            d = Path(opts.tmp) / f"moebits-scale-demo-{q}{mode}"
            shutil.rmtree(d, ignore_errors=True)
            res[mode] = run_child(["--model", "demo", "--method", "fri", "--quantizer", q, "--bits", "3.25",
                                   "--sampler", "stratified", "--predictor", "fri", "--no-proxy", "--anchors", "0.2",
                                   "--eval-windows", str(opts.demo_eval_windows), mode, "--out", str(d)], log)
            res[mode]["plan"] = Plan.load(d / "plan.json")
            shutil.rmtree(d, ignore_errors=True)
        a, b = res["--no-stream"], res["--stream"]
        same = a["plan"].assignments == b["plan"].assignments
        rows.append([q, "yes" if same else "no", f"{a['ppl_fp']:.4f}", f"{b['ppl_fp']:.4f}", f"{a['ppl_q']:.4f}",
                     f"{b['ppl_q']:.4f}", f"{100 * (b['ppl_q'] / a['ppl_q'] - 1):+.3f} %", gib(a["peak_rss_bytes"]),
                     gib(b["peak_rss_bytes"]), f"{a['wall_seconds']:.0f}", f"{b['wall_seconds']:.0f}"])
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,4,8,27")
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--quantizer", default="rtn")
    ap.add_argument("--anchors", type=float, default=0.1)
    ap.add_argument("--candidate-bits", default="2,3,4")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--demo-eval-windows", type=int, default=64)
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--log", default="bench_scale.log")
    ap.add_argument("--note", action="append", default=[], help="a note to keep with the results (repeatable)")
    opts = ap.parse_args()
    opts.layers = [int(x) for x in opts.layers.split(",")]
    from moebits.data import load_text

    opts.text = Path(opts.tmp) / "moebits-scale-text.txt"  # 200k characters of the demo corpus (byte tokenizer)
    opts.text.write_text(load_text("demo", "calib")[:200_000])
    log = Path(opts.log)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    machine = (f"machine: {os.cpu_count()} cores, {gib(ram)} GiB RAM, shared with other jobs (load average at the "
               f"start {os.getloadavg()[0]:.1f}); every run 1 thread, CPU, float32 compute")
    if not opts.skip_scale:
        rows, _ = scale(opts, log)
        notes = [machine,
                 f"random-weight DeepSeek-V2-Lite shapes (hidden 2048, 64 routed experts x 1408, 2 shared, top-6, "
                 f"MLA, vocab 102400), layer 0 dense (intermediate 10944) as in the real config; bf16 shards, one "
                 f"per layer, per-expert tensor names as on the hub; expert weights: {POOL} random matrices per kind "
                 f"and layer, each expert one of them times its own random scale in [1, 1.25) (synthesis time)",
                 f"`moebits quantize --method fri --sampler stratified --predictor fri --no-proxy --quantizer "
                 f"{opts.quantizer} --bits 3.25 --anchors {opts.anchors} "
                 f"--candidate-bits {opts.candidate_bits} --stream`, calibration {opts.nsamples} x {opts.seqlen} "
                 f"tokens, evaluation {opts.eval_windows} x {opts.seqlen} tokens of the demo text (byte tokenizer); "
                 "s / MoE layer = pass 1 + pass 2 seconds of a MoE layer (mean; loading it from disk included), "
                 "wall s includes model setup, tokenization and the final join of the packed file",
                 "peak RSS: ru_maxrss of the quantize process; peak materialised: parameter bytes on the device at "
                 "once (one layer + embeddings/head, float32)",
                 "perplexities of a random model mean nothing; they are printed to show each run is whole"]
        runs = RESULTS_DIR / "scale_runs.json"  # rows of earlier invocations (other depths) are kept
        old = json.loads(runs.read_text())["rows"] if runs.exists() else []
        rows += [r for r in old if r[0] not in {x[0] for x in rows}]
        runs.write_text(json.dumps({"rows": sorted(rows, key=lambda r: r[0]), "notes": notes}, indent=1))
    if not opts.skip_demo:
        (RESULTS_DIR / "scale_demo.json").write_text(json.dumps({"rows": demo(opts, log), "machine": machine,
                                                                 "eval_windows": opts.demo_eval_windows}, indent=1))
    if opts.note:  # a remark on runs the table cannot show (e.g. one killed from outside), kept with the results
        runs = RESULTS_DIR / "scale_runs.json"
        d = json.loads(runs.read_text()) if runs.exists() else {"rows": [], "notes": []}
        d["notes"] += opts.note
        runs.write_text(json.dumps(d, indent=1))
    render()


RESULTS_DIR = ROOT / "results"
HEADERS = ["layers", "checkpoint GiB (bf16)", "peak RSS GiB", "peak materialised params GiB", "s / MoE layer",
           "pass 1 s / layer", "pass 2 s / layer", "wall s", "packed GiB", "ppl fp", "ppl q"]


def render() -> None:
    """benchmarks/results/scale.md from the raw results of the runs made so far (scale_runs.json, scale_demo.json)."""
    runs = RESULTS_DIR / "scale_runs.json"
    d = json.loads(runs.read_text()) if runs.exists() else {"rows": [], "notes": []}
    path = write_table("scale", HEADERS, d["rows"], d["notes"])
    demo_p = RESULTS_DIR / "scale_demo.json"
    if demo_p.exists():
        dd = json.loads(demo_p.read_text())
        text = ["", "## Streaming vs in-memory on the demo model", "",
                "`moebits quantize --model demo --method fri --sampler stratified --predictor fri --no-proxy "
                "--anchors 0.2 --bits 3.25 --eval-windows "
                f"{dd.get('eval_windows')}` (128 x 256 calibration tokens, the first {dd.get('eval_windows')} "
                f"evaluation windows), in memory (`--no-stream`) and streamed (`--stream`); {dd['machine']}:", "",
                "| quantizer | same plan | ppl fp in-memory | ppl fp stream | ppl q in-memory | ppl q stream | "
                "ppl q stream vs in-memory | peak RSS GiB in-memory | peak RSS GiB stream | wall s in-memory | wall s stream |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        text += ["| " + " | ".join(str(c) for c in r) + " |" for r in dd["rows"]]
        with open(path, "a") as f:
            f.write("\n".join(text) + "\n")
        print("\n".join(text))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        child(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--synth":
        synthesize(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
