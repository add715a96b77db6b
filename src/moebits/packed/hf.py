"""transformers integration: a quantization config and an HfQuantizer for `quant_method: "moebits"`,
registered when `moebits` is imported, so `AutoModelForCausalLM.from_pretrained(DIR)` loads a packed
checkpoint.

transformers builds the model on the meta device, calls the quantizer with the checkpoint files,
then fills every parameter and buffer by name from the safetensors file. Before that fill, the
quantizer reads the index from the file's metadata and swaps each fused experts module (and each
shared-expert linear) for its packed module, whose buffers carry exactly the stored names, shapes
and dtypes; the loader keeps a buffer's own dtype when it differs from the model's, so codes stay
uint8, scales fp16, and zeros fp16 or (format 2, integer zeros) one uint8 bitstream per set. After the fill, the unit tensors' checksums are verified.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .io import QUANT_METHOD, PackedFormatError, read_index, verify_checksums
from .layout import FORMAT_VERSION, READABLE_VERSIONS, PackedIndex
from .modules import PackedExperts, PackedLinear


class MoebitsConfig(QuantizationConfigMixin):
    """`quantization_config` of a packed moebits checkpoint (config.json)."""

    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs):
        if format_version not in READABLE_VERSIONS:
            raise PackedFormatError(f"config.json: quantization_config has moebits format_version {format_version!r}, "
                                    f"which this moebits does not know (it reads versions "
                                    f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade moebits")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        kwargs.pop("quant_method", None)
        for k, v in kwargs.items():
            setattr(self, k, v)


def convert_model(model: nn.Module, index: PackedIndex, device=None) -> nn.Module:
    """Swap every module named in the index for its packed replacement (empty buffers on `device`)."""
    by_module: dict[str, dict] = {}
    for name, e in index.units.items():
        by_module.setdefault(e.module, {})[name] = e
    for prefix, spec in index.modules.items():
        parent_name, _, attr = prefix.rpartition(".")
        try:
            original = model.get_submodule(prefix)
        except AttributeError:
            raise PackedFormatError(f"the packed index names module {prefix}, which this model does not have "
                                    "(a config.json from another model?)") from None
        units = by_module.get(prefix, {})
        if spec.type == "experts":
            new = PackedExperts(spec, units, original, device)
        else:
            bias = getattr(original, "bias", None)
            new = PackedLinear(spec, next(iter(units.values())), device,
                               bias_dtype=bias.dtype if bias is not None else None)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def install_recorded_act_quant(model: nn.Module, act: dict | None) -> None:
    """Re-install the activation quantization a W-A checkpoint records (io.act_quant_config)."""
    if not act:
        return
    from ..models.act_quant import install_act_quant
    from ..units import Unit

    if act.get("scheme") != "per-token symmetric":
        raise PackedFormatError(f"config.json: unknown activation quantization scheme {act.get('scheme')!r}")
    install_act_quant(model, {Unit.parse(n): int(b) for n, b in act["units"].items()}, float(act.get("clip", 1.0)))


def install_rotation(model: nn.Module, index: PackedIndex, rotation: dict | None) -> int:
    """Rebuild the online Hadamards a rotated checkpoint records (rotate.py) on its packed modules:
    every routed expert's and shared expert's down projection."""
    if not rotation:
        return 0
    from ..rotate import install_online

    downs = {e.module for name, e in index.units.items() if name.endswith(".down")}
    mods = [(model.get_submodule(prefix), "experts" if spec.type == "experts" else "down")
            for prefix, spec in index.modules.items() if spec.type == "experts" or prefix in downs]
    return install_online(rotation, mods)


class MoebitsHfQuantizer(HfQuantizer):
    requires_calibration = True  # a packed checkpoint is loaded, never produced, by transformers

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._file: Path | None = None
        self._index: PackedIndex | None = None

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files or len(checkpoint_files) != 1:
            raise PackedFormatError(f"a moebits packed checkpoint is one safetensors file; got {checkpoint_files}")
        self._file = Path(checkpoint_files[0])
        from ..atomic import verify_sealed

        verify_sealed(self._file.parent)  # config.json and the other small files as written
        self._index = read_index(self._file)
        convert_model(model, self._index, device="meta")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        verify_checksums(model, self._index, self._file)
        install_rotation(model, self._index, getattr(self.quantization_config, "rotation", None))
        install_recorded_act_quant(model, getattr(self.quantization_config, "act_quant", None))
        return model

    def is_serializable(self):
        return False

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Make transformers' auto classes load `quant_method: "moebits"` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoebitsConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoebitsHfQuantizer)
