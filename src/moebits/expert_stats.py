"""Expert statistics for DMPQ (seed 004 §3.3.1), per unit in `adapter.units()` order:

* `f_u` routed-token frequency: from calibration (`Calibration.frequency()`).
* `c_u` gradient contribution, `gradient_contribution`: the Fisher-diagonal estimate of how much the
  loss moves when the unit's weights are perturbed in proportion to themselves,
  `c_u = mean over calibration batches of sum_i (g_i w_i)^2` with `g` the gradient of the next-token
  loss (an empirical Fisher by mini-batch, not per sample: cheaper, and only the ranking matters here).
* `s_u` quantization sensitivity, two ways:
  - `table_sensitivity` (the default): the profiled table's frequency-weighted error at 2 bits,
    `f_u l_u(2)`. Free once the table exists (the knapsack and the RL proxy read the same table), and
    exact for what it measures (the layer-output error), but local: it ignores how the error propagates.
  - `measured_sensitivity`: the NLL increase of the model on a held-out slice when that expert (all its
    units) alone is quantized to 2 bits: one forward over the slice per expert (`G` measurements), and
    noisy on a small slice. Use it when the end-to-end effect matters more than the cost.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .models.adapter import MoEAdapter
from .table import SensitivityTable
from .units import SHARED, Unit


def gradient_contribution(adapter: MoEAdapter, windows: torch.Tensor, batch_size: int = 8,
                          max_batches: int | None = 4) -> np.ndarray:
    """`[U]` c_u = mean over batches of sum over the unit's weights of (dL/dw * w)^2."""
    model, inter = adapter.model, adapter.intermediate
    params = {n: p.requires_grad for n, p in model.named_parameters()}
    tensors = []
    for layer in adapter.moe_layers:
        ex = adapter.experts(layer)
        tensors += [ex.gate_up_proj, ex.down_proj]
        mlp = adapter.shared_mlp(layer)
        if mlp is not None:
            tensors += [getattr(mlp, f"{k}_proj").weight for k in ("gate", "up", "down")]
    for p in model.parameters():
        p.requires_grad_(False)
    for t in tensors:
        t.requires_grad_(True)
    acc = {u: 0.0 for u in adapter.units()}
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            if max_batches is not None and n_batches >= max_batches:
                break
            ids = windows[start:start + batch_size].to(tensors[0].device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))
            model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for layer in adapter.moe_layers:
                    ex = adapter.experts(layer)
                    gu = (ex.gate_up_proj.grad * ex.gate_up_proj).pow(2)  # [E, 2I, H]
                    dn = (ex.down_proj.grad * ex.down_proj).pow(2).sum(dim=(1, 2))  # [E]
                    gate, up = gu[:, :inter].sum(dim=(1, 2)), gu[:, inter:].sum(dim=(1, 2))
                    for e in range(adapter.num_experts):
                        acc[Unit(layer, e, "gate")] += float(gate[e])
                        acc[Unit(layer, e, "up")] += float(up[e])
                        acc[Unit(layer, e, "down")] += float(dn[e])
                    mlp = adapter.shared_mlp(layer)
                    if mlp is not None:
                        for k in ("gate", "up", "down"):
                            w = getattr(mlp, f"{k}_proj").weight
                            acc[Unit(layer, SHARED, k)] += float((w.grad * w).pow(2).sum())
            n_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(params.get(n, True))
    return np.array([acc[u] / max(n_batches, 1) for u in adapter.units()])


def table_sensitivity(table: SensitivityTable, bits: int = 2) -> np.ndarray:
    """`[U]` f_u * l_u(bits) from a complete table (the cheapest column with that bit-width)."""
    cols = [j for j, c in enumerate(table.choices) if c.bits == bits]
    if not cols:
        raise ValueError(f"the table has no {bits}-bit choice (choices: {[c.label for c in table.choices]})")
    return table.loss[:, cols[0]]


def measured_sensitivity(scorer, low_column: int, groups: np.ndarray) -> np.ndarray:
    """`[U]` NLL increase when a group (e.g. an expert) alone takes `low_column` (the 2-bit choice) and
    every other unit keeps its unquantized weight; each unit gets its group's value. `scorer` is a
    `plan_scorer.MeasuredLoss` over units (no group_inverse)."""
    from .plan_scorer import ORIGINAL

    groups = np.asarray(groups)
    base_idx = np.full(len(groups), ORIGINAL, dtype=np.int64)
    base = scorer(base_idx)
    out = np.zeros(len(groups))
    for g in np.unique(groups):
        idx = base_idx.copy()
        idx[groups == g] = low_column
        out[groups == g] = scorer(idx) - base
    return out
