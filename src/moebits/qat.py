"""Quantization-aware training (DMPQ, seed 004 §3.3.4): fine-tune the experts of a plan with fake
quantization in the forward and a straight-through estimator (STE) in the backward.

* The latent weights start from the *unquantized* model and are the only trainable tensors: the
  routed experts' fused `gate_up_proj` / `down_proj` and the shared experts' projections. Attention,
  routers, norms and embeddings stay frozen. Units the plan keeps at 16 bits are frozen as well, so QAT
  changes exactly the quantized experts.
* The forward sees each unit quantized by its plan bit-width on the RTN grid (group-wise asymmetric
  min-max, `quantize_weight` with `rtn`). Scales and zero points are **recomputed** from the latent
  weights at every step (not learnable), and carry no gradient: the STE is the identity on the whole
  tensor, `w_q = w + (Q(w) - w).detach()`. With min-max scales nothing is clipped, so passing the
  gradient everywhere is exact for the clamp and the STE approximation concerns the rounding only.
* The loss is next-token cross-entropy on calibration windows only (never the evaluation text).
* At the end the codes are re-derived from the fine-tuned latent weights by the same RTN and written
  into the model (and into `codes` for the packed format), so the saved model holds exactly the
  forward's quantized weights. A plan made for GPTQ or HQQ
  is therefore stored on the RTN grid after QAT (same bits, group size and metadata, so the same
  storage cost); `plan.meta["qat"]` says so.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .models.adapter import MoEAdapter
from .plan import Plan
from .quant import quantize_weight
from .units import FP_BITS, KINDS, SHARED, Choice, Unit


def fake_quant_ste(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """RTN fake quantization of `w [..., out, in]` whose gradient w.r.t. `w` is the identity (STE)."""
    if bits == FP_BITS:
        return w
    q = quantize_weight(w.detach(), Choice(int(bits), group_size, "rtn"))
    return w + (q - w.detach())


class _FakeQuantSlices(nn.Module):
    """Parametrization of a fused expert tensor `[E, rows, in]` (or a plain `[out, in]` weight): row
    ranges `(start, stop)` each with a bit-width per expert; 16 bits = frozen (no gradient)."""

    def __init__(self, regions: list[tuple[int, int, list[int]]], group_size: int, batched: bool,
                 fake_quant: bool = True):
        super().__init__()
        self.regions, self.group_size, self.batched, self.fake_quant = regions, group_size, batched, fake_quant

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x = w if self.batched else w.unsqueeze(0)
        pieces = []
        for start, stop, bits in self.regions:
            part = x[:, start:stop]
            out = part.detach().clone()  # 16-bit experts: the frozen latent weight
            for b in sorted(set(bits)):
                if b == FP_BITS:
                    continue
                sel = torch.tensor([i for i, bi in enumerate(bits) if bi == b], device=w.device)
                sub = part.index_select(0, sel)
                out = out.index_put((sel,), fake_quant_ste(sub, b, self.group_size) if self.fake_quant else sub)
            pieces.append(out)
        y = torch.cat(pieces, dim=1)
        return y if self.batched else y.squeeze(0)


@dataclass
class QATResult:
    steps: int
    lr: float
    batch_size: int
    losses: list[float] = field(default_factory=list)  # training loss (fake-quantized forward) per step
    seconds: float = 0.0
    trainable_params: int = 0
    grid: str = "rtn min-max per group, scales/zeros recomputed each step (not learnable), STE on rounding"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["first_loss"] = self.losses[0] if self.losses else None
        d["last_loss"] = self.losses[-1] if self.losses else None
        d.pop("losses")
        return d


def _check_plan(adapter: MoEAdapter, plan: Plan) -> int:
    plan.check_covers(adapter.units())
    sizes = {a.choice.group_size for a in plan.assignments.values() if not a.choice.is_fp}
    if len(sizes) > 1:
        raise ValueError(f"QAT needs one group size across the plan, got {sorted(sizes)}")
    if any(a.choice.rank for a in plan.assignments.values()):
        raise ValueError("QAT does not support low-rank compensators (BT-MoE choices)")
    return sizes.pop() if sizes else 128


def _register(adapter: MoEAdapter, plan: Plan, group_size: int, fake_quant: bool) -> list[tuple[nn.Module, str]]:
    """Put fake-quantization parametrizations on every expert tensor; returns (module, name) pairs."""
    done = []
    inter = adapter.intermediate
    for layer in adapter.moe_layers:
        ex = adapter.experts(layer)
        E = adapter.num_experts
        b = {k: [plan.choice(Unit(layer, e, k)).bits for e in range(E)] for k in KINDS}
        parametrize.register_parametrization(
            ex, "gate_up_proj",
            _FakeQuantSlices([(0, inter, b["gate"]), (inter, 2 * inter, b["up"])], group_size, True, fake_quant))
        parametrize.register_parametrization(
            ex, "down_proj", _FakeQuantSlices([(0, ex.down_proj.shape[1], b["down"])], group_size, True, fake_quant))
        done += [(ex, "gate_up_proj"), (ex, "down_proj")]
        mlp = adapter.shared_mlp(layer)
        if mlp is not None:
            for k in KINDS:
                lin = getattr(mlp, f"{k}_proj")
                bits = plan.choice(Unit(layer, SHARED, k)).bits
                parametrize.register_parametrization(
                    lin, "weight", _FakeQuantSlices([(0, lin.weight.shape[0], [bits])], group_size, False, fake_quant))
                done.append((lin, "weight"))
    return done


@torch.no_grad()
def _write_quantized(adapter: MoEAdapter, plan: Plan, group_size: int, codes: dict | None) -> None:
    """Every unit quantized by its plan bits on the RTN grid the training forward used (16-bit units as
    `quantize_weight` keeps them): the same function as the forward, so the model is what training saw."""
    for u in adapter.units():
        c = plan.choice(u)
        grid = c if c.is_fp else Choice(c.bits, group_size, "rtn")
        w = adapter.weight(u)
        if codes is None:
            adapter.set_weight(u, quantize_weight(w, grid))
        else:
            qw = quantize_weight(w, grid, return_codes=True)
            adapter.set_weight(u, qw.dequantize(w.dtype))
            codes[u] = qw


def quantization_aware_training(adapter: MoEAdapter, plan: Plan, windows: torch.Tensor, steps: int,
                                lr: float = 1e-4, batch_size: int = 4, seed: int = 0,
                                progress: bool = False, fake_quant: bool = True,
                                codes: dict | None = None) -> QATResult:
    """Fine-tune the unquantized model's experts under `plan` for `steps` steps on `windows [N, T]`
    (calibration tokens), then leave the model quantized by the plan on the RTN grid of the
    fine-tuned weights. `steps = 0` is RTN post-training quantization. `fake_quant=False` is the
    control "fine-tune in full precision, then RTN": the same trainable weights, steps and data, no
    quantization in the forward (separates what QAT recovers from what more training does).
    `codes` (a dict): also filled with what each unit stores, as `apply_plan` does (for `save_packed`)."""
    if steps < 0:
        raise ValueError(f"--qat-steps must be >= 0, got {steps}")
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"QAT needs calibration windows [N, T] with N >= 1, T >= 2, got {tuple(windows.shape)}")
    group_size = _check_plan(adapter, plan)
    model = adapter.model
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("QAT trains in float32; load the model with --dtype float32")
    t0 = time.perf_counter()
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    registered = _register(adapter, plan, group_size, fake_quant)
    latent = [m.parametrizations[name].original for m, name in registered]
    for p in latent:
        p.requires_grad_(True)
    result = QATResult(steps, lr, batch_size, trainable_params=sum(p.numel() for p in latent))
    opt = torch.optim.Adam(latent, lr=lr)
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    device = latent[0].device
    try:
        for _ in range(steps):
            rows = torch.randperm(windows.shape[0], generator=g)[:batch_size]  # distinct windows per batch
            ids = windows[rows].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        with torch.no_grad():  # back to the latent (fine-tuned) weights, then quantize them exactly once
            for m, name in registered:
                parametrize.remove_parametrizations(m, name, leave_parametrized=False)
            _write_quantized(adapter, plan, group_size, codes)
        for n, p in model.named_parameters():
            p.requires_grad_(requires.get(n, True))
    result.seconds = time.perf_counter() - t0
    if fake_quant:
        plan.meta["qat"] = {**result.to_dict(), "note": "codes re-derived by RTN from the fine-tuned weights"}
    return result
