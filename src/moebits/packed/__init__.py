"""The moebits packed format: real low-bit checkpoints (see layout.py for the layout, io.py for the
files, modules.py for the in-memory modules, hf.py for `from_pretrained`)."""
from __future__ import annotations

from pathlib import Path

from .io import (INDEX_KEY, QUANT_METHOD, WEIGHTS_NAME, PackedFormatError, build_packed, read_index, save_packed,
                 verify_checksums)
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


__all__ = ["save_packed", "build_packed", "read_index", "verify_checksums", "load_quantized", "is_packed",
           "resident_bytes", "PackedIndex", "PackedFormatError", "FORMAT_VERSION", "WEIGHTS_NAME", "INDEX_KEY",
           "QUANT_METHOD"]
