"""GGUF for llama.cpp on the demo: moebits' measured allocation (`--target llamacpp`) against llama.cpp's stock
mixes and pure types at equal file size, perplexity computed by llama.cpp; decode speed; wall time.

    .venv/bin/python benchmarks/bench_gguf.py [--seeds 0,1,2] [--nsamples 64] [--eval-windows 40]
        [--mixes Q2_K,Q3_K_S,Q3_K_M,Q4_K_M] [--pure Q4_0,Q5_0,Q5_1] [--new-tokens 64] [--batches 1,8]

Per calibration seed (the calibration windows differ, so the importance matrix and moebits' errors do):
  1. the importance matrix over the seed's calibration windows (imatrix.py, llama-imatrix's statistic);
  2. each stock mix made by `llama_model_quantize` (llama-quantize's code, through libllama) from the F16 GGUF
     moebits exports, with that importance matrix; each pure type likewise (`pure`);
  3. moebits' plan at each such file's tensor bytes (`--size-gb` = its tensor data): calibration, ggml-measured
     errors of every (tensor, type) (mxmoe), exact MCKP; written by the export with the same importance matrix;
  4. perplexity of every GGUF by llama.cpp (llama_cpp.Llama, logits of every position) on the demo's held-out
     plays, the windows moebits' own evaluation uses.
Decode: greedy tokens/s at batch 1 and 8, 1 thread each: llama.cpp on moebits' GGUF (the Q3_K_M-size plan),
moebits' packed model (an MPQ-Freq plan at 4.25 bits, as bench_packed.py), transformers dense (fp32).
Wall time: moebits' whole path (calibrate, imatrix, profile, allocate, export) against imatrix +
llama_model_quantize (the stock path; llama-imatrix itself is not in llama-cpp-python, so moebits'
collection of the same statistic stands in for it on both sides).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS
from moebits.calibrate import calibrate
from moebits.data import calibration_windows, load_text, tokenize
from moebits.demo import CHECKPOINT_DIR
from moebits.evaluate import perplexity as moebits_perplexity
from moebits.gguf import ggml
from moebits.gguf.convert import GGUFModel
from moebits.gguf.imatrix import collect_imatrix
from moebits.gguf.llamacpp import llama_quantize, load as load_llama, perplexity as llama_perplexity
from moebits.gguf.target import (allocate_tensors, cost_matrix, file_budget, layer_tensor_errors, tensor_table,
                                 unit_error_table)
from moebits.gguf.tensors import layout
from moebits.gguf.writer import write_gguf
from moebits.models import load_model

SEQLEN = 256
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def tensor_bytes(path: Path) -> tuple[int, dict[str, str]]:
    """Tensor data bytes of a GGUF file and its tensors' types (the gguf package's reader)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors), {t.name: t.tensor_type.name for t in r.tensors}


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


class MoebitsPath:
    """moebits' whole path for one calibration seed, stages timed; `plan(bytes)` allocates for a file size."""

    def __init__(self, model, adapter, tok, seed: int, nsamples: int):
        self.model, self.adapter, self.tok = model, adapter, tok
        self.seconds = {}
        t0 = time.perf_counter()
        self.windows = calibration_windows(tok, "demo", nsamples, SEQLEN, seed)
        self.calib = calibrate(adapter, self.windows, progress=False)
        self.seconds["calibrate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.im = collect_imatrix(model, self.windows, 8, adapter)
        self.seconds["imatrix"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.lay = layout(adapter)
        imd = {t.name: self.im.for_tensor(t.name) for t in self.lay.allocated}
        tensors, effective, cost = cost_matrix(self.lay, TYPES)
        inputs = self.calib.profile_inputs()
        units = [u for t in tensors if t.role in ("experts", "shared") for u in t.units]
        ut = unit_error_table(adapter, tensors, effective, inputs, imd,
                              frequency=self.calib.stats.aligned(units).frequency)
        le = layer_tensor_errors(adapter, tensors, effective, self.windows, imd)
        self.table = tensor_table(tensors, TYPES, effective, cost, ut, le)
        self.seconds["profile"] = time.perf_counter() - t0

    def plan(self, nbytes: int, fixed_types=None):
        t0 = time.perf_counter()
        plan = allocate_tensors(self.lay, self.table, file_budget(None, nbytes / 1e9), fixed_types=fixed_types)
        self.seconds["allocate"] = time.perf_counter() - t0
        return plan

    def export(self, plan, path: Path, gm: GGUFModel) -> None:
        t0 = time.perf_counter()
        types = {n: ty for n, ty in plan.types.items() if gm.by_name[n].quantizable}
        write_gguf(path, self.model, self.tok, types, self.im, model_dir=CHECKPOINT_DIR)
        self.seconds["export"] = time.perf_counter() - t0


# -- decode speed -----------------------------------------------------------------------------------

def llama_decode_seconds(path: Path, batch: int, new_tokens: int, vocab: int, prompt: int = 16) -> float:
    """Greedy decode of `new_tokens` tokens for `batch` sequences after a `prompt`-token prompt each, one
    llama_decode per step for all sequences (llama.cpp's batched decoding, as llama-batched does), 1 thread."""
    import llama_cpp as L

    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = batch * (prompt + new_tokens + 8)
    cparams.n_batch = max(batch * prompt, 64)
    cparams.n_ubatch = cparams.n_batch
    cparams.n_seq_max = batch
    cparams.n_threads = cparams.n_threads_batch = 1
    ctx = L.llama_init_from_model(model, cparams)
    try:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, vocab, (batch, prompt), generator=g).tolist()
        lb = L.llama_batch_init(batch * prompt, 0, batch)
        t0 = time.perf_counter()

        def submit(tokens_by_seq, start):
            n = 0
            for s, toks in enumerate(tokens_by_seq):
                for k, tok in enumerate(toks):
                    lb.token[n], lb.pos[n], lb.n_seq_id[n] = tok, start[s] + k, 1
                    lb.seq_id[n][0] = s
                    lb.logits[n] = k == len(toks) - 1
                    n += 1
            lb.n_tokens = n
            if L.llama_decode(ctx, lb) != 0:
                raise RuntimeError("llama_decode failed")

        def argmax_each():
            out = []
            for s in range(batch):
                ptr = L.llama_get_logits_ith(ctx, s)  # the batch position of sequence s's token
                out.append(int(np.argmax(np.ctypeslib.as_array(ptr, shape=(vocab,)))))
            return out

        submit(prompts, [0] * batch)
        # llama_get_logits_ith takes the token's position in the batch: the last prompt token of each sequence
        nxt = [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, (s + 1) * prompt - 1), shape=(vocab,))))
               for s in range(batch)]
        for step in range(new_tokens - 1):
            submit([[t] for t in nxt], [prompt + step] * batch)
            nxt = argmax_each()
        seconds = time.perf_counter() - t0
        L.llama_batch_free(lb)
        return seconds
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


def hf_decode_seconds(model, batch: int, new_tokens: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 16 + new_tokens
    return time.perf_counter() - t0


def decode_table(gguf_path: Path, new_tokens: int, batches: list[int], work: Path, repeats: int = 3) -> list[list]:
    from moebits.packed import load_quantized
    from moebits.job import Pipeline, QuantizeConfig

    torch.set_num_threads(1)
    run = work / "packed_run"
    Pipeline(QuantizeConfig(method="freq", bits=4.25, nsamples=16, eval_windows=2), run, progress=False).execute()
    packed = load_quantized(run / "model", dtype=torch.float32)
    dense, _, _ = load_model("demo", "float32", "cpu", False, seed=0)
    vocab = dense.config.vocab_size
    rows = []
    for b in batches:
        times = {"llama.cpp (moebits GGUF)": [], "moebits packed (freq 4.25 b)": [], "transformers dense fp32": []}
        for _ in range(repeats):  # alternated so load drift hits all three
            times["llama.cpp (moebits GGUF)"].append(llama_decode_seconds(gguf_path, b, new_tokens, vocab))
            times["moebits packed (freq 4.25 b)"].append(hf_decode_seconds(packed, b, new_tokens, vocab))
            times["transformers dense fp32"].append(hf_decode_seconds(dense, b, new_tokens, vocab))
        for name, ts in times.items():
            rows.append([b, name, f"{b * new_tokens / statistics.median(ts):.1f}"])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--mixes", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_M")
    ap.add_argument("--pure", default="Q4_0,Q5_0,Q5_1")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    ggml.require()
    seeds = [int(s) for s in args.seeds.split(",")]
    mixes = [m for m in args.mixes.split(",") if m]
    pures = [p for p in args.pure.split(",") if p]
    torch.set_num_threads(2)
    model, tok, ad = load_model("demo", "float32", "cpu", False, seed=0)
    gm = GGUFModel(model)
    eval_ids = tokenize(tok, load_text("demo", "eval"))
    work = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    f16 = work / "f16.gguf"
    write_gguf(f16, model, tok, {t.name: "F16" for t in gm.tensors if t.quantizable}, None, model_dir=CHECKPOINT_DIR)
    ppl_f16 = llama_perplexity(f16, eval_ids, SEQLEN, args.eval_windows)["ppl"]
    ppl_moebits_fp = moebits_perplexity(model, eval_ids, SEQLEN, 8, args.eval_windows, False).ppl
    lay = layout(ad)
    quantized = [t for t in lay.tensors if t.role != "fixed"]
    wide = [t.name for t in quantized if t.cols % 256 == 0]

    results: dict[str, dict[str, list]] = {}
    wall: dict[str, list[float]] = {"moebits": [], "stock": []}
    decode_gguf = None
    for seed in seeds:
        mp = MoebitsPath(model, ad, tok, seed, args.nsamples)
        for name, ftype, pure in [(m, m, False) for m in mixes] + [(f"pure {p}", p, True) for p in pures]:
            stock_p = work / f"s{seed}_{name.replace(' ', '_')}.gguf"
            t0 = time.perf_counter()
            llama_quantize(f16, stock_p, ftype, mp.im, pure=pure, nthread=1)
            t_quant = time.perf_counter() - t0
            sbytes, stypes = tensor_bytes(stock_p)
            # moebits' embeddings and output take the stock file's types, so that both spend the same bytes on them
            # and the comparison is of the allocated tensors (moebits' own stock rule, Q5_0/Q8_0 here, would not
            # fit the Q2_K file: its token_embd is Q2_K -> Q4_0)
            fixed = {n: stypes[n] for n in ("token_embd.weight", "output.weight") if n in stypes}
            plan = mp.plan(sbytes, fixed)
            ours_p = work / f"s{seed}_{name.replace(' ', '_')}_moebits.gguf"
            mp.export(plan, ours_p, gm)
            obytes, otypes = tensor_bytes(ours_p)
            assert obytes == plan.file_bytes, (obytes, plan.file_bytes)  # the plan's count is the file's
            r = results.setdefault(name, {k: [] for k in ("stock_ppl", "ours_ppl", "stock_mb", "ours_mb", "stock_file",
                                                          "ours_file", "stock_types", "ours_types")})
            r["stock_ppl"].append(llama_perplexity(stock_p, eval_ids, SEQLEN, args.eval_windows)["ppl"])
            r["ours_ppl"].append(llama_perplexity(ours_p, eval_ids, SEQLEN, args.eval_windows)["ppl"])
            r["stock_mb"].append(sbytes / 1e6)
            r["ours_mb"].append(obytes / 1e6)
            r["stock_file"].append(stock_p.stat().st_size / 1e6)
            r["ours_file"].append(ours_p.stat().st_size / 1e6)
            r["stock_types"].append(_hist(stypes))
            r["ours_types"].append(_hist(otypes))
            if name == "Q3_K_M" and seed == seeds[0]:
                decode_gguf = ours_p
                wall["moebits"].append(sum(mp.seconds.values()))
                wall["stock"].append(mp.seconds["imatrix"] + t_quant)
                stages = dict(mp.seconds)
            (RESULTS / "gguf.partial.md").write_text("\n".join(_report(results, seeds[:seeds.index(seed) + 1], ppl_f16,
                                                                         ppl_moebits_fp, args, quantized, wide)))
            print(f"seed {seed} {name}: stock {r['stock_ppl'][-1]:.3f} ({sbytes / 1e6:.3f} MB) vs moebits "
                  f"{r['ours_ppl'][-1]:.3f} ({obytes / 1e6:.3f} MB)", file=sys.stderr, flush=True)
    lines = _report(results, seeds, ppl_f16, ppl_moebits_fp, args, quantized, wide)
    if "Q3_K_M" in results:
        lines += ["", "## Wall time (seed %d, Q3_K_M size)" % seeds[0], "",
                  "| path | seconds |", "|---|---|",
                  f"| moebits: calibrate {stages['calibrate']:.1f} + imatrix {stages['imatrix']:.1f} + profile "
                  f"{stages['profile']:.1f} + allocate {stages['allocate']:.2f} + export {stages['export']:.1f} | "
                  f"{wall['moebits'][0]:.1f} |",
                  f"| stock: imatrix {stages['imatrix']:.1f} + llama_model_quantize {wall['stock'][0] - stages['imatrix']:.2f}"
                  f" | {wall['stock'][0]:.1f} |"]
    if not args.skip_decode and decode_gguf is not None:
        rows = decode_table(decode_gguf, args.new_tokens, [int(b) for b in args.batches.split(",")], work)
        lines += ["", f"## Decode tokens/s (greedy, {args.new_tokens} new tokens after 16, 1 thread, median of 3)", "",
                  "| batch | model | tokens/s |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    import os

    load = os.getloadavg()
    lines += ["", f"Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores shared).",
              "", f"Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _hist(types: dict[str, str]) -> str:
    from collections import Counter

    c = Counter(ty for n, ty in types.items() if ty != "F32")
    return " ".join(f"{k}×{v}" for k, v in sorted(c.items()))


def _report(results, seeds, ppl_f16, ppl_fp, args, quantized, wide) -> list[str]:
    lines = ["# gguf", "",
             f"Demo model, perplexity by llama.cpp on the held-out plays ({args.eval_windows} windows of {SEQLEN} "
             f"tokens); F16 GGUF {ppl_f16:.3f} (moebits' own evaluation of the fp model {ppl_fp:.3f}). "
             f"Calibration seeds {seeds} ({args.nsamples} windows of {SEQLEN}); mean ± sd over seeds; Δ = moebits − "
             "stock, paired by seed.", "",
             "| size of | stock PPL | moebits PPL | Δ PPL (paired) | stock tensor MB | moebits tensor MB | "
             "stock types | moebits types |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d = [o - s for o, s in zip(r["ours_ppl"], r["stock_ppl"])]
        lines.append(f"| {name} | {mean_sd(r['stock_ppl'])} | {mean_sd(r['ours_ppl'])} | {mean_sd(d)} "
                     f"({sum(x < 0 for x in d)}/{len(d)} better) | {statistics.mean(r['stock_mb']):.4f} | "
                     f"{statistics.mean(r['ours_mb']):.4f} | {r['stock_types'][0]} | {r['ours_types'][0]} |")
    lines += ["", f"- Quantized tensors whose rows are a multiple of 256 (QK_K, what K-quants need): {len(wide)} of "
              f"{len(quantized)} (the demo is 128 wide everywhere). llama.cpp stores every other tensor at its "
              "fallback type (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; i-quants -> IQ4_NL), "
              "so on the demo the stock mixes and moebits both choose among Q4_0, Q5_0, Q5_1 and Q8_0.",
              "- Sizes: tensor data bytes (the budget moebits is given is the stock file's tensor data); whole "
              "files differ by the same metadata (tokenizer, hyperparameters)."]
    return lines


if __name__ == "__main__":
    main()
