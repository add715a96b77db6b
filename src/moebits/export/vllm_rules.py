"""What vLLM can serve from a compressed-tensors checkpoint, as rules on a moebits plan.

vLLM runs the routed experts of one MoE layer as one fused kernel (`FusedMoE`) with one weight scheme:
it looks up the scheme of expert 0's gate, up and down projections and refuses the layer when they
differ, and its WNA16 MoE kernels take 4- or 8-bit integer weights with group-wise scales (and, for an
asymmetric scheme, an integer zero point per group). Shared experts are ordinary linear layers there;
gate and up are one merged matmul, so they need one scheme, down may have its own. So a plan is
servable when:

  * every routed unit of a layer (all experts, gate/up/down) has the same bits and group size;
  * every shared expert's gate and up have the same bits and group size;
  * every quantized unit has 4 or 8 bits and group-wise scales with a group size vLLM's Marlin kernels
    take (32, 64 or 128) that divides the unit's input width;
  * zero points are integers: quantizer rtn or gptq (HQQ optimises real-valued zeros, which the
    compressed-tensors format, an integer zero point per group, cannot hold exactly);
  * units left at 16 bits are kept dense and are simply not targeted; for routed experts that means
    the whole layer (one scheme per layer).

`envelope` turns any plan of integer-zero units into a servable one without re-quantizing: each tied
set is promoted to the smallest vLLM width >= its largest bit-width. A b-bit code q with scale s and
integer zero z is the same number (q - z) * s in any wider grid, so the codes are re-expressed, not
re-rounded: the exported weights equal the plan's exactly, at the cost of the wider storage.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from ..allocate.groups import vllm_key
from ..plan import Plan
from ..units import FP_BITS, Choice, Unit

VLLM_BITS = (4, 8)
VLLM_GROUP_SIZES = (32, 64, 128)
INTEGER_ZERO_QUANTIZERS = ("rtn", "gptq")


def tied_sets(units) -> dict[tuple, list[Unit]]:
    """Units vLLM runs with one scheme: all routed units of a layer; a shared expert's gate with its up;
    a shared expert's down alone (the grouping `--target vllm` allocates with)."""
    sets: dict[tuple, list[Unit]] = defaultdict(list)
    for u in sorted(units, key=Unit.sort_key):
        sets[vllm_key(u)].append(u)
    return dict(sets)


def describe_set(key: tuple) -> str:
    return f"layer {key[0]} routed experts" if key[1] == "routed" else f"layer {key[0]} shared expert {key[2]}"


def vllm_problems(plan: Plan, shapes: dict[Unit, tuple[int, int]] | None = None) -> list[str]:
    """Why vLLM cannot serve `plan` (empty when it can), one line per offending tied set or unit.
    With `shapes` (unit -> (out, in)) the group size is also checked to divide every input width."""
    problems = []
    for key, members in tied_sets(plan.assignments).items():
        choices = {plan.choice(u) for u in members}
        settings = sorted({(c.bits, c.group_size) for c in choices})
        if len(settings) > 1:
            problems.append(f"{describe_set(key)}: mixed settings {_fmt(settings)} (vLLM takes one scheme here)")
            continue
        bits, group_size = settings[0]
        if bits == FP_BITS:
            continue
        if bits not in VLLM_BITS:
            problems.append(f"{describe_set(key)}: {bits} bits (vLLM's kernels take {VLLM_BITS})")
        if group_size not in VLLM_GROUP_SIZES:
            problems.append(f"{describe_set(key)}: group size {group_size} (vLLM's kernels take {VLLM_GROUP_SIZES})")
        elif shapes is not None and any(shapes[u][1] % group_size for u in members):
            problems.append(f"{describe_set(key)}: group size {group_size} does not divide the input width")
        hqq = sorted({c.quantizer for c in choices if c.quantizer not in INTEGER_ZERO_QUANTIZERS})
        if hqq:
            problems.append(f"{describe_set(key)}: quantizer {hqq[0]} has real-valued zero points "
                            "(compressed-tensors stores integer zeros)")
    return problems


def vllm_choices(choices: list[Choice]) -> list[Choice]:
    """The candidates `--target vllm` allocates over: the 4- and 8-bit ones (and 16, kept dense, when the
    method offers it); refuses settings no choice could serve."""
    quantized = [c for c in choices if not c.is_fp]
    bad_q = sorted({c.quantizer for c in quantized if c.quantizer not in INTEGER_ZERO_QUANTIZERS})
    if bad_q:
        raise ValueError(f"--target vllm needs integer zero points; quantizer {bad_q[0]} has real-valued ones. "
                         "Use --quantizer rtn or gptq.")
    bad_g = sorted({c.group_size for c in quantized if c.group_size not in VLLM_GROUP_SIZES})
    if bad_g:
        raise ValueError(f"--target vllm: group size {bad_g[0]} is not one vLLM's kernels take; "
                         f"use --group-size {' | '.join(map(str, VLLM_GROUP_SIZES))}")
    kept = [c for c in choices if c.is_fp or c.bits in VLLM_BITS]
    if not any(not c.is_fp for c in kept):
        raise ValueError(f"--target vllm allocates over 4 and 8 bits, and the candidates "
                         f"({sorted({c.bits for c in choices})}) have neither: pass --candidate-bits 4,8")
    return kept


def _fmt(settings) -> str:
    return ", ".join(f"{b}b" + ("" if b == FP_BITS else f"/g{g}") for b, g in settings)


def refusal_message(problems: list[str], envelope_possible: bool) -> str:
    shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
    fixes = ["quantize with `--target vllm` (layer-uniform expert bits from {4, 8}), servable by construction"]
    if envelope_possible:
        fixes.append("pass `--envelope` to promote each layer to its widest bit-width (exact, larger)")
    fixes.append("or export `--format dequantized` (16-bit weights any transformers or vLLM loads)")
    return ("this plan cannot be served by vLLM's fused-MoE kernels from a compressed-tensors checkpoint:\n  "
            + shown + "\nTo export it: " + "; ".join(fixes) + ".")


@dataclass(frozen=True)
class Promotion:
    """The export width of one unit: `bits` (4, 8, or 16 = kept dense) for a unit planned at `from_bits`."""
    from_bits: int
    bits: int


def vllm_width(bits: int) -> int:
    return FP_BITS if bits == FP_BITS else next(w for w in (*VLLM_BITS, FP_BITS) if w >= bits)


def envelope(plan: Plan) -> dict[Unit, Promotion]:
    """The export width of every unit when each tied set is promoted to its widest member (then up to a
    vLLM width). Raises ValueError when a set cannot be promoted exactly (real-valued zeros, mixed
    group sizes, per-channel scales)."""
    out = {}
    errors = []
    for key, members in tied_sets(plan.assignments).items():
        choices = [plan.choice(u) for u in members]
        quantized = [c for c in choices if not c.is_fp]
        if any(c.quantizer not in INTEGER_ZERO_QUANTIZERS for c in quantized):
            errors.append(f"{describe_set(key)}: HQQ zero points are real-valued; a wider integer grid cannot "
                          "hold them exactly, so the envelope would have to re-quantize")
            continue
        if len({c.group_size for c in quantized}) > 1 or any(c.group_size <= 0 for c in quantized):
            errors.append(f"{describe_set(key)}: group sizes {sorted({c.group_size for c in quantized})} "
                          "(the envelope keeps each unit's scales, so a set needs one group size > 0)")
            continue
        width = vllm_width(max(c.bits for c in choices))
        for u, c in zip(members, choices):
            out[u] = Promotion(c.bits, width)
    if errors:
        raise ValueError("--envelope cannot export this plan exactly:\n  " + "\n  ".join(errors)
                         + "\nExport it with `--format dequantized`, or quantize with `--quantizer rtn|gptq` "
                         "and one group size.")
    return out


def effective_bits(plan: Plan, promotions: dict[Unit, Promotion], shapes: dict[Unit, tuple[int, int]]) -> float:
    """Average storage bits per weight of the exported units, counted as moebits counts a plan (codes +
    a 16-bit scale and a zero per group stored as the plan's `zero_points`; dense units 16), so it
    compares with `plan.avg_bits`."""
    total = n = 0
    for u, p in promotions.items():
        out_f, in_f = shapes[u]
        total += replace(plan.choice(u), bits=p.bits).storage_bits(out_f, in_f, plan.zero_points)
        n += out_f * in_f
    return total / n
