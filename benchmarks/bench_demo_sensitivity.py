"""Where the demo model feels quantization: held-out perplexity when the routed experts of ONE MoE layer
(gate, up and down of all its routed experts) are 2-bit RTN g128 and everything else stays fp, layer by
layer, and with every layer's routed experts at once.

    .venv/bin/python benchmarks/bench_demo_sensitivity.py [--model demo] [--eval-windows 40]

RTN needs no calibration data, so there is no seed noise: every row is one deterministic plan evaluated on
the same held-out windows. Writes benchmarks/results/demo_sensitivity.md (or `--name`).

`demo_sensitivity_first.md` is the first, undertrained demo checkpoint (commit d7e2a2a), extracted with
    mkdir first-demo; for f in config.json generation_config.json model.safetensors tokenizer.json \
        tokenizer_config.json; do git show d7e2a2a:src/moebits/demo/checkpoint/$f > first-demo/$f; done
and measured with `--model first-demo --name demo_sensitivity_first`.
"""
from __future__ import annotations

import argparse

import torch

from _common import write_table
from moebits.data import load_text, tokenize
from moebits.evaluate import perplexity
from moebits.models import load_model
from moebits.quant import quantize_weight
from moebits.units import Choice


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--name", default="demo_sensitivity")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, ad = load_model(args.model, dtype="float32")
    ids = tokenize(tok, load_text("demo", "eval"))
    routed = [u for u in ad.units() if not u.is_shared]
    original = {u: ad.weight(u).clone() for u in routed}
    choice = Choice(2, 128, "rtn")

    def ppl_with(units) -> float:
        for u in units:
            ad.set_weight(u, quantize_weight(original[u], choice))
        ppl = perplexity(model, ids, args.seqlen, max_windows=args.eval_windows, progress=False).ppl
        for u in units:
            ad.set_weight(u, original[u])
        return ppl

    fp = ppl_with([])
    rows = [["none (fp)", f"{fp:.3f}", "-"]]
    for layer in ad.moe_layers:
        q = ppl_with([u for u in routed if u.layer == layer])
        rows.append([f"layer {layer}", f"{q:.3f}", f"{100 * (q / fp - 1):+.2f}"])
        print(rows[-1], flush=True)
    q = ppl_with(routed)
    rows.append(["all layers", f"{q:.3f}", f"{100 * (q / fp - 1):+.2f}"])
    notes = [f"model `{args.model}`; held-out plays, first {args.eval_windows} windows of {args.seqlen} tokens; "
             "routed experts only (shared experts, attention, embeddings stay fp); 2-bit RTN g128; fp32 compute."]
    write_table(args.name, ["routed experts at 2-bit RTN", "ppl", "Δppl %"], rows, notes)


if __name__ == "__main__":
    main()
