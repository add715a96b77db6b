"""`moebits quantize --target llamacpp`: the pipeline's stages for a GGUF plan (target.py), in the run directory.

    load -> GGUF layout + exact costs (refuse an infeasible budget before any work) -> calibrate ->
    evaluate fp -> importance matrix -> errors of every (tensor, ggml type) (mxmoe: all measured; fri: a rule
    budget of (expert block, type) pairs measured, the rest predicted; freq / uniform: none) ->
    allocate (exact MCKP over tensors) -> gguf_plan.json -> the model's weights as llama.cpp stores them
    (ggml quantize + dequantize) -> evaluate

Artefacts: `gguf_table.json` (loss / bytes per tensor and type), `gguf_plan.json` (the plan `moebits export
RUN --format gguf` writes), results.json. A rerun resumes from them like the other targets.
"""
from __future__ import annotations

import json
import time

import numpy as np

from ..atomic import atomic_write_json
from . import ggml
from .target import (METHODS, PLAN_FILE, TABLE_FILE, GGUFPlan, TensorTable, allocate_tensors, apply_types,
                     cost_matrix, file_budget, layer_tensor_errors, parse_types, predict_unit_errors,
                     tensor_frequency, tensor_table, unit_error_table)
from .tensors import layout

SOLVER_OF = {"mxmoe": "ilp", "fri": "ilp", "freq": "freq", "uniform": "uniform"}

# options of the other targets that a GGUF plan has no place for
_REFUSED = {"bits": "--bits (use --bpw)", "memory_gb": "--memory-gb (use --size-gb)", "latency": "--latency",
            "wbits": "--wbits (use --method uniform --bpw B)", "attn_bits": "--attn-bits (attention is allocated)",
            "abits": "--abits", "abits_set": "--abits-set", "rotate": "--rotate", "bits_set": "--bits-set",
            "ranks": "--ranks"}


def check_config(cfg) -> None:
    """Refuse what `--target llamacpp` cannot do, before any work."""
    if cfg.method not in METHODS:
        raise ValueError(f"--target llamacpp allocates with --method {' | '.join(METHODS)}, not {cfg.method!r}")
    bad = [flag for k, flag in _REFUSED.items() if getattr(cfg, k) is not None]
    if cfg.qat_steps:
        bad.append("--qat-steps")
    if bad:
        raise ValueError(f"--target llamacpp chooses ggml types under --bpw / --size-gb; it does not take {', '.join(bad)}")
    if cfg.metric != "expert":
        raise ValueError("--target llamacpp measures expert tensors with the expert-local metric (exact) and "
                         "attention by layer re-runs; --metric layer is not offered")
    file_budget(cfg.bpw, cfg.size_gb)
    parse_types(cfg.gguf_types)


def execute(p) -> dict:
    """Run the llamacpp target on the pipeline `p` (pipeline.Pipeline); returns its results."""
    cfg = p.cfg
    if p.results.get("done"):
        return p.results
    check_config(cfg)
    ggml.require()
    budget = file_budget(cfg.bpw, cfg.size_gb)
    types = list(parse_types(cfg.gguf_types))
    solver = cfg.solver or SOLVER_OF[cfg.method]
    p.load()
    lay = layout(p.adapter)
    tensors, effective, cost = cost_matrix(lay, types)
    _precheck(lay, cost, budget, solver)
    p.calibrate()
    p.evaluate("ppl_fp")
    imatrix = _imatrix(p, lay)
    table_p, plan_p = p.run.path(TABLE_FILE), p.run.path(PLAN_FILE)
    if table_p.exists():
        table = TensorTable.from_dict(json.loads(table_p.read_text()))
    else:
        table = _fill(p, tensors, types, effective, cost, imatrix)
        atomic_write_json(table_p, table.to_dict())
    if plan_p.exists():
        plan = GGUFPlan.load(plan_p)
    else:
        freq = None
        if solver == "freq":
            stats = p.calib.stats
            freq = tensor_frequency(tensors, {u: stats[u].frequency for t in tensors for u in t.units})
        plan = allocate_tensors(lay, table, budget, solver, freq, meta={"method": cfg.method, "model": cfg.model,
                                                                        "candidates": types})
        plan.save(plan_p)
        p.results["allocate_seconds"] = round(plan.meta["allocate_seconds"], 4)
    t0 = time.perf_counter()
    apply_types(p.adapter, lay, plan.types, imatrix)
    p.results["quantize_seconds"] = round(time.perf_counter() - t0, 4)
    p.results.pop("ppl_q", None)
    p.evaluate("ppl_q")
    p.results.update({
        "method": cfg.method, "solver": plan.meta.get("solver"), "model": cfg.model, "target": "llamacpp",
        "budget": plan.meta.get("budget"), "gguf_bpw": plan.bpw, "gguf_tensor_bytes": plan.file_bytes,
        "gguf_types": plan.histogram(), "gguf_plan": PLAN_FILE,
    })
    return p.finish_results()


def _imatrix(p, lay) -> dict:
    """GGUF name -> importance matrix ([experts, cols] or [cols]) of the allocated tensors, collected over the
    calibration windows as llama-imatrix does (imatrix.py) and saved as the run's imatrix.gguf, which the
    export quantizes with."""
    from .export import RUN_IMATRIX
    from .imatrix import Imatrix, collect_imatrix

    path = p.run.path(RUN_IMATRIX)
    if path.exists():
        im = Imatrix.load(path)
    else:
        cfg = p.cfg
        im = p.timed("imatrix_seconds", lambda: collect_imatrix(
            p.model, p.windows, cfg.batch_size, p.adapter,
            dataset=f"moebits calibration: {cfg.calib} ({cfg.nsamples} x {cfg.calib_seqlen} tokens, seed {cfg.seed})"))
        im.save(path)
    return {t.name: im.for_tensor(t.name) for t in lay.allocated}


def _precheck(lay, cost: np.ndarray, budget, solver: str) -> None:
    """The budget's feasible range from the exact costs alone: refused before calibrating."""
    from ..allocate import check_budget

    fixed = lay.stock_types()
    fixed_bytes = sum(lay.by_name[n].nbytes(ty) for n, ty in fixed.items())
    n = lay.n_elements
    check_budget(cost, budget.total_bytes(n) - fixed_bytes, solver,
                 budget_format=lambda b: budget.describe(b + fixed_bytes, n))


def _fill(p, tensors, types, effective, cost, imatrix) -> TensorTable:
    """The loss of every (tensor, type): measured (mxmoe), a rule budget measured and the rest predicted
    (fri), or none (freq, uniform: zero loss, they do not read it)."""
    cfg = p.cfg
    if cfg.method in ("freq", "uniform"):
        names = [t.name for t in tensors]
        return TensorTable(names, types, effective, np.zeros(cost.shape), cost, np.zeros(cost.shape))
    inputs = p.calib.profile_inputs()
    block_units = [u for t in tensors if t.role in ("experts", "shared") for u in t.units]
    freq = p.calib.stats.aligned(block_units).frequency
    t0 = time.perf_counter()
    if cfg.method == "mxmoe":
        units_table = unit_error_table(p.adapter, tensors, effective, inputs, imatrix, frequency=freq)
    else:  # fri: anchor experts within the rule budget, the rest predicted
        from ..methods.fri.samplers import sample_anchors

        n_types = len({e for t, eff in zip(tensors, effective) if t.role in ("experts", "shared") for e in eff})
        rules = cfg.rule_budget(len(block_units), n_types)
        sampler = "stratified" if cfg.sampler == "adaptive" else cfg.sampler  # adaptive rounds: the unit target only
        anchors = sample_anchors(block_units, sampler, rules=rules, seed=cfg.seed, bits_per_unit=n_types)
        measured = unit_error_table(p.adapter, tensors, effective, inputs, imatrix, units=anchors, frequency=freq)
        p.results["rules"] = int(measured.measured.sum())
        p.results["rule_budget"] = rules
        p.results["anchors"] = len({(u.layer, u.expert) for u in anchors})
        t1 = time.perf_counter()
        units_table = predict_unit_errors(measured, p.calib.stats, cfg.predictor, cfg.seed)
        p.results["fit_seconds"] = round(time.perf_counter() - t1, 4)
    layer_errors = layer_tensor_errors(p.adapter, tensors, effective, p.windows, imatrix, cfg.batch_size)
    p.results["profile_seconds"] = round(time.perf_counter() - t0, 4)
    table = tensor_table(tensors, types, effective, cost, units_table, layer_errors)
    table.seconds = {"profile": p.results["profile_seconds"]}
    return table


def print_results(r: dict, out) -> None:
    """The CLI's summary of a `--target llamacpp` run."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"moebits quantize --target llamacpp -> {out}")
    for c in ("method", "solver", "GGUF bpw", "tensor MB", "ppl fp", "ppl q", "Δppl %", "seconds"):
        t.add_column(c, justify="right")
    secs = sum(r.get(k, 0) for k in ("calibrate_seconds", "imatrix_seconds", "profile_seconds", "allocate_seconds",
                                     "quantize_seconds", "eval_seconds"))
    t.add_row(r["method"], str(r["solver"]), f"{r['gguf_bpw']:.4f}", f"{r['gguf_tensor_bytes'] / 1e6:.3f}",
              f"{r['ppl_fp']:.3f}", f"{r['ppl_q']:.3f}", f"{100 * (r['ppl_q'] / r['ppl_fp'] - 1):+.2f}", f"{secs:.1f}")
    Console().print(t)
    Console().print(f"types of the allocated tensors: {r['gguf_types']}; plan: {out}/{r['gguf_plan']} "
                    f"(write it with `moebits export {out} --format gguf --out FILE.gguf`)")
