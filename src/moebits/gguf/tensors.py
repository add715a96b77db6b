"""The tensors of a model's GGUF file as llama.cpp lays them out, and what each costs at a ggml type.

llama.cpp holds one ggml type per tensor. An MoE layer's routed experts are fused into three 3-D
tensors `blk.N.ffn_{gate,up,down}_exps.weight [E, out, in]`, so every expert of a layer has one type
per kind by construction; shared experts (`ffn_*_shexp`), attention projections (`attn_q/k/v/output`,
or MLA's `attn_q_a/q_b/kv_a_mqa/kv_b`), dense FFNs, `token_embd` and `output` are 2-D tensors with a
type each. These are the decision units of `--target llamacpp` (`GGUFTensor.allocated`), except the
embeddings and output, which follow llama.cpp's stock rule (`GGUFLayout.stock_types`). Everything llama.cpp
never quantizes (1-D norms and biases, the routers `ffn_gate_inp`, Qwen2-MoE's [1, H] shared-expert gate)
keeps the converter's type (F32). The tensors, their names and order are the export's (convert.py).

Sizes are exact ggml row sizes (`ggml.row_bytes`: `ggml_row_size` of the library). A type whose block
does not divide the row cannot store it: llama.cpp then falls back to another type (`effective_type`,
llama-quantize's `tensor_type_fallback`), which is what such a tensor really holds and costs: on a
model whose widths are not multiples of 256 (the demo: 128) every K-quant request becomes a 32-block
type (Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..units import SHARED, Unit
from . import ggml

ROLES = ("experts", "shared", "attention", "dense", "token_embd", "output", "fixed")
ALLOCATED_ROLES = ("experts", "shared", "attention", "dense")



def effective_type(type_name: str, n_cols: int) -> str:
    """The type llama.cpp stores a tensor of rows of `n_cols` values in when asked for `type_name`."""
    return ggml.fallback_type(type_name, n_cols)


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # GGUF tensor name, e.g. "blk.3.ffn_down_exps.weight"
    shape: tuple[int, ...]  # torch order: [experts, out, in] for fused experts, [out, in], or [n] (1-D)
    role: str  # one of ROLES
    layer: int | None = None
    kind: str | None = None  # gate/up/down for expert and shared tensors
    units: tuple[Unit, ...] = ()  # moebits units held (one per expert for a fused tensor)
    source: str | None = None  # HF parameter (attention/dense: the nn.Linear module's name)
    fixed_type: str = "F32"  # role "fixed": the type the converter writes it at

    @property
    def cols(self) -> int:
        """Values per row (ggml's ne[0]): the input width."""
        return self.shape[-1]

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def rows(self) -> int:
        return self.n_elements // self.cols

    @property
    def allocated(self) -> bool:
        return self.role in ALLOCATED_ROLES

    def nbytes(self, type_name: str) -> int:
        """Exact bytes this tensor's data takes at `type_name` (after llama.cpp's fallback)."""
        return self.rows * ggml.row_bytes(effective_type(type_name, self.cols), self.cols)


@dataclass
class GGUFLayout:
    """Every tensor of the model's GGUF file, in file order, and which of them are tied (no `output`)."""
    arch: str
    tensors: list[GGUFTensor]
    tied_embeddings: bool

    def __post_init__(self):
        self.by_name = {t.name: t for t in self.tensors}

    @property
    def allocated(self) -> list[GGUFTensor]:
        return [t for t in self.tensors if t.allocated]

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def output_tensor(self) -> GGUFTensor:
        """What llama.cpp treats as the output matrix: `output`, or `token_embd` when tied."""
        return self.by_name.get("output.weight") or self.by_name["token_embd.weight"]

    def stock_types(self, base_type: str = "Q4_K") -> dict[str, str]:
        """llama.cpp's stock rule for the tensors not allocated (`llama_tensor_get_type_impl`):

        * the output matrix (`output`, or `token_embd` when the embeddings are tied): Q6_K, or Q8_0 when
          its rows are not a multiple of the base type's block (256 for the K-quants) -- what every
          K-quant mix (Q2_K ... Q5_K_M) does;
        * an untied `token_embd`: the mix's base type (`base_type`; Q4_K as in Q4_K_M), with fallback;
        * 1-D tensors and routers: F32 (never quantized).
        """
        out = {}
        output = self.output_tensor()
        for t in self.tensors:
            if t.role == "fixed":
                out[t.name] = t.fixed_type
            elif t is output:
                out[t.name] = "Q8_0" if t.cols % ggml.block_size(base_type) else "Q6_K"
            elif t.role == "token_embd":
                out[t.name] = effective_type(base_type, t.cols)
        return out

    def file_bytes(self, types: dict[str, str]) -> int:
        """Exact tensor-data bytes of the file (no header/metadata) when tensor name -> type is `types`."""
        missing = [t.name for t in self.tensors if t.name not in types]
        if missing:
            raise ValueError(f"no type for {len(missing)} tensor(s), e.g. {missing[:3]}")
        return sum(t.nbytes(types[t.name]) for t in self.tensors)

    def bpw(self, types: dict[str, str]) -> float:
        """Bits per weight as llama.cpp reports it: all tensor data bits / all elements."""
        return 8.0 * self.file_bytes(types) / self.n_elements


def layout(adapter) -> GGUFLayout:
    """The GGUF tensors of the adapter's model as the export writes them (convert.GGUFModel: llama.cpp's
    converter's names, shapes and order), each with its role in the allocation."""
    from .convert import EXPERT_ROLES, SHARED_ROLES, GGUFModel

    gm = GGUFModel(adapter.model)
    expert_kind = {v: k for k, v in EXPERT_ROLES.items()}
    shared_kind = {v: k for k, v in SHARED_ROLES.items()}
    tensors = []
    for t in gm.tensors:
        # llama-quantize quantizes tensors of >= 2 dimensions larger than 1 (ggml_n_dims), never routers/norms
        quantized = t.quantizable and t.numel // t.cols > 1
        module = t.hf_name.removesuffix(".weight")
        if not quantized:
            tensors.append(GGUFTensor(t.name, t.shape, "fixed", t.layer, source=t.hf_name, fixed_type=t.float_type))
        elif t.role in expert_kind:
            k = expert_kind[t.role]
            tensors.append(GGUFTensor(t.name, t.shape, "experts", t.layer, k,
                                      tuple(Unit(t.layer, e, k) for e in range(t.shape[0])), t.hf_name))
        elif t.role in shared_kind:
            k = shared_kind[t.role]
            tensors.append(GGUFTensor(t.name, t.shape, "shared", t.layer, k, (Unit(t.layer, SHARED, k),), t.hf_name))
        elif t.role in ("token_embd", "output"):
            tensors.append(GGUFTensor(t.name, t.shape, t.role, source=t.hf_name))
        elif t.role.startswith("attn_"):
            tensors.append(GGUFTensor(t.name, t.shape, "attention", t.layer, source=module))
        else:  # a dense FFN (e.g. a first dense layer) or another 2-D weight llama.cpp quantizes
            tensors.append(GGUFTensor(t.name, t.shape, "dense", t.layer, source=module))
    tied = "output.weight" not in gm.by_name
    return GGUFLayout(gm.arch_name, tensors, tied)
