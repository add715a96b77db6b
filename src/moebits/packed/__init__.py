"""The moebits packed format: real low-bit checkpoints (see layout.py for the layout, io.py for the
files, modules.py for the in-memory modules, hf.py for `from_pretrained`)."""
from __future__ import annotations

from pathlib import Path

from .io import (INDEX_KEY, QUANT_METHOD, WEIGHTS_NAME, PackedFormatError, build_packed, packed_sizes, read_index,
                 read_units, save_packed, unit_bytes, verify_checksums)
from .layout import FORMAT_VERSION, PackedIndex


def is_packed(path: str | Path) -> bool:
    """Does `path` hold a moebits packed checkpoint (by its config.json)?"""
    import json

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def load_quantized(path: str | Path, dtype="auto", device: str = "cpu"):
    """Load a packed checkpoint as a transformers model whose experts stay packed in memory.
    `dtype` is that of everything that is not a unit ("auto": as stored)."""
    from transformers import AutoModelForCausalLM

    from .hf import register

    path = Path(path)
    if not is_packed(path):
        raise PackedFormatError(f"{path} is not a moebits packed checkpoint (no quantization_config with "
                                f"quant_method {QUANT_METHOD!r} in its config.json)")
    from ..atomic import verify_sealed

    verify_sealed(path)  # config.json, plan.json, tokenizer: as written (the weights verify themselves)
    register()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def resident_bytes(model) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


__all__ = ["describe_packed", "read_units", "save_packed", "build_packed", "packed_sizes", "unit_bytes", "read_index", "verify_checksums", "load_quantized", "is_packed",
           "resident_bytes", "PackedIndex", "PackedFormatError", "FORMAT_VERSION", "WEIGHTS_NAME", "INDEX_KEY",
           "QUANT_METHOD"]


def describe_packed(path: str | Path, load: bool = True) -> dict:
    """What `moebits info` shows for a packed checkpoint: bits histogram, stored and resident bytes,
    and the same model's size in fp16."""
    import json

    from safetensors import safe_open

    from .io import weights_file

    path = Path(path)
    index = read_index(path)
    cfg = json.loads((path / "config.json").read_text())
    unit_tensors = set(index.tensor_names())
    with safe_open(str(weights_file(path)), framework="pt") as f:
        shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    elem = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I64": 8, "I32": 4, "F64": 8}
    nbytes = {k: elem.get(dt, 4) * _numel(s) for k, (s, dt) in shapes.items()}
    unit_params = 0
    for m in index.modules.values():
        if m.type == "experts":
            unit_params += 3 * m.num_experts * m.intermediate * m.hidden
        else:
            unit_params += m.out_features * m.tensors["weight"].in_features
    other_params = sum(_numel(s) for k, (s, _) in shapes.items() if k not in unit_tensors)
    q = cfg.get("quantization_config", {})
    out = {
        "format_version": index.format_version, "model_type": cfg.get("model_type"),
        "moe_layers": sum(m.type == "experts" for m in index.modules.values()), "units": len(index.units),
        "avg_bits": q.get("avg_bits"), "bits_histogram": index.bits_histogram(),
        # format 1 stored every zero in fp16; format 2 records how the plan stored (and charged) them
        "zero_points": q.get("zero_points", "fp16" if index.format_version == 1 else None),
        "model_bytes": sum(nbytes.values()), "expert_bytes": sum(nbytes[k] for k in unit_tensors),
        "file_bytes": weights_file(path).stat().st_size, "fp16_bytes": 2 * (unit_params + other_params),
    }
    if load:
        out["resident_bytes"] = resident_bytes(load_quantized(path))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
