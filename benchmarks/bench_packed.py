"""Real low-bit models: disk size and resident memory of packed checkpoints of the demo model
against fp16, and CPU decode speed of the packed model against the dense one, side by side.

    .venv/bin/python benchmarks/bench_packed.py [--budgets 2.5,3.25,4.25] [--new-tokens 128] [--batches 1,8]

For each budget an MPQ-Freq plan (per-expert bits from {2,3,4,8}, g128, RTN: a real mixed plan
without profiling) is made by the pipeline and saved packed. Sizes: the safetensors file on disk,
and the parameter + buffer bytes of the model loaded in its stored dtype, against the fp16
checkpoint (the shipped demo, stored in fp16). Decode: greedy generation of --new-tokens tokens
after a 16-token prompt at each batch size, 1 thread, packed and dense loaded in the same compute
dtype (float32: CPUs have no fast fp16 matmul), alternated and repeated so load drift hits both;
the best of the repeats is reported. The packed model dequantizes the routed experts of every
layer at every step (no cache), so on a CPU it pays that in time for what it saves in memory.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import write_table
from moebits.models import load_model
from moebits.packed import load_quantized, resident_bytes
from moebits.job import Pipeline, QuantizeConfig


def decode_seconds(model, batch: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 16 + new_tokens
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="2.5,3.25,4.25")
    ap.add_argument("--decode-budgets", default="3.25", help="budgets whose decode speed is measured")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (routing frequencies for the plan)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from moebits.demo import CHECKPOINT_DIR

    fp16_disk = (Path(CHECKPOINT_DIR) / "model.safetensors").stat().st_size
    fp16_model, _, _ = load_model("demo", dtype="float16")
    fp16_resident = resident_bytes(fp16_model)
    dense, _, _ = load_model("demo", dtype="float32")
    vocab = dense.config.vocab_size
    rows, notes = [], []
    work = Path(tempfile.mkdtemp(prefix="bench_packed_"))
    for budget in [float(b) for b in args.budgets.split(",")]:
        cfg = QuantizeConfig(model="demo", method="freq", quantizer="rtn", bits=budget, nsamples=args.nsamples,
                             eval_windows=2, dtype="float32")
        res = Pipeline(cfg, work / f"w{budget}", progress=False).execute()
        model_dir = work / f"w{budget}" / "model"
        disk = (model_dir / "model.safetensors").stat().st_size
        packed = load_quantized(model_dir)  # stored dtype (fp16 for everything that is not a unit)
        resident = resident_bytes(packed)
        row = [f"W{budget:g}", f"{res['avg_bits']:.3f}", ", ".join(f"{k}: {v}" for k, v in res["bits_histogram"].items()),
               f"{disk / 2**20:.2f}", f"{fp16_disk / disk:.2f}x", f"{resident / 2**20:.2f}",
               f"{fp16_resident / resident:.2f}x", f"{abs(resident / res['model_bytes'] - 1) * 100:.2f} %"]
        speeds = []
        if f"{budget:g}" in args.decode_budgets.split(","):
            packed32 = load_quantized(model_dir, dtype=torch.float32)
            for batch in [int(b) for b in args.batches.split(",")]:
                t_packed, t_dense = [], []
                for _ in range(args.repeats):
                    t_dense.append(decode_seconds(dense, batch, args.new_tokens, vocab))
                    t_packed.append(decode_seconds(packed32, batch, args.new_tokens, vocab))
                tok = batch * args.new_tokens
                speeds.append(f"b{batch}: {tok / min(t_packed):.1f} vs {tok / min(t_dense):.1f} "
                              f"({min(t_dense) / min(t_packed):.2f}x)")
        rows.append(row + ["; ".join(speeds) or "-"])
    notes += [
        f"fp16 reference: the shipped demo checkpoint, {fp16_disk / 2**20:.2f} MiB on disk, "
        f"{fp16_resident / 2**20:.2f} MiB resident in fp16.",
        "plans: MPQ-Freq (`--method freq`), RTN g128, candidate bits 2,3,4,8; avg bits over the expert blocks "
        "(routed and shared), metadata included; attention, embeddings, router and norms stay fp16.",
        "resident = parameters + buffers of the loaded model (`moebits.packed.resident_bytes`), compared with "
        "results.json's model_bytes (the stored tensors).",
        "disk is the safetensors file, header included: its index (one JSON entry and a crc32 per unit tensor) is the difference between disk and resident; the MPQ-Freq plans give most experts 2 bits and the most frequently routed ones 8, with few 3/4-bit units.",
        f"decode: tokens/s of packed vs dense fp32 (ratio = packed speed / dense speed), greedy, "
        f"{args.new_tokens} new tokens after a 16-token prompt, {args.threads} thread(s), best of {args.repeats}; "
        "packed dequantizes the routed experts at every step on the CPU (the Triton kernel of issue 9 does "
        "that in registers on a GPU).",
    ]
    write_table("packed", ["plan", "avg bits", "units per bits", "disk MiB", "disk vs fp16", "resident MiB",
                           "resident vs fp16", "resident vs model_bytes", "decode tok/s packed vs dense"],
                rows, notes)


if __name__ == "__main__":
    main()
