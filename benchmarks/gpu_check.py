"""The prepared GPU check of the packed mixed-precision kernel (run through `benchmarks/gpu_check.sh`).

Steps (each its own process, each writes `<out>/<step>.json`; `report` joins them into a markdown table):

  env      versions, device; refuses to go on without CUDA + triton (unless --smoke)
  correct  the kernel path inside loaded packed models vs the dequantizing torch path, on the device:
           every architecture's tiny model (fp32: logits within 2e-5 x max|logit|, the tests' bound), and
           bf16 (the kernel's error vs fp32 at most 3x the torch path's own bf16 error)
  layer    the routed experts of a DeepSeek-V2-Lite-sized layer (64 experts, hidden 2048, expert width
           1408, top-6) for a W3.25 per-expert plan (a quarter of the experts at 2 bits, half at 3, a
           quarter at 4, g128), at 1, 16 and 256 tokens: first each result against the fp32 product on the
           dequantized weights (within 3x the bf16 loop's own error), then timings: bf16 loop over experts (transformers' eager path), torch's
           grouped expert matmul (torch._grouped_mm, bf16 and fp16 where this torch/GPU has them), the
           packed kernel at its default tiles and at the best of a small tile sweep. Routing (sort by
           expert) and the weighted sum are inside every timing.
  decode   a 2-layer DeepSeek-V2-Lite-shaped model (both layers MoE; real vocabulary 102400), RTN-quantized
           by the moebits pipeline to the same W3.25 plan (shared experts at 3 bits), saved packed, loaded
           with `AutoModelForCausalLM.from_pretrained(dir, device_map=...)`; its logits checked against the
           same weights dense; then decode tokens/s (greedy generate, medians of 3, decode steps only:
           t(1 + N tokens) - t(1 token)) at batch 1 and 16: dense bf16 vs packed (kernel) vs packed (torch path)
  report   writes benchmarks/results/kernel.md (--smoke: kernel_smoke.md)

--smoke: tiny shapes on the CPU under Triton's interpreter (TRITON_INTERPRET=1): checks the script end to
end; its times are the interpreter's, not measurements of anything.
Nothing is downloaded: every model is built from a config.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch  # noqa: E402  (does not import triton)

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

from _common import RESULTS  # noqa: E402  (puts the checkout's src/ on the path)

ARCHS = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3"]
T0 = time.time()


def log(msg: str) -> None:
    print(f"[gpu_check {time.time() - T0:6.1f}s] {msg}", flush=True)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, reps: int = 3) -> float:
    """Median milliseconds of `fn`: triton's do_bench (CUDA events, L2 flushed) on a GPU; on the CPU
    (smoke) the median of `reps` wall-clock calls."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class CheckFailed(RuntimeError):
    pass


# ---- env -----------------------------------------------------------------------------------------
def step_env(args) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
            "smoke": SMOKE, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(p.total_memory / 2**30, 1), cuda_runtime=torch.version.cuda)
    else:
        info["device"] = "cpu (Triton interpreter)"
    try:
        import subprocess

        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except Exception:  # not a checkout
        info["commit"] = None
    log(json.dumps(info))
    if info["triton"] is None:
        raise CheckFailed("triton is not installed: pip install 'triton>=3.2' (or the project's [triton] extra)")
    if not SMOKE and not info["cuda"]:
        raise CheckFailed("no CUDA device visible (torch.cuda.is_available() is False); run on a GPU machine, "
                          "or pass --smoke for the CPU interpreter run")
    if not SMOKE and torch.cuda.is_available():  # the kernel compiles and runs at all
        from moebits.kernels import PackedGroupedWeight, Segment
        from moebits.kernels.triton_grouped import packed_grouped_matmul

        w = PackedGroupedWeight.from_bits(1, 16, 32, 32, {4: torch.zeros(16, 16, dtype=torch.uint8, device="cuda")},
                                          {4: torch.ones(16, 1, dtype=torch.float16, device="cuda")},
                                          {4: torch.zeros(16, 1, dtype=torch.float16, device="cuda")},
                                          [Segment(0, 4, 0, 16, 0)])
        y = packed_grouped_matmul(torch.ones(2, 32, device="cuda", dtype=torch.bfloat16), w,
                                  torch.zeros(1, dtype=torch.int32, device="cuda"),
                                  torch.full((1,), 2, dtype=torch.int32, device="cuda"))
        sync()
        if y.abs().max().item() != 0:
            raise CheckFailed(f"the kernel's trivial product (zero codes) is not zero: {y}")
        log("kernel compiled and ran on the device")
    return info


# ---- correct -------------------------------------------------------------------------------------
def mixed_packed(arch: str, out_dir: Path, lowrank: bool, layers: int = 2):
    """A tiny `arch` model quantized by a plan mixing 2/3/4/5/8 bits, fp16 rows, group sizes 16/24/128/
    per-channel, RTN and HQQ (with compensators on a few units), saved packed to `out_dir`."""
    import dataclasses

    from moebits.apply import apply_plan
    from moebits.models import MoEAdapter, tiny_model
    from moebits.models.loading import byte_tokenizer
    from moebits.packed import save_packed
    from moebits.plan import Assignment, Plan
    from moebits.units import Choice

    import importlib.util

    has_hqq = importlib.util.find_spec("hqq") is not None  # a project dependency, but the GPU box may lack it
    choices = [Choice(2, 16, "rtn"), Choice(3, 24, "rtn"), Choice(4, 128, "hqq" if has_hqq else "rtn"), Choice(16),
               Choice(8, 0, "rtn"), Choice(5, 32, "rtn")]
    model = tiny_model(arch, num_hidden_layers=layers)
    ad = MoEAdapter(model)
    plan = Plan({u: Assignment(choices[i % len(choices)]) for i, u in enumerate(ad.units())})
    codes = {}
    apply_plan(ad, plan, progress=False, codes=codes)
    if not has_hqq:  # real-valued zeros (what HQQ stores) on the g128 units instead: both paths read them
        log("correct: the hqq package is missing; fractional zeros are made by shifting RTN zeros by 0.375")
        for u, qw in codes.items():
            if plan.choice(u).group_size == 128 and qw.zero is not None:
                qw.zero = qw.zero + 0.375
                # real-valued zeros are stored in fp16, as HQQ's are: labelled hqq, the writer keeps them so
                # (the other rtn units' integer zeros are packed at the code width: both formats are read)
                plan.assignments[u] = Assignment(dataclasses.replace(plan.choice(u), quantizer="hqq"))
    if lowrank:
        g = torch.Generator().manual_seed(1)
        for u in ad.units()[:7:3]:
            qw = codes[u]
            out, k = qw.shape
            qw.u = (torch.randn(out, 4, generator=g) * 0.05).half()
            qw.v = (torch.randn(4, k, generator=g) * 0.05).half()
            ad.set_weight(u, qw.dequantize(ad.weight(u).dtype))
            plan.assignments[u] = Assignment(dataclasses.replace(plan.choice(u), rank=4))
    save_packed(model, ad, plan, codes, out_dir, byte_tokenizer())


@torch.no_grad()
def logits_both_steps(model, mode: str, prompt: torch.Tensor):
    """Prefill logits of `prompt[:, :-1]` and the cached decode step's on `prompt[:, -1:]`, on `mode`'s path."""
    from moebits.packed.kernel_path import set_kernel
    from moebits.packed.modules import PackedExperts, PackedLinear

    set_kernel(model, mode)
    out = model(input_ids=prompt[:, :-1], use_cache=True)
    step = model(input_ids=prompt[:, -1:], past_key_values=out.past_key_values).logits
    ran = {m.last_path for m in model.modules() if isinstance(m, (PackedExperts, PackedLinear))}
    if ran != {"triton" if mode == "triton" else "torch"}:
        raise CheckFailed(f"asked for the {mode} path, the packed modules ran {ran}")
    return out.logits.float(), step.float()


def step_correct(args) -> dict:
    from moebits.packed import load_quantized

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both paths
    dev = device()
    archs = ARCHS if not SMOKE else ["qwen2_moe", "deepseek_v2"]
    prompt = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0)).to(dev)
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            d = Path(tmp) / arch
            mixed_packed(arch, d, lowrank=arch in ("qwen2_moe", "deepseek_v2"))
            m32 = load_quantized(d, dtype=torch.float32, device=dev)
            want = logits_both_steps(m32, "torch", prompt)
            got = logits_both_steps(m32, "triton", prompt)
            for what, g, w in zip(("prefill", "decode"), got, want):
                scale = max(1.0, w.abs().max().item())
                err = (g - w).abs().max().item()
                ok = err <= 2e-5 * scale
                rows.append({"arch": arch, "dtype": "fp32", "shape": what, "max_abs_err": err, "scale": scale,
                             "bound": 2e-5 * scale, "ok": ok})
                log(f"correct {arch} fp32 {what}: max |kernel - torch| {err:.2e} (bound {2e-5 * scale:.2e}) "
                    f"{'ok' if ok else 'FAILED'}")
                if not ok:
                    failures.append(f"{arch} fp32 {what}")
            if arch in ("qwen2_moe", "deepseek_v2"):
                m16 = load_quantized(d, dtype=torch.bfloat16, device=dev)
                torch_bf16 = logits_both_steps(m16, "torch", prompt)
                kern_bf16 = logits_both_steps(m16, "triton", prompt)
                for what, k, t, w in zip(("prefill", "decode"), kern_bf16, torch_bf16, want):
                    ek, et = (k - w).abs().max().item(), (t - w).abs().max().item()
                    ok = ek <= 3 * et + 1e-3 * max(1.0, w.abs().max().item())
                    rows.append({"arch": arch, "dtype": "bf16", "shape": what, "max_abs_err": ek,
                                 "torch_bf16_err": et, "ok": ok})
                    log(f"correct {arch} bf16 {what}: kernel vs fp32 {ek:.2e}, torch path vs fp32 {et:.2e} "
                        f"{'ok' if ok else 'FAILED'}")
                    if not ok:
                        failures.append(f"{arch} bf16 {what}")
    result = {"rows": rows, "failures": failures}
    if failures:
        write_json(args, "correct", result)
        raise CheckFailed(f"kernel path disagrees with the torch path: {failures}")
    return result


# ---- layer ---------------------------------------------------------------------------------------
def w325_bits(num_experts: int, gen: torch.Generator) -> list[int]:
    """A quarter of the experts at 2 bits, a quarter at 4, the rest at 3 (3.0 code bits + g128 metadata)."""
    bits = [2] * (num_experts // 4) + [4] * (num_experts // 4)
    bits += [3] * (num_experts - len(bits))
    return [bits[i] for i in torch.randperm(num_experts, generator=gen).tolist()]


def packed_random(num_experts: int, out: int, k: int, expert_bits: list[int], group_size: int, dev, gen):
    """Every expert's rows at its own bit-width, rows grouped by bit-width; random codes (any byte string
    is a valid code stream) and g128 metadata of a realistic range."""
    from moebits.kernels import PackedGroupedWeight, Segment

    G = -(-k // group_size)
    codes, scales, zeros, segments = {}, {}, {}, []
    for b in sorted(set(expert_bits)):
        experts = [e for e in range(num_experts) if expert_bits[e] == b]
        rows = len(experts) * out
        codes[b] = torch.randint(0, 256, (rows, -(-k * b // 8)), dtype=torch.uint8, generator=gen).to(dev)
        scales[b] = (torch.rand(rows, G, generator=gen) * 0.02 / 2 ** b + 1e-3).half().to(dev)
        zeros[b] = torch.randint(0, 2 ** b, (rows, G), generator=gen).half().to(dev)
        segments += [Segment(e, b, i * out, out, 0) for i, e in enumerate(experts)]
    return PackedGroupedWeight.from_bits(num_experts, out, k, group_size, codes, scales, zeros, segments)


def loop_forward(x, topk_ids, topk_w, w_gate_up, w_down):
    """transformers' eager experts path: per routed expert, index its tokens, two matmuls."""
    from moebits.kernels import sort_by_expert

    r = sort_by_expert(topk_ids, topk_w, w_gate_up.shape[0])
    inter = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    starts, counts = r.start.tolist(), r.count.tolist()  # one sync, as transformers' loop has
    for e in range(w_gate_up.shape[0]):
        if counts[e] == 0:
            continue
        sl = slice(starts[e], starts[e] + counts[e])
        tok = r.token[sl]
        h = x[tok] @ w_gate_up[e].T.to(x.dtype)
        o = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w_down[e].T.to(x.dtype)
        out.index_add_(0, tok, o.float() * r.weight[sl, None].float())
    return out.to(x.dtype)


def grouped_forward(x, topk_ids, topk_w, w_gate_up_t, w_down_t):
    """torch._grouped_mm over the expert-sorted tokens; weights pre-transposed `[E, in, out]`."""
    from moebits.kernels import sort_by_expert

    r = sort_by_expert(topk_ids, topk_w, w_gate_up_t.shape[0], max_count=False)
    offs = torch.cumsum(r.count, 0).to(torch.int32)
    inter = w_down_t.shape[1]
    h = torch._grouped_mm(x[r.token], w_gate_up_t, offs=offs)
    o = torch._grouped_mm(torch.nn.functional.silu(h[:, :inter]) * h[:, inter:], w_down_t, offs=offs)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, r.token, o.float() * r.weight[:, None].float())
    return out.to(x.dtype)


def step_layer(args) -> dict:
    from moebits.kernels import dequantize_expert
    from moebits.kernels.moe import packed_experts_forward

    dev = device()
    if SMOKE:
        E, H, inter, top_k, tokens, group = 8, 64, 32, 2, [1, 5], 32
        tiles = [(64, 64), (32, 32)]
    else:
        E, H, inter, top_k, tokens, group = 64, 2048, 1408, 6, [1, 16, 256], 128
        tiles = [(64, 64), (32, 64), (128, 64), (32, 128), (64, 128)]  # (block_n, block_k); the first is the default
    gen = torch.Generator().manual_seed(0)
    bits = w325_bits(E, gen)
    gate_up = packed_random(E, 2 * inter, H, bits, group, dev, gen)
    down = packed_random(E, H, inter, bits, group, dev, gen)
    w_gate_up = torch.stack([dequantize_expert(gate_up, e, torch.bfloat16) for e in range(E)])  # [E, 2I, H]
    w_down = torch.stack([dequantize_expert(down, e, torch.bfloat16) for e in range(E)])  # [E, H, I]
    n_weights = w_gate_up.numel() + w_down.numel()
    info = {"experts": E, "hidden": H, "inter": inter, "top_k": top_k, "group_size": group,
            "bits_count": {b: bits.count(b) for b in sorted(set(bits))},
            "packed_bits_per_weight": 8 * (gate_up.nbytes() + down.nbytes()) / n_weights,
            "packed_mib": (gate_up.nbytes() + down.nbytes()) / 2**20, "bf16_mib": 2 * n_weights / 2**20}
    log(f"layer: {json.dumps(info)}")

    grouped = {}
    if dev == "cuda" and hasattr(torch, "_grouped_mm"):
        for dt in (torch.bfloat16, torch.float16):
            try:
                gu_t = w_gate_up.to(dt).transpose(1, 2).contiguous()
                d_t = w_down.to(dt).transpose(1, 2).contiguous()
                x0 = torch.randn(4, H, device=dev, dtype=dt)
                grouped_forward(x0, torch.zeros(4, 1, dtype=torch.long, device=dev), torch.ones(4, 1, device=dev),
                                gu_t, d_t)
                sync()
                grouped[dt] = (gu_t, d_t)
            except Exception as exc:  # not every torch build / GPU has every dtype
                log(f"torch._grouped_mm in {dt} unavailable here: {type(exc).__name__}: {exc}")
    rows = []
    for T in tokens:
        x = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
        topk_w, topk_ids = torch.softmax(torch.randn(T, E, generator=gen), -1).topk(top_k, -1)
        topk_w, topk_ids = topk_w.to(dev), topk_ids.to(dev)
        # correctness first: the kernel (default tiles and every swept tile) vs fp32 on the dequantized
        # weights, bounded by 3x the bf16 loop's own error against the same fp32 result
        ref = loop_forward(x.float(), topk_ids, topk_w, w_gate_up.float(), w_down.float())
        rel = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        bf16_err = rel(loop_forward(x, topk_ids, topk_w, w_gate_up, w_down))
        errs = {}
        for bn, bk in tiles:
            errs[(bn, bk)] = rel(packed_experts_forward(x, topk_ids, topk_w, gate_up, down, block_n=bn, block_k=bk))
        worst, bound = max(errs.values()), max(3 * bf16_err, 1e-3)
        log(f"layer {T} tokens: rel. error vs fp32: kernel {worst:.2e} (worst over {len(tiles)} tilings), "
            f"bf16 loop {bf16_err:.2e}")
        if not worst <= bound:
            raise CheckFailed(f"layer {T} tokens: packed kernel rel. error {worst:.3g} > {bound:.3g} (3x the bf16 "
                              f"loop's) vs the dequantized fp32 reference ({errs})")
        row = {"tokens": T, "rel_err": worst, "bf16_loop_rel_err": bf16_err}
        row["bf16_loop_us"] = 1e3 * bench_ms(lambda: loop_forward(x, topk_ids, topk_w, w_gate_up, w_down))
        for dt, (gu_t, d_t) in grouped.items():
            xd = x.to(dt)
            row[f"{str(dt).split('.')[-1]}_grouped_us"] = 1e3 * bench_ms(
                lambda: grouped_forward(xd, topk_ids, topk_w, gu_t, d_t))
        sweep = {}
        for bn, bk in tiles:
            sweep[f"{bn}x{bk}"] = 1e3 * bench_ms(
                lambda: packed_experts_forward(x, topk_ids, topk_w, gate_up, down, block_n=bn, block_k=bk))
        row["packed_us"] = sweep[f"{tiles[0][0]}x{tiles[0][1]}"]
        best = min(sweep, key=sweep.get)
        row["packed_best_us"], row["packed_best_tiles"], row["sweep_us"] = sweep[best], best, sweep
        log(f"layer {T} tokens: {json.dumps({k: (round(v, 1) if k.endswith('_us') else v) for k, v in row.items() if k != 'sweep_us'})}")
        rows.append(row)
        write_json(args, "layer", {"info": info, "rows": rows, "partial": True})
    return {"info": info, "rows": rows}


# ---- decode --------------------------------------------------------------------------------------
def lite_config(smoke: bool):
    from transformers import AutoConfig

    if smoke:
        from moebits.models.loading import TINY_CONFIGS

        kw = dict(TINY_CONFIGS["deepseek_v2"], num_hidden_layers=2, first_k_dense_replace=0)
    else:  # DeepSeek-V2-Lite's shapes (its config.json), two decoder layers, both MoE
        kw = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                  num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                  n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=0, kv_lora_rank=512,
                  q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1,
                  topk_group=1, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    cfg = AutoConfig.for_model("deepseek_v2", **kw)
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = 1, 0, 2
    return cfg


@torch.no_grad()
def decode_tps(model, batch: int, new_tokens: int, prompt_len: int, reps: int) -> dict:
    """Greedy decode tokens/s of `batch` sequences: (t(1 + N new) - t(1 new)) over the N decode steps
    (prefill excluded), medians of `reps`."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, min(vocab, 30000), (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(model.device)
    kw = dict(do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)

    def run(n):
        sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        if out.shape[1] != prompt_len + n:
            raise CheckFailed(f"generate returned {out.shape[1] - prompt_len} new tokens, asked {n}")
        return time.perf_counter() - t

    run(2)  # warm-up: compiles, allocator, cache classes
    full = statistics.median(run(1 + new_tokens) for _ in range(reps))
    first = statistics.median(run(1) for _ in range(reps))
    step_s = max(full - first, 1e-9) / new_tokens
    return {"tokens_per_s": batch / step_s, "ms_per_step": 1e3 * step_s, "t_full_s": full, "t_first_s": first}


def step_decode(args) -> dict:
    from transformers import AutoModelForCausalLM

    from moebits.apply import apply_plan
    from moebits.models import MoEAdapter
    from moebits.models.loading import byte_tokenizer
    from moebits.packed import load_quantized, save_packed
    from moebits.packed.kernel_path import set_kernel
    from moebits.plan import Assignment, Plan
    from moebits.units import Choice

    dev = device()
    dtype = torch.bfloat16
    cfg = lite_config(SMOKE)
    torch.manual_seed(0)
    log("decode: building the model on the device")
    with torch.device(dev):
        dense = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    ad = MoEAdapter(dense)
    gen = torch.Generator().manual_seed(0)
    expert_bits = {layer: w325_bits(ad.num_experts, gen) for layer in ad.moe_layers}
    group = 32 if SMOKE else 128
    plan = Plan({u: Assignment(Choice(3 if u.is_shared else expert_bits[u.layer][u.expert], group, "rtn"))
                 for u in ad.units()})
    log(f"decode: quantizing {len(ad.units())} units (RTN, W3.25 plan)")
    codes = {}
    apply_plan(ad, plan, progress=False, codes=codes)  # `dense` now holds the dequantized weights, in bf16
    info = {"config": {k: getattr(cfg, k) for k in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                                                      "n_shared_experts", "num_experts_per_tok", "num_hidden_layers",
                                                      "vocab_size")},
            "experts_implementation": getattr(dense.config, "_experts_implementation", None),
            "avg_bits": plan.avg_bits(ad.shapes())}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "packed"
        t = time.time()
        sizes = save_packed(dense, ad, plan, codes, d, byte_tokenizer())
        del codes
        log(f"decode: saved packed ({sizes['model_bytes'] / 2**30:.2f} GiB) in {time.time() - t:.1f}s; loading")
        try:
            packed = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype, device_map=dev).eval()
            info["loaded_with"] = f"AutoModelForCausalLM.from_pretrained(dir, device_map={dev!r})"
        except Exception as exc:
            log(f"decode: from_pretrained(device_map={dev!r}) failed ({type(exc).__name__}: {exc}); "
                "loading with moebits.load_quantized instead")
            packed = load_quantized(d, dtype=dtype, device=dev)
            info["loaded_with"] = f"moebits.load_quantized (from_pretrained with device_map failed: {exc})"
    info["packed_model_gib"] = sizes["model_bytes"] / 2**30
    info["dense_model_gib"] = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**30
    # correctness first: packed (kernel) vs the same weights dense, on a prompt
    probe = torch.randint(3, 30000 if not SMOKE else 250, (2, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        want = dense(input_ids=probe).logits.float()
        set_kernel(packed, "triton")
        got = packed(input_ids=probe).logits.float()
        set_kernel(packed, "torch")
        got_torch = packed(input_ids=probe).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    rel_torch = ((got_torch - want).norm() / want.norm()).item()
    info.update(rel_err_kernel_vs_dense=rel, rel_err_torchpath_vs_dense=rel_torch)
    log(f"decode: logits rel. error vs dense: kernel {rel:.2e}, torch path {rel_torch:.2e}")
    if not rel <= max(2e-2, 3 * rel_torch):
        raise CheckFailed(f"packed model (kernel) logits differ from the dense model's: rel. error {rel:.3g}")
    new_tokens, reps = (3, 1) if SMOKE else (32, 3)
    info["reps"] = reps
    rows = []
    for batch in ([1, 2] if SMOKE else [1, 16]):
        row = {"batch": batch, "new_tokens": new_tokens}
        log(f"decode: batch {batch}: dense bf16")
        row["dense"] = decode_tps(dense, batch, new_tokens, 16, reps)
        set_kernel(packed, "triton")
        log(f"decode: batch {batch}: packed, kernel")
        row["packed_kernel"] = decode_tps(packed, batch, new_tokens, 16, reps)
        set_kernel(packed, "torch")
        log(f"decode: batch {batch}: packed, torch path")
        row["packed_torch"] = decode_tps(packed, batch, new_tokens, 16, reps)
        log(f"decode: batch {batch}: tokens/s dense {row['dense']['tokens_per_s']:.1f}, packed kernel "
            f"{row['packed_kernel']['tokens_per_s']:.1f}, packed torch path {row['packed_torch']['tokens_per_s']:.1f}")
        rows.append(row)
        write_json(args, "decode", {"info": info, "rows": rows, "partial": True})
    return {"info": info, "rows": rows}


# ---- report --------------------------------------------------------------------------------------
def load_json(out: Path, step: str) -> dict | None:
    p = out / f"{step}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def step_report(args) -> dict:
    out = Path(args.out)
    env, correct, layer, decode = (load_json(out, s) for s in ("env", "correct", "layer", "decode"))
    status = {s: (load_json(out, s) or {}).get("error") for s in ("env", "correct", "layer", "decode")}
    lines = ["# kernel" + (" (SMOKE RUN: CPU, Triton interpreter; no timing here measures anything)" if SMOKE else ""),
             ""]
    if SMOKE:
        lines += ["This file is the output of `benchmarks/gpu_check.sh --smoke`: tiny shapes on the CPU under "
                  "Triton's interpreter. It shows the script runs end to end; the kernel's GPU figures are in "
                  "`kernel.md`, written only by a run on a GPU.", ""]
    if env:
        lines += [f"- device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, "
                  f"transformers {env.get('transformers')}; commit {env.get('commit')}"]
    for s, err in status.items():
        if err:
            lines += [f"- **step {s} FAILED**: {err}"]
        elif load_json(out, s) is None:
            lines += [f"- **step {s} produced nothing** (timed out or did not run; see the log)"]
        elif load_json(out, s).get("partial"):
            lines += [f"- **step {s} did not finish** (timed out?): only the rows below were measured"]
    lines += [""]
    if correct and correct.get("rows"):
        lines += ["## Kernel path vs torch path inside loaded packed models", "",
                  "Tiny models of every architecture, a plan mixing 2/3/4/5/8 bits, fp16 rows, group sizes "
                  "16/24/128/per-channel, RTN and HQQ zeros (compensators on qwen2_moe and deepseek_v2); prefill "
                  "of 2 x 12 tokens and one cached decode step. fp32: max |kernel - torch| <= 2e-5 x max|logit|; "
                  "bf16: the kernel's error against the fp32 logits at most 3x the torch path's own bf16 error.", "",
                  "| arch | dtype | shape | max abs err | bound / torch bf16 err | ok |", "|---|---|---|---|---|---|"]
        for r in correct["rows"]:
            ref = f"{r['bound']:.1e}" if "bound" in r else f"{r['torch_bf16_err']:.1e} (torch path)"
            lines += [f"| {r['arch']} | {r['dtype']} | {r['shape']} | {r['max_abs_err']:.1e} | {ref} | "
                      f"{'yes' if r['ok'] else 'NO'} |"]
        lines += [""]
    if layer and layer.get("rows"):
        i = layer["info"]
        grouped_cols = sorted({k for r in layer["rows"] for k in r if k.endswith("_grouped_us")})
        lines += ["## Routed experts of one DeepSeek-V2-Lite-sized layer", "",
                  f"{i['experts']} experts, hidden {i['hidden']}, expert width {i['inter']}, top-{i['top_k']}; "
                  f"per-expert plan (experts per bit-width {i['bits_count']}, g{i['group_size']}: W3.25 at g128): packed "
                  f"{i['packed_mib']:.1f} MiB ({i['packed_bits_per_weight']:.2f} bits/weight) vs bf16 "
                  f"{i['bf16_mib']:.1f} MiB. Times in microseconds (triton.testing.do_bench medians), routing "
                  "and weighted sum included; speedup = best torch grouped (else loop) / packed at default tiles.",
                  ""]
        headers = (["tokens", "bf16 loop"] + [c[:-3].replace("_", " ") for c in grouped_cols] +
                   ["packed (64x64)", "packed best (tiles)", "speedup", "rel. err vs fp32 (bf16 loop's)"])
        lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for r in layer["rows"]:
            base = min([r[c] for c in grouped_cols] or [r["bf16_loop_us"]])
            lines += [f"| {r['tokens']} | {r['bf16_loop_us']:.1f} | " +
                      "".join(f"{r[c]:.1f} | " if c in r else "- | " for c in grouped_cols) +
                      f"{r['packed_us']:.1f} | {r['packed_best_us']:.1f} ({r['packed_best_tiles']}) | "
                      f"{base / r['packed_us']:.2f}x | {r['rel_err']:.1e} ({r['bf16_loop_rel_err']:.1e}) |"]
        lines += ["", "Tile sweep (block_n x block_k, us): " + "; ".join(
            f"{r['tokens']} tok: " + ", ".join(f"{k} {v:.1f}" for k, v in r["sweep_us"].items())
            for r in layer["rows"]), ""]
    if decode and decode.get("rows"):
        i = decode["info"]
        lines += ["## Decode tokens/s of a 2-layer DeepSeek-V2-Lite-shaped model", "",
                  f"Config {i['config']} (both layers MoE); W{i['avg_bits']:.2f} RTN plan (shared experts at 3 bits); packed "
                  f"{i['packed_model_gib']:.2f} GiB vs dense bf16 {i['dense_model_gib']:.2f} GiB (embeddings and "
                  f"attention bf16 in both); loaded with {i['loaded_with']}; dense experts implementation "
                  f"{i['experts_implementation']}. Logits rel. error vs the dense model on the same weights: "
                  f"kernel {i['rel_err_kernel_vs_dense']:.1e}, torch path {i['rel_err_torchpath_vs_dense']:.1e}. "
                  f"Greedy generate, decode steps only (t(1+N) - t(1) over N), medians of {i.get('reps')}.", "",
                  "| batch | new tokens | dense bf16 tok/s | packed kernel tok/s | packed torch path tok/s | "
                  "kernel / dense |", "|---|---|---|---|---|---|"]
        for r in decode["rows"]:
            d, k, t = (r[x]["tokens_per_s"] for x in ("dense", "packed_kernel", "packed_torch"))
            lines += [f"| {r['batch']} | {r['new_tokens']} | {d:.1f} | {k:.1f} | {t:.1f} | {k / d:.2f}x |"]
        lines += [""]
    lines += ["Command: `bash benchmarks/gpu_check.sh" + (" --smoke" if SMOKE else "") + "` (raw JSON and log in "
              f"its output directory)", ""]
    text = "\n".join(lines)
    path = RESULTS / ("kernel_smoke.md" if SMOKE else "kernel.md")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return {"written": str(path)}


# ---- driver --------------------------------------------------------------------------------------
def write_json(args, step: str, obj: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{step}.json").write_text(json.dumps(obj, indent=1, default=str))


STEPS = {"env": step_env, "correct": step_correct, "layer": step_layer, "decode": step_decode, "report": step_report}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=list(STEPS))
    ap.add_argument("--out", required=True, help="directory for the steps' JSON files")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter; writes kernel_smoke.md")
    args = ap.parse_args()
    if not SMOKE and not torch.cuda.is_available() and args.step != "report":
        print("gpu_check: no CUDA device visible; this check needs a GPU (or --smoke for the CPU interpreter run)",
              file=sys.stderr)
        write_json(args, args.step, {"error": "no CUDA device visible"})
        return 2
    log(f"step {args.step} starts ({'smoke' if SMOKE else 'full'}, device {device()})")
    try:
        result = STEPS[args.step](args)
    except Exception as exc:
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {exc}"
        print(f"gpu_check: step {args.step} FAILED: {msg}", file=sys.stderr, flush=True)
        prev = load_json(Path(args.out), args.step) or {}
        write_json(args, args.step, {**prev, "error": msg[:2000]})
        return 1
    if args.step != "report":
        write_json(args, args.step, result)
    log(f"step {args.step} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
