"""Write a transformers MoE model as a GGUF llama.cpp loads: the converter's metadata, names and tokenizer,
every weight quantized by llama.cpp's own ggml code at the type asked for.

    report = write_gguf("model.gguf", model, tokenizer, types={"blk.0.ffn_up_exps.weight": "Q4_K", ...},
                        imatrix=im, model_dir=dir_with_tokenizer_files)

`types` names a ggml type for every tensor llama-quantize would quantize (`ConvertedTensor.quantizable`): 2-D and
3-D weights except norms and routers, which keep the converter's F32. A type whose block does not divide a
tensor's row width is replaced by llama-quantize's own fallback (`ggml.fallback_type`: Q4_K -> Q5_0, Q6_K ->
Q8_0, ... -> F16), and the report lists every replacement.

Weights are quantized from their values in the converter's F16 GGUF (`reference="F16"`: rounded to fp16
first) so that `llama-quantize` run on that F16 file with the written importance matrix and tensor-type
file reproduces this file byte for byte; `reference="F32"` quantizes the model's own values instead.

The file is written tensor by tensor (one tensor in memory at a time) to a temporary file renamed at the
end.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from . import ggml
from .imatrix import Imatrix
from .convert import GGUFModel, ConvertedTensor

MOEBITS_KEY = "moebits.export"  # a marker: files carrying it were written by moebits (safe to overwrite)


@dataclass
class TensorRecord:
    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    planned: str | None = None  # the type asked for, when a fallback replaced it
    imatrix: bool = False


@dataclass
class GGUFReport:
    path: Path
    arch: str
    tensors: list[TensorRecord] = field(default_factory=list)
    vocab: dict = field(default_factory=dict)

    @property
    def fallbacks(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.planned is not None]

    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def bits_per_weight(self, quantizable_only: bool = False, gm: GGUFModel | None = None) -> float:
        """Tensor bits over weights (all tensors, or those llama-quantize quantizes)."""
        rows = [t for t in self.tensors if not quantizable_only or gm is None or gm.by_name[t.name].quantizable]
        return 8 * sum(t.nbytes for t in rows) / max(1, sum(int(np.prod(t.shape)) for t in rows))

    def summary(self) -> dict:
        return {"path": str(self.path), "arch": self.arch, "tensors": len(self.tensors),
                "file_bytes": self.file_bytes, "bits_per_weight": round(self.bits_per_weight(), 4),
                "types": dict(Counter(t.type for t in self.tensors)),
                "fallbacks": {t.name: f"{t.planned}->{t.type}" for t in self.fallbacks},
                "with_imatrix": sum(t.imatrix for t in self.tensors), **{f"vocab_{k}": v for k, v in self.vocab.items()}}


def _file_type(types: Counter) -> int:
    """general.file_type: the LlamaFileType of the type holding most bytes (llama.cpp only displays it)."""
    import gguf

    ft = gguf.LlamaFileType
    table = {"F32": ft.ALL_F32, "F16": ft.MOSTLY_F16, "BF16": ft.MOSTLY_BF16, "Q8_0": ft.MOSTLY_Q8_0,
             "Q4_0": ft.MOSTLY_Q4_0, "Q4_1": ft.MOSTLY_Q4_1, "Q5_0": ft.MOSTLY_Q5_0, "Q5_1": ft.MOSTLY_Q5_1,
             "Q2_K": ft.MOSTLY_Q2_K, "Q3_K": ft.MOSTLY_Q3_K_M, "Q4_K": ft.MOSTLY_Q4_K_M, "Q5_K": ft.MOSTLY_Q5_K_M,
             "Q6_K": ft.MOSTLY_Q6_K, "IQ2_XXS": ft.MOSTLY_IQ2_XXS, "IQ2_XS": ft.MOSTLY_IQ2_XS, "IQ2_S": ft.MOSTLY_IQ2_S,
             "IQ3_XXS": ft.MOSTLY_IQ3_XXS, "IQ3_S": ft.MOSTLY_IQ3_S, "IQ4_XS": ft.MOSTLY_IQ4_XS,
             "IQ4_NL": ft.MOSTLY_IQ4_NL, "IQ1_S": ft.MOSTLY_IQ1_S, "IQ1_M": ft.MOSTLY_IQ1_M}
    quant = {k: v for k, v in types.items() if k != "F32"} or types
    return int(table.get(max(quant, key=quant.get), ft.GUESSED))


def add_hparams(w, gm: GGUFModel) -> None:
    """The architecture metadata `convert_hf_to_gguf.py` writes for the family (TextModel.set_gguf_parameters
    and the family's class)."""
    import gguf

    hp = gm.config.to_dict()

    def find(*keys):
        return next((hp[k] for k in keys if hp.get(k) is not None), None)

    w.add_block_count(gm.n_layers)
    if (n := find("max_position_embeddings")) is not None:
        w.add_context_length(int(n))
    w.add_embedding_length(int(hp["hidden_size"]))
    if (n := find("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size")) is not None:
        w.add_feed_forward_length(int(n))
    w.add_head_count(int(hp["num_attention_heads"]))
    if (n := find("num_key_value_heads")) is not None:
        w.add_head_count_kv(int(n))
    rope = hp.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    if not rope and hp.get("rope_theta") is not None:
        rope = {"rope_theta": hp["rope_theta"], "rope_type": "default"}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in ("default", None):
        raise ValueError(f"rope type {rope_type!r} is not exported by moebits; convert with convert_hf_to_gguf.py")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if (eps := find("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if (n := find("num_local_experts", "num_experts", "n_routed_experts")) is not None:
        w.add_expert_count(int(n))
    if (n := find("num_experts_per_tok")) is not None:
        w.add_expert_used_count(int(n))
    if (hd := hp.get("head_dim")) is not None:
        w.add_key_length(int(hd))
        w.add_value_length(int(hd))
    if gm.model_type in ("qwen2_moe", "qwen3_moe"):  # Qwen2MoeModel.set_gguf_parameters (Qwen3-MoE inherits)
        if (n := hp.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(int(n))
        if (n := hp.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(int(n))
    elif gm.model_type == "olmoe":  # OlmoeModel.set_gguf_parameters
        w.add_layer_norm_rms_eps(1e-5)
    elif gm.model_type == "mixtral":  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(int(hp["vocab_size"]))
        w.add_rope_dimension_count(int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]))


def resolve_types(gm: GGUFModel, types: Mapping[str, str] | Callable[[ConvertedTensor], str]) -> dict[str, tuple[str, str | None]]:
    """GGUF name -> (type written, type planned when a fallback replaced it) for every tensor."""
    out = {}
    missing = []
    for t in gm.tensors:
        if not t.quantizable:
            out[t.name] = (t.float_type, None)
            continue
        want = types(t) if callable(types) else types.get(t.name)
        if want is None:
            missing.append(t.name)
            continue
        want = want.upper()
        ggml.type_id(want)  # a known type, or a clear error
        got = ggml.fallback_type(want, t.cols)
        out[t.name] = (got, want if got != want else None)
    if missing:
        raise ValueError(f"no ggml type for {len(missing)} tensor(s), e.g. {missing[:3]}")
    unknown = sorted(set(types) - set(out)) if not callable(types) else []
    if unknown:
        raise ValueError(f"types name tensors the model does not have: {unknown[:3]}")
    return out


def tensor_bytes_of(t: ConvertedTensor, type_name: str) -> int:
    return ggml.tensor_bytes(type_name, t.shape)


def encode(values: torch.Tensor, type_name: str, imatrix: np.ndarray | None) -> np.ndarray:
    """The bytes of `values` (float32) at `type_name`, by ggml (floats: numpy's IEEE conversion, as the converter)."""
    a = values.numpy()
    if type_name == "F32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if type_name == "F16":
        return np.ascontiguousarray(a.astype(np.float16))
    rows = a if a.ndim >= 2 else a.reshape(1, -1)
    return ggml.quantize(rows, type_name, imatrix)


def write_gguf(path: str | Path, model, tokenizer, types: Mapping[str, str] | Callable[[ConvertedTensor], str],
               imatrix: Imatrix | None = None, model_dir: str | Path | None = None, reference: str = "F16",
               name: str | None = None, imatrix_file: str | None = None, progress: bool = False) -> GGUFReport:
    """Write `model` to `path` as GGUF; see the module docstring. Returns what was written."""
    import gguf
    from tqdm.auto import tqdm

    from ..atomic import atomic_path

    if reference not in ("F16", "F32"):
        raise ValueError(f"reference must be F16 (the converter's F16 GGUF) or F32, got {reference!r}")
    ggml.require()
    gm = GGUFModel(model)
    resolved = resolve_types(gm, types)
    report = GGUFReport(Path(path), gm.arch_name)
    counts = Counter()
    for t in gm.tensors:
        typ, planned = resolved[t.name]
        use_im = imatrix is not None and t.quantizable and ggml.is_quantized(typ) and t.name in imatrix.sums
        if ggml.is_quantized(typ) and ggml.requires_imatrix(typ) and not use_im:
            raise ValueError(f"{t.name}: {typ} needs an importance matrix (llama-quantize refuses it without one)")
        rec = TensorRecord(t.name, typ, t.shape, tensor_bytes_of(t, typ), planned, use_im)
        report.tensors.append(rec)
        counts[typ] += rec.nbytes
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=gm.arch_name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or getattr(gm.config, "_name_or_path", None) or gm.model_type)
        add_hparams(w, gm)
        w.add_file_type(_file_type(counts))
        if any(ggml.is_quantized(r.type) for r in report.tensors):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report.vocab = _add_vocab(w, tokenizer, model_dir, gm)
        if imatrix is not None and any(r.imatrix for r in report.tensors):
            # what llama-quantize records (tools/quantize/quantize.cpp)
            w.add_string("quantize.imatrix.file", imatrix_file or "moebits")
            if imatrix.datasets:
                w.add_string("quantize.imatrix.dataset", imatrix.datasets[0])
            w.add_int32("quantize.imatrix.entries_count", len(imatrix.sums))
            w.add_int32("quantize.imatrix.chunks_count", int(imatrix.chunk_count))
        w.add_string(MOEBITS_KEY, "moebits")
        for rec in report.tensors:
            qtype = gguf.GGMLQuantizationType[rec.type]
            if rec.type in ("F32", "F16"):
                w.add_tensor_info(rec.name, rec.shape, np.dtype(np.float32 if rec.type == "F32" else np.float16),
                                  rec.nbytes)
            else:
                w.add_tensor_info(rec.name, rec.shape, np.dtype(np.float32), rec.nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for rec in tqdm(report.tensors, desc="gguf", disable=not progress, leave=False):
            t = gm.by_name[rec.name]
            values = gm.data(t)
            if reference == "F16" and t.float_type == "F16":
                values = values.half().float()
            im = imatrix.for_tensor(rec.name) if rec.imatrix else None
            data = encode(values, rec.type, im)
            if data.nbytes != rec.nbytes:
                raise RuntimeError(f"{rec.name}: {data.nbytes} bytes encoded, {rec.nbytes} announced")
            w.write_tensor_data(data)
        w.close()
    return report


def _add_vocab(w, tokenizer, model_dir, gm: GGUFModel) -> dict:
    from .vocab import add_vocab

    return add_vocab(w, tokenizer, model_dir, int(gm.config.vocab_size))
