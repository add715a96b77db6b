"""Apply a plan to a model (quantize every unit by its choice, in place), save the result.

Units of one layer that share a kind and a choice are quantized together as one `[B, out, in]`
batch: GPTQ's column loop then runs once per layer instead of once per expert. All Hessians of a
layer are computed from the *unquantized* weights before any of its units is written, so the order
in which units are processed does not change the result.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibrate import ExpertInputs
from .models.adapter import MoEAdapter
from .plan import Plan
from .quant import QuantizedWeight, hessian_from_inputs, quantize_weight
from .units import Unit


def layer_hessians(adapter: MoEAdapter, layer: int, inputs: dict[tuple[int, int | str], ExpertInputs],
                   experts) -> dict[tuple[int | str, str], torch.Tensor]:
    """(expert, "in") -> H of gate/up inputs, (expert, "down") -> H of the down projection's inputs.
    The calibration's Hessians (X^T X / n over every routed token) when it holds them; else (a
    calibration saved before they were accumulated) built from the kept input sample `x`."""
    out = {}
    for e in experts:
        inp = inputs[(layer, e)]
        if inp.h_in is not None and inp.h_down is not None:
            out[(e, "in")], out[(e, "down")] = inp.h_in, inp.h_down
            continue
        x = inp.x.to(adapter.weight(Unit(layer, e, "gate")).dtype)
        out[(e, "in")] = hessian_from_inputs(x)
        out[(e, "down")] = hessian_from_inputs(adapter.expert_intermediate(layer, e, x))
    return out


@torch.no_grad()
def apply_plan(adapter: MoEAdapter, plan: Plan, inputs: dict[tuple[int, int | str], ExpertInputs] | None = None,
               act_order: bool = False, progress: bool = True,
               codes: dict[Unit, QuantizedWeight] | None = None) -> float:
    """Quantize the model in place according to `plan`. Returns seconds spent.
    With `codes` (a dict), also fill it with what each unit stores (for `save_packed`)."""
    plan.check_covers(adapter.units())
    needs_h = any(a.choice.quantizer == "gptq" and not a.choice.is_fp for a in plan.assignments.values())
    if needs_h and inputs is None:
        raise ValueError("the plan uses GPTQ, which needs calibration inputs")
    t0 = time.perf_counter()
    by_layer: dict[int, list[Unit]] = defaultdict(list)
    for u in plan.units:
        by_layer[u.layer].append(u)
    for layer in tqdm(sorted(by_layer), desc="quantize", disable=not progress, leave=False):
        apply_layer(adapter, plan, layer, by_layer[layer], inputs, act_order, codes)
    return time.perf_counter() - t0


@torch.no_grad()
def apply_layer(adapter: MoEAdapter, plan: Plan, layer: int, units: list[Unit],
                inputs: dict[tuple[int, int | str], ExpertInputs] | None, act_order: bool = False,
                codes: dict[Unit, QuantizedWeight] | None = None) -> None:
    """Quantize `units` (all of MoE layer `layer`) in place by `plan` (the streaming path calls it per layer)."""
    gptq_experts = sorted({u.expert for u in units if plan.choice(u).quantizer == "gptq" and not plan.choice(u).is_fp},
                          key=lambda e: (isinstance(e, str), e if isinstance(e, int) else -1))
    if gptq_experts and inputs is None:
        raise ValueError("the plan uses GPTQ, which needs calibration inputs")
    H = layer_hessians(adapter, layer, inputs, gptq_experts) if gptq_experts else {}
    groups: dict[tuple, list[Unit]] = defaultdict(list)
    for u in units:
        groups[(u.kind, u.is_shared, plan.choice(u))].append(u)
    for (kind, _, choice), members in groups.items():
        w = torch.stack([adapter.weight(u) for u in members])
        h = None
        if choice.quantizer == "gptq" and not choice.is_fp:
            h = torch.stack([H[(u.expert, "down" if kind == "down" else "in")] for u in members])
        if codes is None:
            wq = quantize_weight(w, choice, hessian=h, act_order=act_order)
        else:
            qw = quantize_weight(w, choice, hessian=h, act_order=act_order, return_codes=True)
            wq = qw.dequantize(w.dtype)  # exactly what quantize_weight returns
            codes.update({u: qw[i] for i, u in enumerate(members)})
        for u, q in zip(members, wq):
            adapter.set_weight(u, q)


def save_quantized(model, tokenizer, plan: Plan, out_dir: str | Path) -> Path:
    """Save the quantized model as a standard HF checkpoint (safetensors) next to its plan.

    The weights are stored dequantized (16-bit), so any transformers install loads them with
    `AutoModelForCausalLM.from_pretrained` and reproduces the quantized model's outputs exactly;
    `plan.json` says which bit-width each unit was quantized to.
    """
    from .atomic import atomic_dir

    out_dir = Path(out_dir)
    dtype = next(model.parameters()).dtype
    with atomic_dir(out_dir, "dequantized") as tmp:
        try:
            model.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float16).save_pretrained(
                tmp, safe_serialization=True)
        finally:
            model.to(dtype)
        tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
    return out_dir
