"""The tensors of a transformers MoE model as llama.cpp's converter (convert_hf_to_gguf.py) writes them.

Names come from the `gguf` package's `TensorNameMap` (the converter's own table); transformers 5's fused
experts `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` become `blk.N.ffn_{gate,up}_exps.weight [E, I, H]`
and `blk.N.ffn_down_exps.weight [E, H, I]`, as the converter splits them. Shapes are in numpy/torch order:
the last axis is a ggml row (the input features), the first of a 3-D tensor the expert.

Per family, what the converter changes besides names:
  * Mixtral (llama.cpp arch `llama`): q/k rows permuted from HF's rotate-half layout to llama.cpp's
    interleaved rope (`LlamaModel.permute`). A row permutation: ggml quantizes rows independently, so a
    tensor's quantization error and its importance matrix (per input column) are unchanged by it.
  * Qwen2-MoE / Qwen3-MoE / OLMoE: none (llama.cpp runs them with NeoX rope, as HF does).
DeepSeek-V2/V3 (MLA: the converter splits `kv_b_proj` into a transposed `attn_k_b` and `attn_v_b`) is not
exported yet and refused by name.

`quantizable` is llama-quantize's rule (src/llama-quant.cpp, tensor_allows_quantization): 2-D or 3-D, a
`.weight`, not a norm, not a router (`ffn_gate_inp.weight`). The others keep the converter's type (F32).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..units import SHARED, Unit

# transformers model_type -> (gguf MODEL_ARCH member name, what it is called in messages)
ARCHS = {
    "qwen2_moe": "QWEN2MOE",
    "qwen3_moe": "QWEN3MOE",
    "olmoe": "OLMOE",
    "mixtral": "LLAMA",
}
NOT_YET = {"deepseek_v2": "DeepSeek-V2", "deepseek_v3": "DeepSeek-V3"}
# llama.cpp's graphs hard-code whether the top-k routing weights are renormalised (build_moe_ffn's norm_w):
# models/qwen2moe.cpp and olmoe.cpp do not, qwen3moe.cpp does (llama/Mixtral: softmax over the top k, always)
ROUTING_NORM = {"qwen2_moe": False, "olmoe": False, "qwen3_moe": True}
OUTPUT_REQUIRED = ("qwen2_moe", "olmoe")  # llama.cpp loads no output-less (tied) model of these families
EXPERT_ROLES = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
SHARED_ROLES = {"gate": "ffn_gate_shexp", "up": "ffn_up_shexp", "down": "ffn_down_shexp"}


class UnsupportedGGUFModel(ValueError):
    """moebits cannot write this model family as GGUF (yet)."""


@dataclass(frozen=True)
class ConvertedTensor:
    name: str  # GGUF name, e.g. "blk.3.ffn_down_exps.weight"
    shape: tuple[int, ...]  # numpy order: [experts, rows, cols] | [rows, cols] | [n]
    hf_name: str  # the transformers parameter it comes from
    layer: int | None  # decoder layer (None: embeddings, output, final norm)
    role: str  # GGUF base name without block and suffix: "attn_q", "ffn_up_exps", "token_embd", ...
    quantizable: bool  # llama-quantize quantizes it
    float_type: str  # its type in the converter's F16 GGUF: "F32" (1-D, norms, routers) or "F16"

    @property
    def n_experts(self) -> int:
        """Matrices stacked in the tensor (experts of a fused expert tensor; else 1)."""
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("the `gguf` package is not installed: `pip install 'moebits[gguf]'`") from e
    return gguf


def gguf_arch(model_type: str):
    """The gguf.MODEL_ARCH of a transformers model_type, or UnsupportedGGUFModel."""
    if model_type in NOT_YET:
        raise UnsupportedGGUFModel(f"GGUF export of {NOT_YET[model_type]} (MLA attention) is not implemented yet; "
                                   f"families exported: {', '.join(sorted(ARCHS))}")
    if model_type not in ARCHS:
        raise UnsupportedGGUFModel(f"no GGUF export for model type {model_type!r}; families exported: "
                                   f"{', '.join(sorted(ARCHS))}")
    return getattr(_gguf().MODEL_ARCH, ARCHS[model_type])


def _role(gguf_name: str) -> tuple[int | None, str]:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return int(parts[1]), parts[2]
    return None, parts[0]


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing ggml dimensions of size 1 do not count (Qwen2-MoE's shared-expert gate [1, H] is 1-D)."""
    ne = list(reversed(shape))
    return max([i + 1 for i, n in enumerate(ne) if n > 1] or [1])


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return (ggml_n_dims(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _float_type(name: str, ndim: int) -> str:
    # convert_hf_to_gguf.py (prepare_tensors): 1-D tensors, norms and routers are F32, the rest the outtype
    if ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp" in name or not name.endswith(".weight"):
        return "F32"
    return "F16"


class GGUFModel:
    """The GGUF view of a transformers MoE model: `tensors` (in the converter's order) and their data.

        gm = GGUFModel(model)
        for t in gm.tensors: w = gm.data(t)   # torch float32, as the converter would write it
        gm.unit_tensor(Unit(3, 5, "down"))    # ("blk.3.ffn_down_exps.weight", 5)
    """

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.model_type = getattr(self.config, "model_type", type(model).__name__)
        self.arch = gguf_arch(self.model_type)
        self.n_layers = int(self.config.num_hidden_layers)
        heads = int(self.config.num_attention_heads)
        kv = int(getattr(self.config, "num_key_value_heads", None) or heads)
        want_norm = ROUTING_NORM.get(self.model_type)
        norm = getattr(self.config, "norm_topk_prob", None)
        if want_norm is not None and norm is not None and bool(norm) != want_norm:
            raise UnsupportedGGUFModel(f"llama.cpp's {self.arch_name} {'re' if want_norm else 'does not re'}normalise"
                                       f"{'s' if want_norm else ''} the top-k routing weights, and this model has "
                                       f"norm_topk_prob={norm}: its GGUF would compute a different model")
        if self.model_type == "olmoe" and kv != heads:  # llama.cpp: attn_k_norm is [n_embd]
            raise UnsupportedGGUFModel(f"llama.cpp's OLMoE normalises K over the full width (no grouped-query "
                                       f"attention); this model has {kv} key/value heads for {heads} heads")
        self._map = _gguf().get_tensor_name_map(self.arch, self.n_layers)
        self._sources: dict[str, tuple[str, object]] = {}  # gguf name -> (hf name, how to get it)

    @property
    def arch_name(self) -> str:
        return _gguf().MODEL_ARCH_NAMES[self.arch]

    @cached_property
    def tensors(self) -> list[ConvertedTensor]:
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        out: list[ConvertedTensor] = []
        for hf_name, p in self.model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # the checkpoint has no lm_head: llama.cpp reuses token_embd
            if hf_name.endswith("mlp.experts.gate_up_proj"):
                layer = int(hf_name.split(".layers.")[1].split(".")[0])
                n_ff = p.shape[1] // 2
                for kind, sl in (("gate", slice(0, n_ff)), ("up", slice(n_ff, None))):
                    out.append(self._add(f"blk.{layer}.{EXPERT_ROLES[kind]}.weight", hf_name,
                                         (p.shape[0], n_ff, p.shape[2]), ("slice", sl)))
                continue
            if hf_name.endswith("mlp.experts.down_proj"):
                layer = int(hf_name.split(".layers.")[1].split(".")[0])
                out.append(self._add(f"blk.{layer}.{EXPERT_ROLES['down']}.weight", hf_name, tuple(p.shape), None))
                continue
            name = self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UnsupportedGGUFModel(f"{self.model_type}: no GGUF name for {hf_name} (shape {tuple(p.shape)}) in "
                                           "the gguf package's tensor map; a newer `gguf` may know it")
            permute = None
            if self.model_type == "mixtral" and name.endswith((".attn_q.weight", ".attn_k.weight",
                                                               ".attn_q.bias", ".attn_k.bias")):
                heads = int(self.config.num_attention_heads)
                kv = int(getattr(self.config, "num_key_value_heads", heads) or heads)
                permute = ("permute", heads if ".attn_q." in name else kv)
            out.append(self._add(name, hf_name, tuple(p.shape), permute))
        if tied and self.model_type in OUTPUT_REQUIRED and "output.weight" not in {t.name for t in out}:
            # llama.cpp's qwen2moe and olmoe graphs require an output matrix (no fallback to token_embd, unlike
            # llama/qwen3moe): a tied model gets the embedding written a second time as `output.weight`
            emb = next(t for t in out if t.name == "token_embd.weight")
            out.append(self._add("output.weight", emb.hf_name, emb.shape, None))
        names = [t.name for t in out]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise UnsupportedGGUFModel(f"{self.model_type}: several parameters map to {sorted(dup)[:3]}")
        return out

    def _add(self, name: str, hf_name: str, shape: tuple[int, ...], how) -> ConvertedTensor:
        layer, role = _role(name)
        self._sources[name] = (hf_name, how)
        return ConvertedTensor(name, tuple(int(s) for s in shape), hf_name, layer, role, _quantizable(name, shape),
                          _float_type(name, len(shape)))

    @cached_property
    def by_name(self) -> dict[str, ConvertedTensor]:
        return {t.name: t for t in self.tensors}

    def data(self, t: ConvertedTensor | str) -> torch.Tensor:
        """The tensor's values (float32, CPU) exactly as the converter writes them (split, permuted)."""
        t = self.by_name[t] if isinstance(t, str) else t
        if not self._sources:
            _ = self.tensors
        hf_name, how = self._sources[t.name]
        p = self.model.get_parameter(hf_name) if "." in hf_name else getattr(self.model, hf_name)
        w = p.detach().to("cpu", torch.float32)
        if how is not None and how[0] == "slice":
            w = w[:, how[1], :]
        elif how is not None and how[0] == "permute":
            n_head = how[1]
            w = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w.contiguous()

    @torch.no_grad()
    def set_data(self, t: ConvertedTensor | str, values: torch.Tensor) -> None:
        """Write GGUF-layout `values` back into the model's parameter (undoing the split / permutation), e.g.
        the dequantized weights llama.cpp computes with, to evaluate them with transformers."""
        t = self.by_name[t] if isinstance(t, str) else t
        hf_name, how = self._sources[t.name]
        p = self.model.get_parameter(hf_name)
        v = values.reshape(t.shape).to(torch.float32)
        if how is not None and how[0] == "slice":
            p.data[:, how[1], :] = v.to(p.dtype)
            return
        if how is not None and how[0] == "permute":  # the inverse of the converter's permutation
            n_head = how[1]
            v = v.reshape(n_head, v.shape[0] // n_head // 2, 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
        p.data.copy_(v.reshape(p.shape).to(p.dtype))

    def unit_tensor(self, unit: Unit) -> tuple[str, int | None]:
        """(GGUF tensor name, expert index in it or None) of a moebits unit."""
        if unit.expert == SHARED:
            return f"blk.{unit.layer}.{SHARED_ROLES[unit.kind]}.weight", None
        return f"blk.{unit.layer}.{EXPERT_ROLES[unit.kind]}.weight", int(unit.expert)

    def linear_tensor(self, hf_module: str) -> str | None:
        """GGUF name of the weight of a transformers nn.Linear module (`model.layers.0.self_attn.q_proj`)."""
        name = self._map.get_name(hf_module + ".weight", try_suffixes=(".weight",))
        return name if name in self.by_name else None
