"""Which path a `PackedExperts` (or `PackedLinear`) forward takes: the packed Triton kernel, or the dequantizing torch path.

The mode comes from the module's `kernel` attribute, else the `MOEBITS_KERNEL` environment variable:

    auto    (default) the kernel when the hidden states are on a CUDA device, triton is installed and
            every installed input transform acts row by row; else the torch path, with the reason
            logged once per reason
    triton  the kernel, or an error saying why it cannot run; on a CPU it runs under Triton's
            interpreter (`TRITON_INTERPRET=1` set before triton is imported: slow, for tests)
    torch   always the torch path (dequantize the routed experts, run transformers' experts code)

`set_kernel(model, mode)` sets the mode on every packed module of a model.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.nn as nn

from ..models.transforms import ExpertInputTransforms, is_row_wise

ENV = "MOEBITS_KERNEL"
MODES = ("auto", "triton", "torch")
logger = logging.getLogger("moebits.kernel")
_logged: set[str] = set()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r} (from {ENV} or set_kernel); choose one of {MODES}")
    return mode


def kernel_mode(module: nn.Module) -> str:
    return check_mode(getattr(module, "kernel", None) or os.environ.get(ENV, "auto"))


def set_kernel(model: nn.Module, mode: str | None) -> int:
    """Set the kernel mode (`None`: back to `MOEBITS_KERNEL`) on every packed module; returns how many."""
    from .modules import PackedExperts, PackedLinear

    if mode is not None:
        check_mode(mode)
    mods = [m for m in model.modules() if isinstance(m, (PackedExperts, PackedLinear))]
    for m in mods:
        m.kernel = mode
    return len(mods)


def use_kernel(module: nn.Module, x: torch.Tensor, chain: ExpertInputTransforms | None = None) -> bool:
    """Should `module`'s forward on `x` take the kernel path? Raises in mode "triton" when it cannot;
    logs the reason once in mode "auto"."""
    mode = kernel_mode(module)
    if mode == "torch":
        return False
    reason = why_not_kernel(x, chain, forced=mode == "triton")
    if reason is None:
        return True
    if mode == "triton":
        raise RuntimeError(f"{ENV}=triton, but the packed kernel cannot run: {reason}")
    log_fallback_once(reason, x.device)
    return False


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_not_kernel(x: torch.Tensor, chain: ExpertInputTransforms | None, forced: bool) -> str | None:
    """None when the kernel can run this forward, else the reason it cannot."""
    if not triton_installed():
        return "triton is not installed (pip install 'moebits[triton]')"
    if not x.is_cuda and not (forced and interpreter_on()):
        return (f"the hidden states are on {x.device.type}; the Triton kernel needs a CUDA device" +
                (" (or TRITON_INTERPRET=1 set before triton is imported)" if forced else ""))
    if torch.is_grad_enabled() and x.requires_grad:
        return "gradients are asked for through the experts, and the Triton kernel has no backward"
    if chain:
        for fns in chain.chains.values():
            for stage, fn in fns.items():
                if not is_row_wise(fn):
                    return (f"the {stage} input transform {fn!r} is not marked row-wise "
                            "(models/transforms.py ROW_WISE), so it cannot run on the kernel's expert-sorted rows")
    return None


def log_fallback_once(reason: str, device: torch.device) -> None:
    if reason in _logged:
        return
    _logged.add(reason)
    level = logging.INFO if device.type != "cuda" else logging.WARNING
    logger.log(level, "moebits: packed routed experts run on the dequantizing torch path: %s", reason)


def row_transform(chain: ExpertInputTransforms, num_experts: int):
    """The kernel path's `RowTransform` for an installed chain: each expert-sorted row through its
    expert's row-wise chain (rows of experts sharing one chain transformed together; identity rows
    returned as the same tensor)."""

    def apply(kind: str, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for e in range(num_experts):
            groups.setdefault(tuple(chain.fns(e, kind)), []).append(e)
        groups.pop((), None)
        if not groups:
            return x
        if len(groups) == 1 and len(next(iter(groups.values()))) == num_experts:
            fns = next(iter(groups))
            return _run(fns, x)  # every expert's rows (padding rows too: they are dropped later)
        out = x
        for fns, experts in groups.items():
            mask = torch.isin(expert, torch.tensor(experts, device=expert.device))[:, None]
            out = torch.where(mask, _run(fns, x), out)  # no host sync, unlike boolean indexing
        return out

    return apply


def _run(fns, x: torch.Tensor) -> torch.Tensor:
    for fn in fns:
        x = fn(x)
    return x
