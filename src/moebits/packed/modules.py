"""Modules that keep a packed checkpoint's codes packed in memory.

`PackedExperts` replaces a fused experts module (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`):
on each call it dequantizes only the experts the batch routes to into small dense `[n, 2I, H]` /
`[n, H, I]` tensors and runs the *original* experts code on them (the same transformers
implementation, activation and gating), with the routing indices renumbered to those n experts.
So its output is the in-memory quantized model's, not a re-implementation of it.

On a CUDA device with triton installed it instead runs the routed experts with the packed Triton
kernel (`kernels/`: gate_up, activation, down, routing weights, on the codes as stored; fp16 rows,
compensators and row-wise input transforms included); `kernel_path.py` says when, and how to force
either path.

`PackedLinear` replaces a shared expert's `nn.Linear` and dequantizes its weight per call.

Input transforms (models/transforms.py: online rotation, activation quantization) installed on a
`PackedExperts` are applied by its own forward, keyed by the model's expert index; a `PackedLinear`
takes them as any linear does, through a forward pre-hook.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.transforms import experts_chain, experts_forward
from . import kernel_path
from ..quant.pack import packed_bytes, unpack_codes, unpack_zero_stream
from ..quant.qweight import dequantize_codes
from ..units import FP_BITS
from .layout import EXPERT_TENSORS, ModuleSpec, TensorSpec, UnitEntry, zero_stream_bytes


class PackedSet(nn.Module):
    """The rows of one tensor stored at one (bits, group_size): codes/scale/zero, or fp16 `weight`.
    `zero` is fp16 `[rows, G]`, or with `zero_bits` < 16 the set's packed bitstream of integer zeros."""

    def __init__(self, bits: int, group_size: int, rows: int, in_features: int, device=None,
                 zero_bits: int = FP_BITS):
        super().__init__()
        self.bits, self.group_size, self.in_features, self.zero_bits = bits, group_size, in_features, zero_bits
        self.rows = rows
        if bits == FP_BITS:
            self.register_buffer("weight", torch.empty(rows, in_features, dtype=torch.float16, device=device))
        else:
            groups = 1 if group_size <= 0 else -(-in_features // group_size)
            self.groups = groups
            self.register_buffer("codes", torch.empty(rows, packed_bytes(in_features, bits), dtype=torch.uint8,
                                                      device=device))
            self.register_buffer("scale", torch.empty(rows, groups, dtype=torch.float16, device=device))
            if zero_bits == FP_BITS:
                self.register_buffer("zero", torch.empty(rows, groups, dtype=torch.float16, device=device))
            else:
                self.register_buffer("zero", torch.empty(zero_stream_bytes(rows, groups, zero_bits), dtype=torch.uint8,
                                                         device=device))

    def zeros(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The zero points of `rows` (all when None), `[len(rows), G]` (fp16 as stored, or float32 unpacked)."""
        if self.zero_bits == FP_BITS:
            return self.zero if rows is None else self.zero[rows]
        return unpack_zero_stream(self.zero, self.zero_bits, self.groups, rows, total_rows=self.rows)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 `[len(rows), in]` (all rows when `rows` is None)."""
        if self.bits == FP_BITS:
            w = self.weight if rows is None else self.weight[rows]
            return w.float()
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        codes = unpack_codes(pick(self.codes), self.bits, self.in_features)
        return dequantize_codes(codes, pick(self.scale), self.zeros(rows), self.group_size)

    def extra_repr(self) -> str:
        z = "" if self.zero_bits == FP_BITS or self.bits == FP_BITS else f", zero_bits={self.zero_bits}"
        return f"bits={self.bits}, group_size={self.group_size}, in_features={self.in_features}{z}"


class LowRankSet(nn.Module):
    """Compensator factors of one rank for `count` units: `U [count, out, r]`, `V [count, r, in]`."""

    def __init__(self, count: int, out_features: int, rank: int, in_features: int, device=None):
        super().__init__()
        self.register_buffer("U", torch.empty(count, out_features, rank, dtype=torch.float16, device=device))
        self.register_buffer("V", torch.empty(count, rank, in_features, dtype=torch.float16, device=device))


class PackedTensor(nn.Module):
    """One fused tensor (its sets and low-rank stacks, as child modules named like the stored keys)."""

    def __init__(self, spec: TensorSpec, device=None):
        super().__init__()
        self.set_names = list(spec.sets)
        self.lowrank_names = list(spec.lowrank)
        for name, s in spec.sets.items():
            self.add_module(name, PackedSet(s.bits, s.group_size, s.rows, spec.in_features, device, s.zero_bits))
        for name, r in spec.lowrank.items():
            self.add_module(name, LowRankSet(r["count"], r["out"], r["rank"], spec.in_features, device))


class _UnitMap:
    """Per kind, per expert: which set holds its rows, where they start, and its compensator slot.
    Derived from the index, never stored, and deliberately not buffers (transformers re-creates
    non-persistent buffers after loading); copied to a device on first use there."""

    FIELDS = ("set", "row", "lowrank", "slot")

    def __init__(self, num_experts: int, kinds):
        self.values = {(k, f): [-1] * num_experts for k in kinds for f in self.FIELDS}
        self._on: dict[tuple, dict] = {}

    def set(self, kind: str, field: str, expert: int, value: int) -> None:
        self.values[(kind, field)][expert] = value
        self._on.clear()

    def get(self, kind: str, field: str, device) -> torch.Tensor:
        key = (str(device),)
        if key not in self._on:
            self._on[key] = {k: torch.tensor(v, dtype=torch.int64, device=device) for k, v in self.values.items()}
        return self._on[key][(kind, field)]


class PackedExperts(nn.Module):
    applies_input_transforms = True  # models/transforms.py: this forward applies the installed chains
    kernel: str | None = None  # "auto" | "triton" | "torch"; None: the MOEBITS_KERNEL environment variable
    last_path: str | None = None  # what the latest forward ran: "triton" or "torch"

    def __init__(self, spec: ModuleSpec, units: dict[str, UnitEntry], original: nn.Module, device=None):
        super().__init__()
        if getattr(original, "has_bias", False):
            raise NotImplementedError(f"{type(original).__name__} has expert biases; moebits packs bias-free experts")
        self.num_experts, self.intermediate, self.hidden = spec.num_experts, spec.intermediate, spec.hidden
        self.act_fn = original.act_fn
        for t in EXPERT_TENSORS:  # children named like the stored keys: {prefix}.gate_up.w3g128.codes
            self.add_module(t, PackedTensor(spec.tensors[t], device))
        self.map = _UnitMap(spec.num_experts, ("gate", "up", "down"))
        for name, e in units.items():
            expert, kind = name.split(".")[1:]
            idx = int(expert[1:])
            tensor = self.get_submodule(e.tensor)
            self.map.set(kind, "set", idx, tensor.set_names.index(e.set))
            self.map.set(kind, "row", idx, e.row)
            if e.lowrank:
                self.map.set(kind, "lowrank", idx, tensor.lowrank_names.index(e.lowrank))
                self.map.set(kind, "slot", idx, e.slot)
        missing = [f"E{i}.{k}" for k in ("gate", "up", "down") for i in range(spec.num_experts)
                   if self.map.values[(k, "set")][i] < 0]
        if missing:
            raise ValueError(f"the packed index has no entry for {len(missing)} unit(s) of this layer, e.g. {missing[:3]}")
        # The original module, emptied of its weights: its forward (transformers' experts code, with
        # the configured implementation) runs on the dense weights of the routed experts only.
        for p in ("gate_up_proj", "down_proj"):
            original._parameters.pop(p, None)
        object.__setattr__(self, "_dense", original)
        self._units = dict(units)
        self._spec = spec
        self._grouped: tuple | None = None  # (buffer identities, {"gate_up", "down"} kernel weights)

    def _rows_of(self, kind: str) -> int:
        return self.hidden if kind == "down" else self.intermediate

    @torch.no_grad()
    def dense_weights(self, experts: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized `gate_up [n, 2I, H]`, `down [n, H, I]` of `experts [n]`, exactly as the
        in-memory quantized model holds them."""
        out = {}
        for tname, kinds in EXPERT_TENSORS.items():
            tensor = self.get_submodule(tname)
            rows = self._rows_of(kinds[0])
            k = tensor.get_submodule(tensor.set_names[0]).in_features
            w = torch.empty(len(experts), rows * len(kinds), k, dtype=torch.float32, device=experts.device)
            for j, kind in enumerate(kinds):
                m = lambda f: self.map.get(kind, f, experts.device)[experts]  # noqa: E731
                sets, starts, lr, slots = m("set"), m("row"), m("lowrank"), m("slot")
                span = torch.arange(rows, device=experts.device)
                for s in torch.unique(sets).tolist():
                    sel = (sets == s).nonzero().squeeze(1)
                    idx = (starts[sel][:, None] + span).reshape(-1)
                    deq = tensor.get_submodule(tensor.set_names[s]).dequantize(idx)
                    w[sel, j * rows:(j + 1) * rows] = deq.reshape(len(sel), rows, k)
                for r in torch.unique(lr[lr >= 0]).tolist():
                    sel = (lr == r).nonzero().squeeze(1)
                    f = tensor.get_submodule(tensor.lowrank_names[r])
                    sl = slots[sel]
                    w[sel, j * rows:(j + 1) * rows] += f.U[sl].float() @ f.V[sl].float()
            out[tname] = w.to(dtype)
        return out["gate_up"], out["down"]

    def grouped_weights(self):
        """The kernel's `{"gate_up", "down"}` views of this module's buffers (no copy), rebuilt when the
        buffers were replaced (loading, `.to(device)`)."""
        from ..kernels.from_packed import module_grouped_weights

        key = tuple((b.data_ptr(), b.device) for b in self.buffers())
        if self._grouped is None or self._grouped[0] != key:
            self._grouped = (key, module_grouped_weights(self._spec, self._units, self.get_buffer))
        return self._grouped[1]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if kernel_path.use_kernel(self, hidden_states, experts_chain(self)):
            return self.kernel_forward(hidden_states, top_k_index, top_k_weights)
        return self.torch_forward(hidden_states, top_k_index, top_k_weights)

    def kernel_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts on the packed Triton kernel."""
        from ..kernels.moe import packed_experts_forward

        w = self.grouped_weights()
        chain = experts_chain(self)
        transform = kernel_path.row_transform(chain, self.num_experts) if chain else None
        self.last_path = "triton"
        return packed_experts_forward(hidden_states, top_k_index, top_k_weights, w["gate_up"], w["down"],
                                      self.act_fn, transform)

    def torch_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Dequantize the routed experts and run transformers' experts code on them."""
        self.last_path = "torch"
        hit = torch.unique(top_k_index)
        hit = hit[(hit >= 0) & (hit < self.num_experts)]
        renumber = torch.full((self.num_experts + 1,), len(hit), dtype=top_k_index.dtype, device=top_k_index.device)
        renumber[hit] = torch.arange(len(hit), dtype=top_k_index.dtype, device=top_k_index.device)
        gate_up, down = self.dense_weights(hit, hidden_states.dtype)
        chain = experts_chain(self)
        if chain:  # transformers' loop with each block's input transformed (expert ids as in the model)
            return experts_forward(hidden_states, renumber[top_k_index.clamp(0, self.num_experts)], top_k_weights,
                                   gate_up, down, self.act_fn, chain, expert_ids=hit)
        dense = self._dense
        dense.gate_up_proj, dense.down_proj, dense.num_experts = gate_up, down, len(hit)
        try:
            return dense(hidden_states, renumber[top_k_index.clamp(0, self.num_experts)], top_k_weights)
        finally:
            dense.gate_up_proj = dense.down_proj = None  # drop the transient dense weights

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, intermediate={self.intermediate}"


class PackedLinear(nn.Module):
    """A packed `nn.Linear` (a shared expert's gate/up/down): one set, optional compensator and bias.
    On the kernel path (kernel_path.py) it is a grouped matmul with one expert that gets every token."""

    kernel: str | None = None  # as PackedExperts.kernel
    last_path: str | None = None

    def __init__(self, spec: ModuleSpec, entry: UnitEntry, device=None, bias_dtype=None):
        super().__init__()
        t = spec.tensors["weight"]
        self.in_features, self.out_features = t.in_features, spec.out_features
        self.set_name, self.lowrank_name, self.slot = entry.set, entry.lowrank, entry.slot
        for name, s in t.sets.items():
            self.add_module(name, PackedSet(s.bits, s.group_size, s.rows, t.in_features, device, s.zero_bits))
        for name, r in t.lowrank.items():
            self.add_module(name, LowRankSet(r["count"], r["out"], r["rank"], t.in_features, device))
        self.bias = nn.Parameter(torch.empty(spec.out_features, device=device, dtype=bias_dtype)) if spec.bias else None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.get_submodule(self.set_name).dequantize()
        if self.lowrank_name:
            f = self.get_submodule(self.lowrank_name)
            w = w + f.U[self.slot].float() @ f.V[self.slot].float()
        return w.to(dtype)

    def grouped_weight(self):
        """The kernel's one-expert view of this linear's buffers (no copy), rebuilt when they were replaced."""
        from ..kernels.packed_weight import FP16_BITS, LowRank, PackedGroupedWeight, Segment, WeightSet

        key = tuple((b.data_ptr(), b.device) for b in self.buffers())
        if getattr(self, "_grouped", None) is None or self._grouped[0] != key:
            s = self.get_submodule(self.set_name)
            ws = WeightSet(FP16_BITS, 0, s.weight) if s.bits == FP_BITS else \
                WeightSet(s.bits, s.group_size, s.codes, s.scale, s.zero, s.zero_bits)
            lowrank = []
            if self.lowrank_name:
                f = self.get_submodule(self.lowrank_name)
                lowrank.append(LowRank(0, 0, f.U[self.slot], f.V[self.slot]))
            w = PackedGroupedWeight(1, self.out_features, self.in_features, {self.set_name: ws},
                                    [Segment(0, self.set_name, 0, self.out_features, 0)], lowrank)
            self._grouped = (key, w)
        return self._grouped[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_path.use_kernel(self, x):
            return self.kernel_forward(x)
        self.last_path = "torch"
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.moe import add_lowrank
        from ..kernels.triton_grouped import packed_grouped_matmul

        w = self.grouped_weight()
        flat = x.reshape(-1, self.in_features)
        n = flat.shape[0]
        start = torch.zeros(1, dtype=torch.int32, device=x.device)
        count = torch.full((1,), n, dtype=torch.int32, device=x.device)
        y = packed_grouped_matmul(flat, w, start, count, max(n, 1))
        add_lowrank(y, flat, w, [0], [n])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        self.last_path = "triton"
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, set={self.set_name}"
