"""Input transforms of the expert linears: per (layer, expert, kind) callables applied to the input
of that block inside the experts forward -- an online Hadamard rotation, activation fake quantization.

transformers 5 runs a layer's routed experts as one fused module (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`); no hook between its matmuls exists. So installing a transform on a fused
experts module replaces that *instance's* `forward` with `experts_forward` below: transformers' eager
loop over the routed experts, with each block's input passed through its chain first (gate and up get
separate matmuls only when their transformed inputs differ). Removing the last transform restores the
class forward (and with it transformers' `experts_implementation` dispatch). Shared experts are plain
`nn.Linear`s: one forward pre-hook per linear applies its chain. `PackedExperts` applies the same chains
itself (it owns its forward).

A chain holds at most one callable per *stage*, applied in `STAGES` order whatever order they were
installed in: a rotation first, then activation quantization (what an integer kernel would see). A
callable installed for `expert=None` applies to every expert of the module that has none of its own
for that stage (e.g. one online Hadamard before every down projection).

API (all in this module, all hooks of the project stay in models/):
    set_expert_transform(experts_module, expert | None, kind, stage, fn)
    set_linear_transform(linear, stage, fn)
    remove_transform(module, expert, kind, stage) / clear_transforms(module, stage=None)
    experts_chain(experts_module) -> ExpertInputTransforms | None
    MoEAdapter.set_input_transform(unit, stage, fn) / clear_input_transforms(stage) wrap them per unit.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGES = ("rotate", "act_quant")  # composition order
ATTR = "moebits_input_transforms"
_HOOK_ATTR = "_moebits_transform_hook"

Transform = Callable[[torch.Tensor], torch.Tensor]
ROW_WISE = "row_wise"  # a transform with this attribute True maps each row (token) independently of the others


def is_row_wise(fn: Transform) -> bool:
    """Does `fn` act on each row alone (so it may run on any subset or superset of an expert's rows)?
    The packed kernel path applies such transforms to all routed rows at once."""
    return bool(getattr(fn, ROW_WISE, False))


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown input-transform stage {stage!r}; choose one of {STAGES}")


class ExpertInputTransforms:
    """(expert | None, kind) -> {stage: fn} for one fused experts module (or a linear: key (None, None))."""

    def __init__(self):
        self.chains: dict[tuple, dict[str, Transform]] = {}

    def set(self, expert, kind, stage: str, fn: Transform) -> None:
        _check_stage(stage)
        self.chains.setdefault((expert, kind), {})[stage] = fn

    def remove(self, expert, kind, stage: str) -> None:
        chain = self.chains.get((expert, kind), {})
        chain.pop(stage, None)
        if not chain:
            self.chains.pop((expert, kind), None)

    def clear(self, stage: str | None = None) -> None:
        if stage is None:
            self.chains.clear()
            return
        _check_stage(stage)
        for chain in self.chains.values():
            chain.pop(stage, None)
        self.chains = {k: v for k, v in self.chains.items() if v}

    def fns(self, expert, kind, override: dict[str, Transform] | None = None) -> list[Transform]:
        """The chain of `(expert, kind)` in stage order; `override` replaces (or adds) stages for this call."""
        own, every = self.chains.get((expert, kind), {}), self.chains.get((None, kind), {})
        out = []
        for stage in STAGES:
            fn = (override or {}).get(stage) or own.get(stage) or every.get(stage)
            if fn is not None:
                out.append(fn)
        return out

    def apply(self, expert, kind, x: torch.Tensor, override: dict[str, Transform] | None = None) -> torch.Tensor:
        for fn in self.fns(expert, kind, override):
            x = fn(x)
        return x

    def __bool__(self) -> bool:
        return bool(self.chains)


def apply_chain(chain: ExpertInputTransforms | None, expert, kind, x: torch.Tensor,
                override: dict[str, Transform] | None = None) -> torch.Tensor:
    """`x` through the installed chain of (expert, kind), with per-call `override` stages."""
    if chain is None:
        chain = ExpertInputTransforms()
    return chain.apply(expert, kind, x, override)


def experts_chain(module: nn.Module) -> ExpertInputTransforms | None:
    return module.__dict__.get(ATTR)


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor, act_fn, chain: ExpertInputTransforms | None,
                    expert_ids: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' eager fused-experts loop with input transforms. `gate_up [n, 2I, H]`, `down [n, H, I]`;
    `top_k_index` numbers experts 0..n-1 (n = padding); `expert_ids [n]` maps them to the model's expert
    indices (the transforms' keys) when the weights are a subset (PackedExperts)."""
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=n + 1).permute(2, 1, 0)  # [n+1, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for idx in hit:
        e = int(idx[0])
        if e == n:
            continue
        key = e if expert_ids is None else int(expert_ids[e])
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]
        xg, xu = apply_chain(chain, key, "gate", x), apply_chain(chain, key, "up", x)
        if xg is xu:  # one fused matmul, exactly as transformers computes it
            gate, up = F.linear(xg, gate_up[e]).chunk(2, dim=-1)
        else:
            gate, up = F.linear(xg, gate_up[e, :inter]), F.linear(xu, gate_up[e, inter:])
        h = apply_chain(chain, key, "down", act_fn(gate) * up)
        y = F.linear(h, down[e]) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _transformed_forward(self, hidden_states, top_k_index, top_k_weights):
    return experts_forward(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                           self.act_fn, experts_chain(self))


def _owns_forward(module: nn.Module) -> bool:
    """Modules (PackedExperts) whose own forward applies the chain: no instance forward swap."""
    return getattr(type(module), "applies_input_transforms", False)


def set_expert_transform(module: nn.Module, expert: int | None, kind: str, stage: str, fn: Transform) -> None:
    """Install `fn` at `stage` on block `kind` of `expert` (None: every expert) of a fused experts module."""
    if kind not in ("gate", "up", "down"):
        raise ValueError(f"kind must be gate, up or down, got {kind!r}")
    chain = experts_chain(module)
    if chain is None:
        chain = ExpertInputTransforms()
        module.__dict__[ATTR] = chain
        if not _owns_forward(module):
            module.forward = types.MethodType(_transformed_forward, module)
    chain.set(expert, kind, stage, fn)


def set_linear_transform(linear: nn.Module, stage: str, fn: Transform) -> None:
    """Install `fn` at `stage` on the input of one linear (a shared expert's projection): a pre-hook."""
    chain = experts_chain(linear)
    if chain is None:
        chain = ExpertInputTransforms()
        linear.__dict__[ATTR] = chain
        linear.__dict__[_HOOK_ATTR] = linear.register_forward_pre_hook(
            lambda mod, args: (experts_chain(mod).apply(None, None, args[0]),) + tuple(args[1:]))
    chain.set(None, None, stage, fn)


def remove_transform(module: nn.Module, expert, kind, stage: str) -> None:
    """Remove one installed transform (expert, kind, stage) -- for a linear: (None, None, stage)."""
    chain = experts_chain(module)
    if chain is not None:
        chain.remove(expert, kind, stage)
        if not chain:
            clear_transforms(module)


def clear_transforms(module: nn.Module, stage: str | None = None) -> None:
    """Remove `stage`'s transforms (all when None); with none left, restore the module's own forward."""
    chain = experts_chain(module)
    if chain is None:
        return
    chain.clear(stage)
    if chain:
        return
    del module.__dict__[ATTR]
    hook = module.__dict__.pop(_HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
    if "forward" in module.__dict__:
        del module.__dict__["forward"]
