"""The index of a packed checkpoint: where each unit's codes live, and the shapes of every stored set.

Per packed module (a fused experts module of one MoE layer, or one shared-expert `nn.Linear`) and
per fused tensor (`gate_up`, `down`; `weight` for a linear), the rows of all units stored at one
(bits, group_size) are concatenated into one rectangular *set*, named `w{bits}g{group_size}`
(`w16` for fp16 rows; group_size 0 = per-channel), and `w{bits}g{group_size}z{bits}` for a set whose
zero points are integer codes stored packed at the code width (format 2; `zero_bits` in its SetSpec):
an HQQ unit (real-valued fp16 zeros) and a GPTQ unit at the same bits and group size therefore never
share a set. Units are appended in (expert, kind) order, so a
unit's rows are contiguous: `(set, row, rows)` locates it. BT-MoE compensators of one rank are
stacked per tensor as a set `r{rank}` holding `U [n, out, r]` and `V [n, r, in]`; a unit refers
to its `slot` there.

Stored tensor names (prefix = the module's name in the model, e.g. `model.layers.1.mlp.experts`):

    {prefix}.{tensor}.w3g128.codes   uint8 [rows, ceil(in*3/8)]   bit-packed, see quant/pack.py
    {prefix}.{tensor}.w3g128.scale   fp16  [rows, ceil(in/128)]
    {prefix}.{tensor}.w3g128.zero    fp16  [rows, ceil(in/128)]       real-valued zeros (zero_bits 16)
    {prefix}.{tensor}.w3g128z3.zero  uint8 [ceil(rows*G*3/8)]         integer zeros, one bitstream per set:
                                                                    see quant/pack.py (pack_zero_stream)
    {prefix}.{tensor}.w16.weight     fp16  [rows, in]
    {prefix}.{tensor}.r16.U / .V     fp16  [n, out, 16] / [n, 16, in]

and for a shared expert's linear the same without the `.{tensor}` level.

Format versions: 1 stored every zero in fp16 (no `zero_bits`; its sets read as zero_bits 16); 2 adds the
packed-zero sets. This moebits reads both (READABLE_VERSIONS) and writes 2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..units import FP_BITS

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
EXPERT_TENSORS = {"gate_up": ("gate", "up"), "down": ("down",)}  # fused tensor -> kinds, in row order
LINEAR_TENSOR = "weight"


def set_name(bits: int, group_size: int, zero_bits: int = FP_BITS) -> str:
    if bits == FP_BITS:
        return "w16"
    return f"w{bits}g{max(group_size, 0)}" + ("" if zero_bits == FP_BITS else f"z{zero_bits}")


def zero_stream_bytes(rows: int, groups: int, zero_bits: int) -> int:
    """Bytes of a set's packed zero bitstream: `rows * groups` values at `zero_bits`, rounded up once."""
    return -(-rows * groups * zero_bits // 8)


def lowrank_name(rank: int) -> str:
    return f"r{rank}"


@dataclass
class SetSpec:
    bits: int
    group_size: int  # 0: per-channel
    rows: int
    zero_bits: int = FP_BITS  # 16: fp16 zeros [rows, G] (format 1 always); = bits: one packed bitstream

    @property
    def packed_zeros(self) -> bool:
        return self.bits != FP_BITS and self.zero_bits != FP_BITS


@dataclass
class TensorSpec:
    """One fused tensor of a packed module: `in_features` columns, its sets and low-rank stacks."""
    in_features: int
    sets: dict[str, SetSpec] = field(default_factory=dict)
    lowrank: dict[str, dict] = field(default_factory=dict)  # name -> {"rank", "out", "count"}


@dataclass
class ModuleSpec:
    type: str  # "experts" | "linear"
    tensors: dict[str, TensorSpec]
    num_experts: int = 0  # experts: E
    intermediate: int = 0  # experts: I (gate and up have I rows each, down has H)
    hidden: int = 0  # experts: H
    out_features: int = 0  # linear
    bias: bool = False  # linear: a bias stored as `{prefix}.bias`


@dataclass
class UnitEntry:
    module: str
    tensor: str
    set: str
    row: int
    rows: int
    quantizer: str
    lowrank: str | None = None
    slot: int = -1


@dataclass
class PackedIndex:
    modules: dict[str, ModuleSpec]
    units: dict[str, UnitEntry]  # unit name (L1.E3.gate) -> where it is
    checksums: dict[str, int] = field(default_factory=dict)  # stored unit tensor -> crc32 of its bytes
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {"format_version": self.format_version,
                "modules": {k: asdict(v) for k, v in self.modules.items()},
                "units": {k: asdict(v) for k, v in self.units.items()},
                "checksums": self.checksums}

    @classmethod
    def from_dict(cls, d: dict) -> "PackedIndex":
        modules = {}
        for name, m in d["modules"].items():
            tensors = {t: TensorSpec(s["in_features"], {k: SetSpec(**v) for k, v in s["sets"].items()},
                                     dict(s.get("lowrank", {}))) for t, s in m["tensors"].items()}
            modules[name] = ModuleSpec(**{**m, "tensors": tensors})
        units = {k: UnitEntry(**v) for k, v in d["units"].items()}
        return cls(modules, units, {k: int(v) for k, v in d.get("checksums", {}).items()},
                   int(d["format_version"]))

    def tensor_names(self) -> list[str]:
        """Every stored tensor that belongs to a unit (codes, scales, zeros, fp16 rows, factors)."""
        out = []
        for prefix, m in self.modules.items():
            for t, spec in m.tensors.items():
                base = prefix if m.type == "linear" else f"{prefix}.{t}"
                for s in spec.sets:
                    out += [f"{base}.{s}.weight"] if s == "w16" else [f"{base}.{s}.{x}" for x in ("codes", "scale", "zero")]
                for r in spec.lowrank:
                    out += [f"{base}.{r}.U", f"{base}.{r}.V"]
        return out

    def bits_histogram(self) -> dict[str, int]:
        h: dict[str, int] = {}
        for e in self.units.values():
            spec = self.modules[e.module].tensors[e.tensor].sets[e.set]
            label = "fp16" if spec.bits == FP_BITS else f"w{spec.bits}g{spec.group_size}-{e.quantizer}"
            if e.lowrank:
                label += f"-{e.lowrank}"
            h[label] = h.get(label, 0) + 1
        return dict(sorted(h.items()))
