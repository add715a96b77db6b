"""MoEAdapter: the one place that knows where an HF MoE keeps its experts.

transformers 5 fuses the routed experts of a layer into two 3-D parameters,
`experts.gate_up_proj [E, 2I, H]` (gate = rows :I, up = rows I:) and `experts.down_proj [E, H, I]`,
and calls `experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. A unit is
therefore a *slice* of a fused tensor, viewed here as an `[out, in]` matrix like `nn.Linear.weight`.
Shared experts stay ordinary MLPs with `gate_proj/up_proj/down_proj`.

All PyTorch hooks of the project live here (`capture_routing`, `capture_layer_inputs`,
`capture_linear_inputs`) and in `transforms.py` (input transforms of the expert blocks: online
rotation, activation quantization; `set_input_transform` installs one per unit); routers are never written. Attention projections (`attention_linears`) are
ordinary `nn.Linear`s in all six families, DeepSeek's MLA low-rank projections included.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..units import KINDS, SHARED, Unit
from .transforms import (Transform, apply_chain, clear_transforms, experts_chain, remove_transform, set_expert_transform,
                         set_linear_transform)


@dataclass(frozen=True)
class ArchSpec:
    shared_attr: str | None = None  # attribute of the MoE block holding the shared-expert MLP
    shared_gate_attr: str | None = None  # sigmoid gate scaling the shared expert's output (Qwen2-MoE)


ARCHS: dict[str, ArchSpec] = {
    "qwen2_moe": ArchSpec("shared_expert", "shared_expert_gate"),
    "qwen3_moe": ArchSpec(),
    "mixtral": ArchSpec(),
    "olmoe": ArchSpec(),
    "deepseek_v2": ArchSpec("shared_experts"),
    "deepseek_v3": ArchSpec("shared_experts"),
}


class UnsupportedModelError(ValueError):
    pass


@dataclass
class RoutedBatch:
    """What one MoE layer's experts module received in one forward call."""
    layer: int
    hidden: torch.Tensor  # [T, H] inputs of the experts (after the post-attention norm)
    top_k_index: torch.Tensor  # [T, k] chosen experts per token
    top_k_weights: torch.Tensor  # [T, k] routing weights of the chosen experts
    # [T * k, I] the down projection's input of each routed (token, slot), as the experts module computed it
    # (`capture_routing(down_inputs=True)` where it can be read off the forward, else None)
    down_input: torch.Tensor | None = None


class MoEAdapter:
    def __init__(self, model: nn.Module):
        cfg = model.config
        self.model = model
        self.model_type = getattr(cfg, "model_type", type(model).__name__)
        if self.model_type not in ARCHS:
            raise UnsupportedModelError(
                f"model type {self.model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}")
        self.spec = ARCHS[self.model_type]
        try:
            self.decoder_layers = list(model.model.layers)
        except AttributeError:
            raise UnsupportedModelError(f"{type(model).__name__} has no `model.layers`; is it a causal LM?") from None
        self.moe_layers = [i for i, layer in enumerate(self.decoder_layers) if hasattr(layer.mlp, "experts")]
        if not self.moe_layers:
            raise UnsupportedModelError(f"{self.model_type} model has no MoE layers (no `mlp.experts` module)")
        first = self.experts(self.moe_layers[0])
        if not (hasattr(first, "gate_up_proj") and hasattr(first, "down_proj")) or first.gate_up_proj.dim() != 3:
            raise UnsupportedModelError(
                f"{type(first).__name__} does not hold fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` "
                "parameters; moebits needs transformers>=5 expert layout")
        self.num_experts = first.gate_up_proj.shape[0]
        self.intermediate = first.gate_up_proj.shape[1] // 2
        self.hidden = first.gate_up_proj.shape[2]
        if tuple(first.down_proj.shape) != (self.num_experts, self.hidden, self.intermediate):
            raise UnsupportedModelError(f"unexpected down_proj shape {tuple(first.down_proj.shape)} (transposed layout?)")
        self.top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0)
        self._units: list[Unit] | None = None

    # ---- structure -------------------------------------------------------------------------
    def experts(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].mlp.experts

    def moe_block(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].mlp

    def shared_mlp(self, layer: int) -> nn.Module | None:
        attr = self.spec.shared_attr
        return getattr(self.moe_block(layer), attr, None) if attr else None

    def shared_gate(self, layer: int) -> nn.Module | None:
        attr = self.spec.shared_gate_attr
        return getattr(self.moe_block(layer), attr, None) if attr else None

    @property
    def num_shared_experts(self) -> int:
        return 1 if self.shared_mlp(self.moe_layers[0]) is not None else 0

    def units(self) -> list[Unit]:
        if self._units is None:
            out = []
            for layer in self.moe_layers:
                for e in range(self.num_experts):
                    out.extend(Unit(layer, e, k) for k in KINDS)
                if self.shared_mlp(layer) is not None:
                    out.extend(Unit(layer, SHARED, k) for k in KINDS)
            self._units = out
        return self._units

    def shape(self, unit: Unit) -> tuple[int, int]:
        """(out_features, in_features) of the unit's weight."""
        return tuple(self.weight(unit).shape)

    def shapes(self) -> dict[Unit, tuple[int, int]]:
        return {u: self.shape(u) for u in self.units()}

    # ---- weights ---------------------------------------------------------------------------
    def weight(self, unit: Unit) -> torch.Tensor:
        """A view `[out, in]` of the unit's weight (writing into it writes the model)."""
        if unit.is_shared:
            mlp = self.shared_mlp(unit.layer)
            if mlp is None:
                raise KeyError(f"layer {unit.layer} has no shared expert")
            return getattr(mlp, f"{unit.kind}_proj").weight.data
        ex = self.experts(unit.layer)
        e, inter = unit.expert, self.intermediate
        if not 0 <= e < self.num_experts:
            raise KeyError(f"{unit.name}: expert index out of range 0..{self.num_experts - 1}")
        if unit.kind == "gate":
            return ex.gate_up_proj.data[e, :inter]
        if unit.kind == "up":
            return ex.gate_up_proj.data[e, inter:]
        return ex.down_proj.data[e]

    @torch.no_grad()
    def set_weight(self, unit: Unit, w: torch.Tensor) -> None:
        dst = self.weight(unit)
        if w.shape != dst.shape:
            raise ValueError(f"{unit.name}: weight shape {tuple(w.shape)} != {tuple(dst.shape)}")
        dst.copy_(w.to(dst.dtype))

    def routed_weights_batched(self, layer: int, kind: str) -> torch.Tensor:
        """All routed experts' weights of one kind in a layer, as a view `[E, out, in]`."""
        ex, inter = self.experts(layer), self.intermediate
        if kind == "gate":
            return ex.gate_up_proj.data[:, :inter]
        if kind == "up":
            return ex.gate_up_proj.data[:, inter:]
        return ex.down_proj.data

    def check_finite(self) -> None:
        """NaN/inf in a weight would poison every statistic downstream: refuse early, naming the tensor."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                bad = (~torch.isfinite(p)).sum().item()
                raise ValueError(f"weight {name} has {bad} NaN/inf value(s); refusing to quantize a broken checkpoint")

    def attention_linears(self) -> dict[str, nn.Linear]:
        """`model.layers.{i}.self_attn.{name}` -> every `nn.Linear` of every decoder layer's attention:
        q/k/v/o, and in DeepSeek's MLA q_a/q_b (or q), kv_a_proj_with_mqa, kv_b, o. Norms are not Linear."""
        out = {}
        for i, layer in enumerate(self.decoder_layers):
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                raise UnsupportedModelError(f"decoder layer {i} of {self.model_type} has no `self_attn` module")
            for name, mod in attn.named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"model.layers.{i}.self_attn.{name}"] = mod
        if not out:
            raise UnsupportedModelError(f"{self.model_type}: no nn.Linear attention projections found")
        return out

    # ---- input transforms (transforms.py) ---------------------------------------------------
    def _transform_host(self, unit: Unit) -> nn.Module:
        if unit.is_shared:
            mlp = self.shared_mlp(unit.layer)
            if mlp is None:
                raise KeyError(f"layer {unit.layer} has no shared expert")
            return getattr(mlp, f"{unit.kind}_proj")
        return self.experts(unit.layer)

    def set_input_transform(self, unit: Unit, stage: str, fn: Transform) -> None:
        """Apply `fn` to the input of `unit`'s block at `stage` ("rotate" before "act_quant") in every
        forward of the model, and in `expert_forward` / `expert_intermediate`."""
        host = self._transform_host(unit)
        if unit.is_shared:
            set_linear_transform(host, stage, fn)
        else:
            set_expert_transform(host, unit.expert, unit.kind, stage, fn)

    @contextlib.contextmanager
    def temporary_input_transform(self, unit: Unit, stage: str, fn: Transform | None):
        """`set_input_transform` for the duration of a `with` block (None: nothing installed)."""
        if fn is None:
            yield
            return
        self.set_input_transform(unit, stage, fn)
        try:
            yield
        finally:
            host = self._transform_host(unit)
            if unit.is_shared:
                remove_transform(host, None, None, stage)
            else:
                remove_transform(host, unit.expert, unit.kind, stage)

    def set_layer_input_transform(self, layer: int, kind: str, stage: str, fn: Transform) -> None:
        """`fn` on block `kind` of every routed expert of `layer` (and of its shared expert, if any)."""
        set_expert_transform(self.experts(layer), None, kind, stage, fn)
        if self.shared_mlp(layer) is not None:
            self.set_input_transform(Unit(layer, SHARED, kind), stage, fn)

    def clear_input_transforms(self, stage: str | None = None) -> None:
        """Remove every installed transform of `stage` (all stages when None)."""
        for layer in self.moe_layers:
            clear_transforms(self.experts(layer), stage)
            mlp = self.shared_mlp(layer)
            if mlp is not None:
                for k in KINDS:
                    clear_transforms(getattr(mlp, f"{k}_proj"), stage)

    def block_input(self, layer: int, expert: int | str, kind: str, x: torch.Tensor,
                    act_quant: dict[str, Transform] | None = None) -> torch.Tensor:
        """What block `kind` of the expert multiplies: `x` through its installed transforms, with
        `act_quant[kind]` (if given) in place of the installed activation quantization."""
        unit = Unit(layer, expert, kind)
        override = {"act_quant": act_quant[kind]} if act_quant and kind in act_quant else None
        host = self._transform_host(unit)
        if unit.is_shared:
            return apply_chain(experts_chain(host), None, None, x, override)
        return apply_chain(experts_chain(host), expert, kind, x, override)

    # ---- forwards --------------------------------------------------------------------------
    def act_fn(self, layer: int, expert: int | str):
        return (self.shared_mlp(layer) if expert == SHARED else self.experts(layer)).act_fn

    def expert_intermediate(self, layer: int, expert: int | str, x: torch.Tensor,
                            gate_w: torch.Tensor | None = None, up_w: torch.Tensor | None = None,
                            act_quant: dict[str, Transform] | None = None) -> torch.Tensor:
        """T_down(act(T_gate(x) @ gate^T) * (T_up(x) @ up^T)): what the down projection multiplies, `[T, I]`,
        exactly as the model's forward computes it (T: the installed input transforms, `block_input`), so
        GPTQ Hessians and statistics of the down input see e.g. an online rotation."""
        gate_w = self.weight(Unit(layer, expert, "gate")) if gate_w is None else gate_w
        up_w = self.weight(Unit(layer, expert, "up")) if up_w is None else up_w
        xg = self.block_input(layer, expert, "gate", x, act_quant)
        xu = self.block_input(layer, expert, "up", x, act_quant)
        h = self.act_fn(layer, expert)(xg @ gate_w.T.to(x.dtype)) * (xu @ up_w.T.to(x.dtype))
        return self.block_input(layer, expert, "down", h, act_quant)

    def expert_forward(self, layer: int, expert: int | str, x: torch.Tensor,
                       weights: dict[str, torch.Tensor] | None = None,
                       act_quant: dict[str, Transform] | None = None) -> torch.Tensor:
        """One expert's output `[T, H]` on inputs `x [T, H]`, without routing weight, with the installed
        input transforms. `weights` overrides some of its kinds (e.g. {"down": quantized}) and
        `act_quant` their activation quantization (e.g. {"down": 4-bit}) without touching the model."""
        weights = weights or {}
        h = self.expert_intermediate(layer, expert, x, weights.get("gate"), weights.get("up"), act_quant)
        down = weights.get("down", self.weight(Unit(layer, expert, "down")))
        return h @ down.T.to(h.dtype)

    def shared_scale(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Per-token factor on the shared expert's output `[T]` (Qwen2-MoE's sigmoid gate, else 1)."""
        g = self.shared_gate(layer)
        if g is None:
            return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return torch.sigmoid(g(x)).squeeze(-1)

    # ---- hooks -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_routing(self, callback, layers: list[int] | None = None, down_inputs: bool = False):
        """Call `callback(RoutedBatch)` every time a MoE layer's experts run. Read-only.
        `down_inputs`: call it after the experts ran instead, with `RoutedBatch.down_input` read off the
        forward where the module computes exactly `expert_intermediate`'s numbers, else None: transformers'
        grouped_mm experts in float32 without input transforms (`_down_input_readable`), on the CPU with one
        torch thread. Why one: a row's matmul result is then the same whatever the other rows of the call
        (checked on every architecture by tests/test_profile_speed.py), while threaded GEMMs split the rows
        by their count and an expert's rows computed alone can differ in the last bit from the same rows
        inside the forward's grouped call (measured: a few experts in 50 on two threads)."""
        handles, wrapped = [], []
        for layer in layers if layers is not None else self.moe_layers:
            ex = self.experts(layer)

            def pre_hook(module, args, kwargs, layer=layer):
                names = ("hidden_states", "top_k_index", "top_k_weights")
                vals = list(args) + [kwargs[n] for n in names[len(args):]]
                b = RoutedBatch(layer, vals[0].detach(), vals[1].detach(), vals[2].detach())
                if down_inputs:
                    module.__dict__["_moebits_routed"], module.__dict__["_moebits_gated"] = b, []
                else:
                    callback(b)
            handles.append(ex.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if not down_inputs:
                continue
            if _down_input_readable(ex):
                def apply_gate(gate_up_out, ex=ex, inner=ex._apply_gate):
                    out = inner(gate_up_out)
                    ex.__dict__["_moebits_gated"].append(out.detach())
                    return out
                ex.__dict__["_apply_gate"] = apply_gate  # an instance attribute: the class's stays untouched
                wrapped.append(ex)

            def post_hook(module, args, output):
                b, gated = module.__dict__.pop("_moebits_routed"), module.__dict__.pop("_moebits_gated")
                if (len(gated) == 1 and _down_input_readable(module) and b.hidden.dtype == torch.float32
                        and b.hidden.device.type == "cpu" and torch.get_num_threads() == 1):
                    b.down_input = _flat_order(gated[0], b.top_k_index)
                callback(b)
            handles.append(ex.register_forward_hook(post_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for ex in wrapped:
                ex.__dict__.pop("_apply_gate", None)
            for layer in layers if layers is not None else self.moe_layers:  # a forward stopped half-way
                self.experts(layer).__dict__.pop("_moebits_routed", None)
                self.experts(layer).__dict__.pop("_moebits_gated", None)

    @contextlib.contextmanager
    def capture_layer_inputs(self, callback, layers: list[int]):
        """Call `callback(layer, args, kwargs)` with what each decoder layer is called with, and
        stop the forward after the last requested layer (nothing later is needed)."""
        handles, last = [], max(layers)

        class _Stop(Exception):
            pass

        for layer in layers:
            def pre_hook(module, args, kwargs, layer=layer):
                callback(layer, args, kwargs)
                if layer == last:
                    raise _Stop
            handles.append(self.decoder_layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            yield _Stop
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def capture_linear_inputs(self, modules: dict[str, nn.Module], callback):
        """Call `callback(name, x [..., in])` with the input of each named module on every forward. Read-only."""
        handles = []
        for name, mod in modules.items():
            def pre_hook(module, args, name=name):
                callback(name, args[0].detach())
            handles.append(mod.register_forward_pre_hook(pre_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def summary(self) -> dict:
        cfg = self.model.config
        units = self.units()
        unit_params = sum(self.shape(u)[0] * self.shape(u)[1] for u in units)
        return {
            "model_type": self.model_type,
            "num_layers": len(self.decoder_layers),
            "num_moe_layers": len(self.moe_layers),
            "num_routed_experts": self.num_experts,
            "num_shared_experts": self.num_shared_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden,
            "moe_intermediate_size": self.intermediate,
            "num_units": len(units),
            "params": sum(p.numel() for p in self.model.parameters()),
            "unit_params": unit_params,
            "vocab_size": int(getattr(cfg, "vocab_size", 0)),
        }


def _down_input_readable(ex: nn.Module) -> bool:
    """Whether the experts module's gated output is `expert_intermediate`'s down input, row for row: transformers'
    grouped_mm experts (tokens sorted by expert, `_apply_gate` = act(gate) * up on the concatenated gate_up
    projection) in float32, without bias, expert parallelism or installed input transforms (those swap the
    forward for `transforms.experts_forward`). Equality is also checked by tests (tests/test_profile_speed.py)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # an older transformers: no such forward
        return False
    cfg = getattr(ex, "config", None)
    return (getattr(cfg, "_experts_implementation", None) == "grouped_mm" and "forward" not in ex.__dict__
            and not experts_chain(ex) and getattr(ex, "has_gate", False) and not getattr(ex, "has_bias", True)
            and not getattr(ex, "is_transposed", True) and getattr(ex, "is_concatenated", False)
            and not getattr(ex, "_is_expert_parallel", True) and type(ex)._apply_gate is _default_apply_gate
            and getattr(ex, "gate_up_proj", None) is not None and ex.gate_up_proj.dtype == torch.float32)


def _flat_order(gated: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor | None:
    """`gated [S, I]` (rows in the grouped forward's order: `torch.sort` of the flat expert ids, the same call it
    makes) back in flat (token, slot) order; None when the shapes do not match (nothing read)."""
    ids = top_k_index.reshape(-1)
    if gated.dim() != 2 or gated.shape[0] != ids.shape[0]:
        return None
    _, perm = torch.sort(ids)
    out = torch.empty_like(gated)
    out[perm] = gated
    return out
