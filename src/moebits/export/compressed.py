"""Export to compressed-tensors `pack-quantized` (what vLLM serves), and read it back to check it.

Input: a dense checkpoint of the quantized model as transformers saves it (`save_pretrained` writes
fused experts back in the per-expert layout, e.g. `model.layers.3.mlp.experts.7.gate_proj.weight`,
which is also what vLLM and transformers' compressed-tensors loader read), plus the codes, scales and
zeros of every unit. Each quantized unit's `weight` is replaced by compressed-tensors' tensors for an
asymmetric group-wise int scheme:

    weight_packed      int32, the codes packed by `compressed_tensors`' own `pack_to_int32`
    weight_scale       fp16 [out, G]
    weight_zero_point  int32, packed likewise along the output dimension
    weight_shape       [out, in]

compressed-tensors' int grid is signed (`-2^(B-1) .. 2^(B-1)-1`), moebits' unsigned (`0 .. 2^B-1`), so
codes and zero are both shifted by `2^(B-1)`, which leaves `(q - zero) * scale` unchanged. The
`quantization_config` has one config group per (bits, group size), its `targets` `re:` patterns naming
the layers' expert projections (`...experts.<e>.(gate_proj|up_proj|down_proj|w1|w2|w3)`), so vLLM
finds one scheme per MoE layer. A W-A plan (activation bits < 16) is refused: `input_activations`
exist in compressed-tensors, but a scheme with them is not `pack-quantized` any more (compressed-tensors
infers another format for it and its own dequantizer then finds our packed tensors orphaned), and
vLLM's integer W-A kernels take symmetric int8-stored weights, not asymmetric group codes. The check (`verify_compressed_tensors`) decompresses the export with
compressed-tensors' model-free dequantizer and compares every unit with the moebits weight.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Protocol

import torch
from safetensors.torch import load_file, save_file

from ..plan import Plan
from ..units import FP_BITS, Unit
from .vllm_rules import Promotion, effective_bits, envelope, refusal_message, tied_sets, vllm_problems

PROJ_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
ALL_PROJ = "gate_proj|up_proj|down_proj|w1|w2|w3"


# Checked against transformers 5.23 (tests/test_export.py keeps the check as a non-strict xfail).
TRANSFORMERS_NOTE = (
    "transformers' compressed-tensors loader rebuilds fused experts from weight_packed / weight_scale / "
    "weight_shape only and fails on asymmetric (zero-point) experts ('Asymmetric quant requires zero-point "
    "values'); it would also decompress every layer's experts with the first experts' config group. Serve this "
    "export with vLLM; for transformers, export --format dequantized.")


class ExportRefused(ValueError):
    """The plan cannot be exported in the requested format (the message says why and what to pass)."""


class UnitCodes(Protocol):  # what a quantizer stores for one unit (moebits.quant.QuantizedWeight)
    bits: int
    group_size: int
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # fp16 [out, G]
    zero: torch.Tensor  # fp16 [out, G]


@dataclass
class ExportReport:
    out_dir: Path
    plan_avg_bits: float
    export_avg_bits: float  # counted as moebits counts a plan (16-bit scale, zero as the plan stores it)
    promoted_units: int  # units stored wider than planned (--envelope)
    schemes: dict[str, dict] = field(default_factory=dict)  # config group -> {bits, group_size, targets}
    unit_bytes: int = 0  # bytes of the exported units' tensors as written
    verified_units: int = 0
    transformers_note: str | None = None


def load_dense_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def unit_modules(keys, units) -> dict[Unit, str]:
    """The checkpoint module name of every unit (`...experts.7.gate_proj`), found by name; exactly one each."""
    keys = [k for k in keys if k.endswith(".weight")]
    out = {}
    for u in units:
        names = "|".join(PROJ_NAMES[u.kind])
        if u.is_shared:
            pat = re.compile(rf"(.*\.)?layers\.{u.layer}\.[^.]+\.shared_experts?\.({names})\.weight$")
        else:
            pat = re.compile(rf"(.*\.)?layers\.{u.layer}\.[^.]+\.experts\.{u.expert}\.({names})\.weight$")
        hits = [k for k in keys if pat.match(k)]
        if len(hits) != 1:
            raise ValueError(f"{u.name}: expected one checkpoint weight for it, found {hits[:4]} "
                             "(an architecture whose saved expert names moebits does not know)")
        out[u] = hits[0].removesuffix(".weight")
    return out


def promotions_for(plan: Plan, use_envelope: bool, shapes: dict[Unit, tuple[int, int]]) -> dict[Unit, Promotion]:
    if use_envelope:
        promotions = envelope(plan)
        widened = Plan({u: replace(a, choice=replace(a.choice, bits=promotions[u].bits))
                        for u, a in plan.assignments.items()})
        problems = vllm_problems(widened, shapes)  # what promotion cannot fix (group sizes)
        if problems:
            raise ExportRefused(refusal_message(problems, False))
        return promotions
    problems = vllm_problems(plan, shapes)
    if problems:
        try:
            envelope(plan)
            possible = True
        except ValueError:
            possible = False
        raise ExportRefused(refusal_message(problems, possible))
    return {u: Promotion(plan.choice(u).bits, plan.choice(u).bits) for u in plan.assignments}


def _to_ct(codes: torch.Tensor, zero: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned moebits codes/zeros -> compressed-tensors' signed int8 values at `width` bits."""
    offset = 1 << (width - 1)
    return (codes.to(torch.int16) - offset).to(torch.int8), (zero.float().to(torch.int16) - offset).to(torch.int8)


def _targets(key: tuple, modules: list[str]) -> list[str]:
    if key[1] == "routed":
        parents = sorted({m.rsplit(".", 2)[0] for m in modules})  # "...layers.3.mlp.experts"
        return [rf"re:^{re.escape(p)}\.\d+\.({ALL_PROJ})$" for p in parents]
    return [rf"re:^{re.escape(m)}$" for m in sorted(modules)]


def write_compressed_tensors(dense_dir: str | Path, quantized: Mapping[Unit, UnitCodes], plan: Plan,
                             out_dir: str | Path, use_envelope: bool = False,
                             shapes: dict[Unit, tuple[int, int]] | None = None) -> ExportReport:
    """Write `out_dir` from the dense checkpoint `dense_dir` of the quantized model and every unit's codes.

    Refuses (ExportRefused) a plan vLLM cannot serve unless `use_envelope`; the envelope promotes each
    tied set to its widest bit-width by re-expressing codes (exact). `out_dir` is written atomically and
    must be new, empty or an earlier moebits output (atomic.py).
    """
    from ..atomic import atomic_dir

    with atomic_dir(out_dir, "export") as tmp:
        report = write_compressed_tensors_into(dense_dir, quantized, plan, tmp, use_envelope, shapes)
    report.out_dir = Path(out_dir)
    return report


def write_compressed_tensors_into(dense_dir: str | Path, quantized: Mapping[Unit, UnitCodes], plan: Plan,
                                  out_dir: str | Path, use_envelope: bool = False,
                                  shapes: dict[Unit, tuple[int, int]] | None = None) -> ExportReport:
    """`write_compressed_tensors` into the existing (empty, temporary) directory `out_dir`."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    tensors = load_dense_checkpoint(dense_dir)
    modules = unit_modules(tensors.keys(), plan.units)
    shapes = shapes or {u: tuple(tensors[modules[u] + ".weight"].shape) for u in plan.units}
    promotions = promotions_for(plan, use_envelope, shapes)

    wa = sorted({a.choice.act_bits for a in plan.assignments.values() if a.choice.quantizes_acts})
    if wa:
        raise ExportRefused(
            f"the plan quantizes activations (to {wa} bits); compressed-tensors pack-quantized carries weight-only "
            "schemes (with input_activations a scheme changes format, and vLLM's integer W-A kernels need "
            "symmetric int8-stored weights, not asymmetric group codes). Serve the packed model "
            "(moebits.load_quantized / from_pretrained after `import moebits`), which reproduces the activations")
    groups: dict[tuple[int, int], list[str]] = {}
    unit_bytes = 0
    for key, members in tied_sets(plan.assignments).items():
        width = promotions[members[0]].bits
        if width == FP_BITS:
            continue  # kept dense: not targeted
        group_size = plan.choice(members[0]).group_size
        for u in members:
            q = quantized[u]
            if q.bits != promotions[u].from_bits or q.group_size != group_size:
                raise ValueError(f"{u.name}: codes at {q.bits} bits g{q.group_size}, plan says "
                                 f"{promotions[u].from_bits} bits g{group_size}")
            zero = q.zero.float()
            if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 2 ** q.bits - 1:
                raise ExportRefused(f"{u.name}: zero points are not integers in 0..{2 ** q.bits - 1} (HQQ?); "
                                    "compressed-tensors stores integer zeros. Export with --format dequantized.")
            name = modules[u]
            dense = tensors.pop(name + ".weight")
            mine = _dequantize(q).to(dense.dtype)
            if not torch.equal(dense, mine):  # the checkpoint must be the model these codes describe
                raise ValueError(f"{u.name}: the dense checkpoint's {name}.weight is not the dequantized codes "
                                 f"(max diff {(dense.float() - mine.float()).abs().max().item():.3g})")
            codes_ct, zero_ct = _to_ct(q.codes, q.zero, width)
            new = {
                name + ".weight_packed": pack_to_int32(codes_ct, width),
                name + ".weight_scale": q.scale.to(torch.float16).contiguous(),
                name + ".weight_zero_point": pack_to_int32(zero_ct, width, packed_dim=0).contiguous(),
                name + ".weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64),
            }
            unit_bytes += sum(t.numel() * t.element_size() for t in new.values())
            tensors.update(new)
        groups.setdefault((width, group_size), []).extend(_targets(key, [modules[u] for u in members]))

    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=targets,
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=g),
        )
        for i, ((bits, g), targets) in enumerate(sorted(groups.items()))
    }
    qconfig = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                                 quantization_status="compressed", ignore=["lm_head"])

    tmp = out_dir
    for f in dense_dir.iterdir():  # tokenizer, generation config, plan.json, ...
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",
                                                                                   "model.safetensors.index.json"):
            shutil.copy2(f, tmp / f.name)
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = {**qconfig.model_dump(mode="json"), "version": ct_version}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    report = ExportReport(out_dir, plan.avg_bits(shapes), effective_bits(plan, promotions, shapes),
                          sum(p.bits != p.from_bits for p in promotions.values()), unit_bytes=unit_bytes)
    report.schemes = {n: {"bits": s.weights.num_bits, "group_size": s.weights.group_size, "targets": s.targets}
                      for n, s in config_groups.items()}
    if any("experts\\." in t for targets in groups.values() for t in targets):
        report.transformers_note = TRANSFORMERS_NOTE
    return report


def _dequantize(q: UnitCodes) -> torch.Tensor:
    """`(codes - zero) * scale` in float32, the moebits weight of a unit."""
    k = q.codes.shape[-1]
    g = k if q.group_size <= 0 else q.group_size
    idx = torch.arange(k) // g
    return (q.codes.float() - q.zero.float()[:, idx]) * q.scale.float()[:, idx]


def verify_compressed_tensors(out_dir: str | Path, quantized: Mapping[Unit, UnitCodes], plan: Plan,
                              dtype: torch.dtype = torch.float16) -> int:
    """Decompress the export with compressed-tensors and compare every unit with the moebits weight
    (`(codes - zero) * scale` rounded to `dtype`): they must be equal. Returns the number of units compared."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

    out_dir = Path(out_dir)
    tensors = load_dense_checkpoint(out_dir)
    dense = CompressedTensorsDequantizer(out_dir, dtype=dtype).validate(dict(tensors))
    modules = unit_modules(dense.keys(), plan.units)
    for u in plan.units:
        got = dense[modules[u] + ".weight"]
        if plan.choice(u).is_fp:
            continue
        want = _dequantize(quantized[u]).to(got.dtype)  # `dtype`, or the stored dtype of a unit kept dense
        if got.shape != want.shape or not torch.equal(got, want):
            diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("nan")
            raise AssertionError(f"{u.name}: compressed-tensors decompresses {modules[u]} to a different weight "
                                 f"(max abs diff {diff:.3g})")
    return len(plan.units)
