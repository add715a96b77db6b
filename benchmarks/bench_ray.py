"""Pass 1 on Ray: `moebits quantize --stream` single-process vs `--workers 1` vs `--workers 2`, side by side in
one invocation, on a random-weight DeepSeek-V2-shaped checkpoint; speedup of pass 1 and of the whole run, and
the check that the table (every entry) and the plan are identical across the three.

    .venv/bin/python benchmarks/bench_ray.py [--layers 5] [--hidden 1024] [--experts 32] [--width 704]
                                             [--nsamples 16] [--seqlen 128] [--quantizer gptq] [--tmp /tmp]

The checkpoint is transformers' `deepseek_v2` (MLA attention, 2 shared experts, top-6, layer 0 dense as in
DeepSeek-V2-Lite) at the given widths, with the model's own random initialisation, saved as sharded
safetensors with a byte tokenizer. Each run is a subprocess (`bench_scale.run_child`: 1 torch thread in the
driver; each Ray task 1 thread and 1 CPU), `--method fri --bits 3.25`. Ray's own memory monitor (which kills
tasks when the *host* is above 95 % memory, whoever uses it) is off in the children: on a machine shared with
other jobs it kills these workers; the kernel's OOM killer still applies.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from _common import write_table
from bench_scale import run_child


def synthesize(directory: Path, layers: int, hidden: int, experts: int, width: int, seed: int = 0) -> int:
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from moebits.models.loading import byte_tokenizer

    torch.manual_seed(seed)
    cfg = DeepseekV2Config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden,
                           moe_intermediate_size=width, n_routed_experts=experts, n_shared_experts=2,
                           num_experts_per_tok=6, num_attention_heads=8, num_key_value_heads=8,
                           kv_lora_rank=hidden // 4, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32,
                           v_head_dim=64, first_k_dense_replace=1, vocab_size=512, n_group=1, topk_group=1,
                           topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
                           max_position_embeddings=4096, tie_word_embeddings=False,
                           bos_token_id=257, eos_token_id=258, pad_token_id=259)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="200MB")
    byte_tokenizer().save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--width", type=int, default=704)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--anchors", type=float, default=0.2)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--log", default="bench_ray.log")
    opts = ap.parse_args()
    import numpy as np

    from moebits.data import load_text
    from moebits.plan import Plan
    from moebits.table import SensitivityTable

    tmp = Path(opts.tmp)
    text = tmp / "moebits-ray-text.txt"
    text.write_text(load_text("demo", "calib")[:200_000])
    ckpt = tmp / "moebits-ray-ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    size = synthesize(ckpt, opts.layers, opts.hidden, opts.experts, opts.width)
    load_start = os.getloadavg()
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    common = ["--model", str(ckpt), "--method", "fri", "--quantizer", opts.quantizer, "--bits", "3.25",
              "--candidate-bits", "2,3,4", "--anchors", str(opts.anchors), "--calib", str(text),
              "--nsamples", str(opts.nsamples), "--seqlen", str(opts.seqlen), "--eval", str(text),
              "--eval-windows", str(opts.eval_windows), "--stream"]
    runs = {}
    try:
        for label, extra in (("single process", []), ("Ray, 1 worker", ["--workers", "1", "--ray-address", "local"]),
                             ("Ray, 2 workers", ["--workers", "2"])):
            d = tmp / f"moebits-ray-run-{len(runs)}"
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.perf_counter()
            r = run_child(common + extra + ["--out", str(d)], Path(opts.log))
            r["wall"] = time.perf_counter() - t0
            r["table"] = SensitivityTable.from_csv(d / "table.csv")
            r["plan"] = Plan.load(d / "plan.json")
            runs[label] = r
            print(label, f"pass 1 {r['pass1_seconds']:.1f} s, wall {r['wall']:.1f} s", flush=True)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    ref = runs["single process"]
    one_tasks = runs["Ray, 1 worker"]["stream"].get("ray_tasks_seconds")
    rows = []
    for label, r in runs.items():
        same_table = (r["table"].units == ref["table"].units and np.array_equal(r["table"].measured, ref["table"].measured)
                      and np.array_equal(r["table"].error, ref["table"].error))
        same_plan = r["plan"].assignments == ref["plan"].assignments
        s = r.get("stream", {})
        layers_s = sum(s["pass1_layer_seconds"].values())
        tasks = s.get("ray_tasks_seconds")
        rows.append([label, f"{layers_s:.1f}", f"{s['fp_forward_seconds']:.1f}" if "fp_forward_seconds" in s else "-",
                     f"{s['ray_start_seconds']:.1f}" if tasks else "-", f"{tasks:.1f}" if tasks else "-",
                     f"{one_tasks / tasks:.2f}x" if tasks and one_tasks else "-",
                     f"{r['pass1_seconds']:.1f}", f"{ref['pass1_seconds'] / r['pass1_seconds']:.2f}x",
                     f"{r['quantize_seconds']:.1f}", f"{r['wall']:.1f}", f"{ref['wall'] / r['wall']:.2f}x",
                     "yes" if same_table else "NO", "yes" if same_plan else "NO", f"{r['ppl_q']:.4f}"])
    load_end = os.getloadavg()
    notes = [f"random-weight deepseek_v2 checkpoint: {opts.layers} decoder layers (layer 0 dense, {opts.layers - 1} "
             f"MoE), hidden {opts.hidden}, {opts.experts} routed experts of width {opts.width}, 2 shared, top-6, MLA; "
             f"{size / 2**30:.2f} GiB in bf16 (computed in float32)",
             f"`moebits quantize --method fri --quantizer {opts.quantizer} --bits 3.25 --candidate-bits 2,3,4 "
             f"--anchors {opts.anchors} --stream [--workers N]`, calibration {opts.nsamples} x {opts.seqlen} tokens, "
             f"evaluation {opts.eval_windows} x {opts.seqlen} tokens of the demo text",
             "sum of layers' pass 1 s: each layer's statistics + profiling time as its process measured it (the work "
             "that is parallel); Ray tasks s: wall from the first task submitted to the last finished (worker "
             "processes starting and opening the model included); pass 1 s: the whole stage (results.json "
             "pass1_seconds), with Ray the fp forward that caches every layer's inputs and starting the local "
             "cluster included; pass 2 (sequential GPTQ) is not parallel; wall: the whole quantize subprocess",
             f"machine: {os.cpu_count()} cores, shared with other jobs: load average {load_start[0]:.1f} at the start, "
             f"{load_end[0]:.1f} at the end (a loaded machine makes the 2-worker figure pessimistic)",
             "same table / plan: every entry of table.csv (measured mask and errors) and every unit's choice equal to "
             "the single-process run's"]
    write_table("ray", ["run", "sum of layers' pass 1 s", "fp forward s", "Ray start s", "Ray tasks s",
                        "tasks speedup vs 1 worker", "pass 1 s", "pass 1 speedup", "pass 2 s", "wall s", "wall speedup",
                        "same table", "same plan", "ppl q"], rows, notes)


if __name__ == "__main__":
    main()
