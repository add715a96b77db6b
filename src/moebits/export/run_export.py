"""`moebits export RUN --format {compressed-tensors,dequantized} --out DIR`.

Reads the run's packed model (`RUN/model`, the moebits packed format): each unit's codes, scales and
zeros from its index, every other tensor as stored. A dense transformers model is rebuilt from it
(fused experts holding the dequantized codes) and saved with `save_pretrained`, which writes the
per-expert names that vLLM and transformers read. That is the `dequantized` export; the
`compressed-tensors` export then replaces every quantized unit with compressed-tensors' tensors
(`compressed.py`) and checks the result by decompressing it with compressed-tensors.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..atomic import atomic_dir, check_replaceable
from ..plan import Plan

FORMATS = ("compressed-tensors", "dequantized", "gguf")


def read_packed_units(model_dir: Path):
    """`(index, {unit: QuantizedWeight}, every stored tensor)` of a packed checkpoint (checksums verified)."""
    from safetensors.torch import load_file

    from ..packed import read_index, read_units
    from ..packed.io import weights_file

    return read_index(model_dir), read_units(model_dir), load_file(str(weights_file(model_dir)))


def dense_model(model_dir: Path, index, qweights: dict, tensors: dict[str, torch.Tensor]):
    """The transformers model the packed checkpoint describes, with ordinary (dense) weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import MoEAdapter

    config = AutoConfig.from_pretrained(model_dir)
    q = getattr(config, "quantization_config", None) or {}
    rotation = (q if isinstance(q, dict) else q.to_dict()).get("rotation")
    dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unit_tensors = set(index.tensor_names())
    state = {k: v for k, v in tensors.items() if k not in unit_tensors}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{model_dir}: tensors the model does not have: {unexpected[:4]}")
    adapter = MoEAdapter(model)
    unit_params = {n for prefix, m in index.modules.items()
                   for n in ([f"{prefix}.weight"] if m.type == "linear" else [f"{prefix}.gate_up_proj",
                                                                               f"{prefix}.down_proj"])}
    model.tie_weights()
    tied = {n for n in missing if n not in unit_params}
    untied = [n for n in tied if not _is_tied(model, n)]
    if untied:
        raise ValueError(f"{model_dir}: tensors missing from the checkpoint: {untied[:4]}")
    with torch.no_grad():
        for u, qw in qweights.items():
            adapter.set_weight(u, qw.dequantize(torch.float32))
    if rotation and rotation.get("online_down"):  # a plain checkpoint runs nothing online: fold it into W_down
        from ..rotate import fold_online, install_online

        install_online(rotation, [(adapter.experts(l), "experts") for l in adapter.moe_layers]
                       + [(adapter.shared_mlp(l).down_proj, "down") for l in adapter.moe_layers
                          if adapter.shared_mlp(l) is not None])
        fold_online(adapter)
    return model.eval()


def _is_tied(model, name: str) -> bool:
    try:
        p = model.get_parameter(name)
    except AttributeError:
        return False
    ptrs = {q.data_ptr() for n, q in model.named_parameters(remove_duplicate=False) if n != name}
    return p.data_ptr() in ptrs


def save_dense(model, model_dir: Path, plan: Plan, out_dir: Path) -> Path:
    """16-bit weights (bf16 if the model is bf16, else fp16) that any transformers loads, with the
    tokenizer and plan of `model_dir`; written atomically (atomic.py: `out_dir` must be new, empty or
    an earlier moebits output)."""
    with atomic_dir(out_dir, "export") as tmp:
        save_dense_into(model, model_dir, plan, tmp)
    return out_dir


def save_dense_into(model, model_dir: Path, plan: Plan, tmp: Path) -> None:
    """`save_dense` into the existing (temporary) directory `tmp`."""
    dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float16).save_pretrained(tmp)
    for f in model_dir.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                            or f.name == "generation_config.json"):
            shutil.copy2(f, tmp / f.name)
    plan.save(tmp / "plan.json")


def export_run(run_dir: str | Path, fmt: str, out: str | Path, use_envelope: bool = False,
               verify: bool = True, pure: str | None = None) -> dict:
    """Export `RUN/model` in `fmt`; returns a report (sizes, bits, schemes, verification).
    `gguf` writes a llama.cpp file from the run's original model instead (moebits.gguf.export)."""
    from ..packed import is_packed

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    if pure is not None and fmt != "gguf":
        raise ValueError("--pure applies to --format gguf only")
    if fmt == "gguf":
        if use_envelope:
            raise ValueError("--envelope applies to --format compressed-tensors only")
        from ..gguf.export import export_gguf

        return export_gguf(run_dir, out, pure=pure)
    if use_envelope and fmt != "compressed-tensors":
        raise ValueError("--envelope applies to --format compressed-tensors only")
    model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no quantized model (expected {run_dir}/model from `moebits quantize`)")
    if out.resolve() in (run_dir.resolve(), model_dir.resolve()) or run_dir.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--out {out} holds the run being exported; choose a new directory outside {run_dir}")
    check_replaceable(out)  # before any work: never replace a directory moebits did not write
    if not is_packed(model_dir):
        # a run saved before the packed format: its model/ already is the dequantized export
        if fmt == "dequantized":
            with atomic_dir(out, "export") as tmp:
                shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            return {"format": fmt, "out": str(out), "plan_avg_bits": float("nan"), "export_avg_bits": 16.0,
                    "note": f"{model_dir} holds 16-bit weights (saved before the packed format): copied as is"}
        raise ValueError(f"{model_dir} is not a moebits packed checkpoint (a run saved before the packed format "
                         "keeps 16-bit weights only, no codes); re-run `moebits quantize` to get the codes a "
                         "compressed-tensors export needs, or export --format dequantized")
    rotation = (json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}).get("rotation")
    if fmt == "compressed-tensors" and rotation and rotation.get("online_down"):
        from .compressed import ExportRefused

        raise ExportRefused(f"{model_dir} was rotated with --rotate {rotation['method']}, which rotates every down "
                            "projection's input online (a Hadamard at run time); compressed-tensors has no way to "
                            "express that and vLLM would need its own online-Hadamard support. Export it with "
                            "--format dequantized (the online rotation folded into 16-bit weights), or quantize "
                            "with --rotate hadamard-offline (residual-stream rotation only, all in the weights)")
    plan = Plan.load(model_dir / "plan.json")
    index, qweights, tensors = read_packed_units(model_dir)
    plan.check_covers(qweights)
    if fmt == "dequantized" and any(a.choice.quantizes_acts for a in plan.assignments.values()):
        from .compressed import ExportRefused

        raise ExportRefused("the plan quantizes activations (W-A), which a 16-bit dequantized checkpoint cannot "
                            "express (transformers would run 16-bit activations); export --format "
                            "compressed-tensors (per-token dynamic input_activations) or use the packed model")
    model = dense_model(model_dir, index, qweights, tensors)
    shapes = {u: tuple(q.shape) for u, q in qweights.items()}
    report = {"format": fmt, "out": str(out), "plan_avg_bits": plan.avg_bits(shapes)}
    if fmt == "dequantized":
        with atomic_dir(out, "export") as tmp:
            save_dense_into(model, model_dir, plan, tmp)
        report["export_avg_bits"] = 16.0
        return report

    from .compressed import ExportRefused, verify_compressed_tensors, write_compressed_tensors_into

    if any(q.rank for q in qweights.values()):
        raise ExportRefused("the plan has BT-MoE low-rank compensators, which compressed-tensors cannot store; "
                            "export it with --format dequantized")
    with atomic_dir(out, "export") as tmp:  # verified before it replaces anything
        with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
            dense_dir = save_dense(model, model_dir, plan, Path(work) / "dense")
            rep = write_compressed_tensors_into(dense_dir, qweights, plan, tmp, use_envelope, shapes)
        if verify:
            rep.verified_units = verify_compressed_tensors(tmp, qweights, plan)
        report.update({"export_avg_bits": rep.export_avg_bits, "promoted_units": rep.promoted_units,
                       "schemes": rep.schemes, "unit_bytes": rep.unit_bytes, "verified_units": rep.verified_units,
                       "envelope": use_envelope, "transformers_note": rep.transformers_note})
        (tmp / "moebits_export.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
