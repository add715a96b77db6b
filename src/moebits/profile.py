"""Sensitivity profiling: the error l_u(c) of quantizing one unit u with choice c.

Two metrics, equal in exact arithmetic:

* `layer`  -- MxMoE's `layer_out_norm`: write the quantized block into the model, re-run its whole
  decoder layer on every calibration token, and take ||Y_q - Y||_F^2.
* `expert` -- the expert-local equivalent. The MoE output is y(x) = sum_{e in topk(x)} g_e(x) f_e(x)
  (+ the shared expert); changing a weight of expert e changes only f_e, and the router's input is
  untouched, so Y_q - Y = g_e(x) * (f_e^q(x) - f_e(x)) on e's routed tokens and 0 elsewhere. One
  forward of one expert on its own tokens gives the same number without attention or other experts.

Both are reported as the *intrinsic* error: squared output error per routed token,
l_u = ||Y_q - Y||^2 / tokens_u, so that f_u * l_u * total_tokens = layer_out_norm^2 (frequency
enters the objective separately). The expert metric uses the routed tokens the calibration kept (all
of them by default, a random sample under `max_tokens_per_expert`; the held-out ones under a holdout,
see `Calibration.profile_inputs`), the layer metric all tokens. GPTQ quantizes with the calibration's
Hessians, accumulated over every routed token (`apply.layer_hessians`), in both metrics.

`whole_expert=True` is BT-MoE's isolated perturbation: all three blocks of one expert take the same
choice at once and the error of that joint perturbation, L_i(c), is measured (it is not the sum of the
three single-block errors: gate, up and down errors interact through the activation). The table stays
per unit: each of the expert's three units holds L_i(c) / 3, so the expert-level group's summed loss
(what the allocator sees with `--granularity expert`) is exactly L_i(c).

Activation bits (`Choice.act_bits < 16`) are profiled like weight bits: the block's input is
fake-quantized per token (quant/act.py, clip ratio `act_clip`) while its quantized weight is used. That
too changes only f_e, so the expert metric stays exact (tests/test_act.py checks it against `layer`).
Choices that differ only in activation bits share one weight quantization.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .apply import layer_hessians
from .calibrate import ExpertInputs
from .expert_profiler import ExpertProfiler
from .models.act_quant import act_quantizer
from .models.adapter import MoEAdapter
from .quant import quantize_weight
from .stats import CalibrationStats
from .table import SensitivityTable
from .units import KINDS, Choice, Unit

METRICS = ("expert", "layer")


def _act_quant(choice: Choice, kinds, clip: float) -> dict | None:
    """{kind: activation quantizer} for the blocks a choice quantizes, None when it keeps fp activations."""
    if not choice.quantizes_acts:
        return None
    return {k: act_quantizer(choice.act_bits, clip) for k in kinds}


def _quantize_batch(adapter: MoEAdapter, members: list[Unit], choice: Choice, H: dict, act_order: bool):
    choice = choice.weight_choice  # activation bits do not change the stored weight
    w = torch.stack([adapter.weight(u) for u in members])
    h = None
    if choice.quantizer == "gptq" and not choice.is_fp:
        kind = members[0].kind
        h = torch.stack([H[(u.expert, "down" if kind == "down" else "in")] for u in members])
    return quantize_weight(w, choice, hessian=h, act_order=act_order)


def profile_expert(adapter: MoEAdapter, units: list[Unit], choices: list[Choice], stats: CalibrationStats,
                   inputs: dict[tuple[int, int | str], ExpertInputs], act_order: bool = False,
                   table: SensitivityTable | None = None, progress: bool = True, act_clip: float = 1.0,
                   profiler: ExpertProfiler | None = None) -> SensitivityTable:
    """Expert-local metric for `units` x `choices`, written into `table` (a new one if None). The work
    is `ExpertProfiler`'s (expert_profiler.py); pass one `profiler` to calls that should share its
    caches (the adaptive sampler's rounds)."""
    table = table or new_table(adapter, choices, stats)
    if profiler is None:
        profiler = ExpertProfiler(adapter, inputs, act_order, act_clip)
    elif (profiler.inputs is not inputs or profiler.act_order != act_order or profiler.act_clip != act_clip
          or profiler.adapter is not adapter):
        raise ValueError("the profiler was made for other inputs or options than this call's")
    profiler.measure([(u, c) for u in units for c in choices], table, progress)
    return table


@torch.no_grad()
def capture_layer_io(adapter: MoEAdapter, windows: torch.Tensor, layer: int, batch_size: int = 8):
    """Everything needed to re-run decoder layer `layer`: its call arguments per batch of windows."""
    model, calls = adapter.model, []
    device = next(model.parameters()).device

    def keep(_, args, kwargs):
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                      {k: v for k, v in kwargs.items() if k != "past_key_values"}))

    with adapter.capture_layer_inputs(keep, [layer]) as stop:
        for s in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[s:s + batch_size].to(device), use_cache=False)
            except stop:
                pass
    return calls


def _run_layer(adapter: MoEAdapter, layer: int, calls) -> list[torch.Tensor]:
    mod = adapter.decoder_layers[layer]
    outs = []
    for args, kwargs in calls:
        out = mod(*args, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).detach())
    return outs


@torch.no_grad()
def profile_layer(adapter: MoEAdapter, units: list[Unit], choices: list[Choice], stats: CalibrationStats,
                  inputs: dict[tuple[int, int | str], ExpertInputs], windows: torch.Tensor, act_order: bool = False,
                  batch_size: int = 8, table: SensitivityTable | None = None, progress: bool = True,
                  act_clip: float = 1.0) -> SensitivityTable:
    """MxMoE's metric: quantize one block, re-run the whole decoder layer on all calibration tokens."""
    table = table or new_table(adapter, choices, stats)
    needs_h = any(c.quantizer == "gptq" for c in choices)
    bar = tqdm(total=len(units) * len(choices), desc="profile (layer)", disable=not progress, leave=False)
    by_layer: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        by_layer[u.layer].append(u)
    for layer, members in sorted(by_layer.items()):
        calls = capture_layer_io(adapter, windows, layer, batch_size)
        ref = _run_layer(adapter, layer, calls)
        H = layer_hessians(adapter, layer, inputs, sorted({u.expert for u in members}, key=str)) if needs_h else {}
        for u in members:
            original = adapter.weight(u).clone()
            for choice in choices:
                t0 = time.perf_counter()
                q = _quantize_batch(adapter, [u], choice, H, act_order)[0]
                adapter.set_weight(u, q)
                act = _act_quant(choice, (u.kind,), act_clip)
                with adapter.temporary_input_transform(u, "act_quant", act and act[u.kind]):
                    out = _run_layer(adapter, layer, calls)
                adapter.set_weight(u, original)
                sq = sum(((o.double() - r.double()) ** 2).sum().item() for o, r in zip(out, ref))
                table.set(u, choice, sq / max(1, stats[u].tokens), seconds=time.perf_counter() - t0, measured=True)
                bar.update()
    bar.close()
    return table


def _expert_batches(units: list[Unit]):
    """(layer, is_shared) -> experts having units in `units`: experts whose blocks are quantized in one batch."""
    g: dict[tuple, set] = defaultdict(set)
    for u in units:
        g[(u.layer, u.is_shared)].add(u.expert)
    return {k: sorted(v, key=str) for k, v in sorted(g.items())}


def _quantize_expert_blocks(adapter: MoEAdapter, layer: int, experts: list, choice: Choice, H: dict, act_order: bool):
    """{kind: [len(experts), out, in]} every block of `experts` quantized with `choice` (batched per kind)."""
    return {kind: _quantize_batch(adapter, [Unit(layer, e, kind) for e in experts], choice, H, act_order)
            for kind in KINDS}


def _set_whole_expert(table: SensitivityTable, layer: int, expert, choice: Choice, err: float, seconds: float):
    for kind in KINDS:
        table.set(Unit(layer, expert, kind), choice, err / len(KINDS), seconds=seconds / len(KINDS), measured=True)


@torch.no_grad()
def profile_whole_expert(adapter: MoEAdapter, units: list[Unit], choices: list[Choice], stats: CalibrationStats,
                         inputs: dict[tuple[int, int | str], ExpertInputs], act_order: bool = False,
                         table: SensitivityTable | None = None, progress: bool = True,
                         keep: dict | None = None, act_clip: float = 1.0) -> SensitivityTable:
    """BT-MoE's loss with the expert-local metric: every block of an expert quantized with one choice,
    the expert's routed output error (routing weight applied) per routed token. With `keep` (a dict),
    the quantized blocks are kept as `keep[(layer, expert, kind, choice)]`, so that a caller applying
    many plans built from this table does not quantize again."""
    table = table or new_table(adapter, choices, stats)
    batches = _expert_batches(units)
    needs_h = any(c.quantizer == "gptq" and not c.is_fp for c in choices)
    bar = tqdm(total=sum(len(v) for v in batches.values()) * len(choices), desc="profile (whole expert)",
               disable=not progress, leave=False)
    for (layer, _), experts in batches.items():
        H = layer_hessians(adapter, layer, inputs, experts) if needs_h else {}
        refs = {}
        for e in experts:
            x = inputs[(layer, e)].x.to(adapter.weight(Unit(layer, e, "gate")).dtype)
            refs[e] = (x, adapter.expert_forward(layer, e, x))
        for choice in choices:
            t0 = time.perf_counter()
            wq = _quantize_expert_blocks(adapter, layer, experts, choice, H, act_order)
            t_quant = (time.perf_counter() - t0) / len(experts)
            if keep is not None:
                keep.update({(layer, e, kind, choice): wq[kind][i] for kind in KINDS for i, e in enumerate(experts)})
            for i, e in enumerate(experts):
                t1 = time.perf_counter()
                x, ref = refs[e]
                y_q = adapter.expert_forward(layer, e, x, {kind: wq[kind][i] for kind in KINDS},
                                             act_quant=_act_quant(choice, KINDS, act_clip))
                d = (y_q - ref).double() * inputs[(layer, e)].g.double()[:, None]
                _set_whole_expert(table, layer, e, choice, (d * d).sum().item() / x.shape[0],
                                  t_quant + time.perf_counter() - t1)
                bar.update()
    bar.close()
    return table


@torch.no_grad()
def profile_whole_expert_layer(adapter: MoEAdapter, units: list[Unit], choices: list[Choice],
                               stats: CalibrationStats, inputs: dict[tuple[int, int | str], ExpertInputs],
                               windows: torch.Tensor, act_order: bool = False, batch_size: int = 8,
                               table: SensitivityTable | None = None, progress: bool = True,
                               act_clip: float = 1.0) -> SensitivityTable:
    """BT-MoE's loss as the paper measures it: write all blocks of one expert, re-run the decoder layer."""
    table = table or new_table(adapter, choices, stats)
    batches = _expert_batches(units)
    needs_h = any(c.quantizer == "gptq" and not c.is_fp for c in choices)
    bar = tqdm(total=sum(len(v) for v in batches.values()) * len(choices), desc="profile (whole expert, layer)",
               disable=not progress, leave=False)
    calls_layer, calls, ref = None, None, None
    for (layer, _), experts in batches.items():
        if calls_layer != layer:
            calls, calls_layer = capture_layer_io(adapter, windows, layer, batch_size), layer
            ref = _run_layer(adapter, layer, calls)
        H = layer_hessians(adapter, layer, inputs, experts) if needs_h else {}
        for choice in choices:
            t0 = time.perf_counter()
            wq = _quantize_expert_blocks(adapter, layer, experts, choice, H, act_order)
            t_quant = (time.perf_counter() - t0) / len(experts)
            for i, e in enumerate(experts):
                t1 = time.perf_counter()
                blocks = [Unit(layer, e, kind) for kind in KINDS]
                originals = [adapter.weight(u).clone() for u in blocks]
                for u in blocks:
                    adapter.set_weight(u, wq[u.kind][i])
                act = _act_quant(choice, KINDS, act_clip) or {}
                with contextlib.ExitStack() as stack:
                    for u in blocks:
                        stack.enter_context(adapter.temporary_input_transform(u, "act_quant", act.get(u.kind)))
                    out = _run_layer(adapter, layer, calls)
                for u, w in zip(blocks, originals):
                    adapter.set_weight(u, w)
                sq = sum(((o.double() - r.double()) ** 2).sum().item() for o, r in zip(out, ref))
                _set_whole_expert(table, layer, e, choice, sq / max(1, stats[blocks[0]].tokens),
                                  t_quant + time.perf_counter() - t1)
                bar.update()
    bar.close()
    return table


def new_table(adapter: MoEAdapter, choices: list[Choice], stats: CalibrationStats) -> SensitivityTable:
    units = adapter.units()
    t = SensitivityTable(units, list(choices))
    t.frequency[:] = stats.aligned(units).frequency
    return t


def profile(adapter: MoEAdapter, metric: str, units: list[Unit], choices: list[Choice], stats, inputs,
            windows=None, whole_expert: bool = False, **kw) -> SensitivityTable:
    if metric == "expert":
        fn = profile_whole_expert if whole_expert else profile_expert
        return fn(adapter, units, choices, stats, inputs, **kw)
    if metric == "layer":
        if windows is None:
            raise ValueError("the layer metric re-runs decoder layers: it needs the calibration windows")
        fn = profile_whole_expert_layer if whole_expert else profile_layer
        return fn(adapter, units, choices, stats, inputs, windows, **kw)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
