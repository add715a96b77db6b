"""The whole job, stage by stage, in a run directory:

    calibrate -> evaluate fp -> profile (all units, anchors, or none) -> [fit + predict] -> allocate
    -> quantize -> evaluate

Each stage's artefact is written atomically; a rerun with the same request resumes at the first
missing artefact (see run.py). Methods differ only in how they fill the sensitivity table and which
solver they call:

    uniform  one bit-width for every unit (the largest whose exact storage fits the budget)
    freq     MPQ-Freq: more bits to more frequently routed experts (no profiling)
    mxmoe    profile every unit x bit-width, exact ILP              (MxMoE)
    fri      profile anchors, predict the rest by FRI, Lagrangian   (FRI-MxMoE)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import cost as costs
from .allocate import allocate, combine_groups, expert_level, layer_uniform, tie_gate_up, to_plan
from .allocate.problem import check_feasible
from .apply import apply_plan, save_quantized
from .calibrate import Calibration, calibrate
from .data import calibration_windows, load_text, tokenize
from .evaluate import perplexity
from .models import load_model
from .plan import Plan
from .run import Run, atomic_write_json
from .stats import load_stats, save_stats
from .table import SensitivityTable
from .units import FP_BITS, Choice, Unit

log = logging.getLogger(__name__)

METHODS = ("uniform", "freq", "mxmoe", "fri")
DEFAULT_SOLVER = {"uniform": "uniform", "freq": "freq", "mxmoe": "ilp", "fri": "lagrangian"}
GRANULARITIES = ("linear", "expert", "layer")


@dataclass
class QuantizeConfig:
    model: str = "demo"
    method: str = "uniform"
    quantizer: str = "rtn"
    bits: float | None = None  # budget: average storage bits per weight over the units
    memory_gb: float | None = None  # budget: GB of unit weights
    latency: float | None = None  # budget: seconds per forward of the units (roofline on `gpu`)
    gpu: str = "h100"
    cost: str = "roofline"  # latency model: roofline (analytic, --gpu) | latency-fri (measured here, FRI-interpolated)
    batch_tokens: int = 4096
    group_size: int = 128
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    calib: str = "demo"
    nsamples: int = 128
    seqlen: int = 256
    eval: str = "demo"
    eval_windows: int | None = None
    metric: str = "expert"
    solver: str | None = None
    granularity: str = "linear"  # linear (per block) | expert (one choice per expert) | layer (per layer & kind)
    tie_gate_up: bool = False
    anchors: float = 0.2  # fri: fraction of units profiled
    sampler: str = "stratified"
    act_order: bool = False
    max_tokens_per_expert: int = 512
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    batch_size: int = 8
    save_model: bool = True
    trust_remote_code: bool = False

    def spec(self) -> dict:
        d = asdict(self)
        d["candidate_bits"] = list(self.candidate_bits)
        for k in ("save_model",):  # output options: do not make a run "different"
            d.pop(k)
        return d


@dataclass
class Budget:
    kind: str  # bits | memory | latency
    value: float
    cost: np.ndarray  # [U, C] in the budget's unit
    total: float  # the budget in the same unit as `cost`
    describe: object = field(default=None)  # cost -> words, for error messages


def candidate_choices(cfg: QuantizeConfig) -> list[Choice]:
    if cfg.method == "uniform":  # every bit-width the quantizer has, so the budget picks the largest fitting one
        bits = (1, 2, 3, 4, 8) if cfg.quantizer == "hqq" else (2, 3, 4, 5, 6, 7, 8)
        return [Choice(b, cfg.group_size, cfg.quantizer) for b in bits] + [Choice(FP_BITS, cfg.group_size, cfg.quantizer)]
    return [Choice(b, cfg.group_size, cfg.quantizer) for b in sorted(cfg.candidate_bits)]


def make_budget(cfg: QuantizeConfig, units: list[Unit], shapes: dict, choices: list[Choice], freq: np.ndarray) -> Budget:
    given = [k for k in ("bits", "memory_gb", "latency") if getattr(cfg, k) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one budget: --bits (average bits per weight), --memory-gb, or --latency")
    shape_list = [shapes[u] for u in units]
    storage = costs.storage_matrix(shape_list, choices)
    if cfg.bits is not None:
        return Budget("bits", cfg.bits, storage, costs.avg_bits_to_total_bits(cfg.bits, shape_list),
                      costs.avg_bits_formatter(shape_list))
    if cfg.memory_gb is not None:
        return Budget("memory", cfg.memory_gb, storage, costs.gb_to_bits(cfg.memory_gb),
                      lambda c: f"{costs.bits_to_gb(c):.6g} GB")
    if cfg.cost == "latency-fri":
        from .latency import latency_fri_matrix

        lat, info = latency_fri_matrix(shape_list, freq, choices, cfg.batch_tokens, seed=cfg.seed, device=cfg.device)
        log.info("latency FRI: %s", {k: v for k, v in info.items() if not isinstance(v, (list, dict))})
    elif cfg.cost == "roofline":
        lat = costs.latency_matrix(shape_list, freq, choices, cfg.gpu, cfg.batch_tokens)
    else:
        raise ValueError(f"unknown latency model {cfg.cost!r}; choose roofline or latency-fri")
    return Budget("latency", cfg.latency, lat, cfg.latency, lambda c: f"{c * 1e3:.6g} ms")


def structure_groups(cfg: QuantizeConfig, units: list[Unit]):
    if cfg.granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {cfg.granularity!r}; choose one of {GRANULARITIES}")
    parts = []
    if cfg.granularity == "expert":
        parts.append(expert_level(units))
    elif cfg.granularity == "layer":
        parts.append(layer_uniform(units))
    if cfg.tie_gate_up:
        parts.append(tie_gate_up(units))
    return combine_groups(*parts) if parts else None


class Pipeline:
    def __init__(self, cfg: QuantizeConfig, out: str | Path, overwrite: bool = False, progress: bool = True):
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
        self.cfg, self.progress = cfg, progress
        self.run = Run(out, cfg.spec(), overwrite=overwrite)
        self.results: dict = {}
        rp = self.run.path("results.json")
        if rp.exists():
            self.results = json.loads(rp.read_text())

    # -- stages ------------------------------------------------------------------------------
    def _timed(self, key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.results[key] = round(time.perf_counter() - t0, 4)
        return out

    def load(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer, self.adapter = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                                              seed=cfg.seed)
        self.adapter.check_finite()
        self.units = self.adapter.units()
        self.shapes = self.adapter.shapes()

    def calibrate(self) -> Calibration:
        stats_p, inputs_p = self.run.path("stats.json"), self.run.path("calib_inputs.safetensors")
        cfg = self.cfg
        self.windows = calibration_windows(self.tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
        if stats_p.exists() and inputs_p.exists():
            stats, meta = load_stats(stats_p)
            self.calib = Calibration(stats, Calibration.load_inputs(inputs_p), meta["total_tokens"],
                                     [tuple(x) for x in meta.get("never_routed", [])])
            return self.calib
        cal = self._timed("calibrate_seconds", lambda: calibrate(
            self.adapter, self.windows, cfg.batch_size, cfg.max_tokens_per_expert, cfg.seed, self.progress))
        cal.save_inputs(inputs_p)
        save_stats(cal.stats, stats_p, {"total_tokens": cal.total_tokens, "never_routed": cal.never_routed})
        self.calib = cal
        self._save_results()
        return cal

    def eval_tokens(self) -> torch.Tensor:
        if not hasattr(self, "_eval_ids"):
            self._eval_ids = tokenize(self.tokenizer, load_text(self.cfg.eval, "eval"))
        return self._eval_ids

    def evaluate(self, key: str) -> None:
        if key in self.results:
            return
        res = self._timed(f"{key}_eval_seconds", lambda: perplexity(
            self.model, self.eval_tokens(), self.cfg.seqlen, self.cfg.batch_size, self.cfg.eval_windows,
            self.progress, desc=f"eval ({key})"))
        self.results[key] = res.ppl
        self.results["eval_tokens"], self.results["eval_windows"] = res.tokens, res.windows
        self._save_results()

    def profile(self, choices: list[Choice]) -> SensitivityTable | None:
        cfg = self.cfg
        if cfg.method in ("uniform", "freq"):
            self.results.setdefault("profile_seconds", 0.0)
            return None
        table_p = self.run.path("table.csv")
        if table_p.exists():
            return SensitivityTable.from_csv(table_p)
        from .profile import new_table, profile

        stats = self.calib.stats_by_unit()
        if cfg.method == "mxmoe":
            todo = self.units
        else:
            from .sampling import sample_anchors

            todo = sample_anchors(self.units, cfg.sampler, fraction=cfg.anchors, seed=cfg.seed,
                                  bits_per_unit=len(choices))
        table = new_table(self.adapter, choices, stats)
        table = self._timed("profile_seconds", lambda: profile(
            self.adapter, cfg.metric, todo, choices, stats, self.calib.inputs, windows=self.windows,
            act_order=cfg.act_order, table=table, progress=self.progress))
        self.results["profiled_units"] = len(todo)
        if cfg.method == "fri":
            from .predict import fit_table, predict_table

            self.results["anchors"] = len({(u.layer, u.expert) for u in todo})
            self.results["rules"] = int(table.measured.sum())
            fitted = self._timed("fit_seconds", lambda: fit_table(table, self.calib.stats))
            table = self._timed("predict_seconds", lambda: predict_table(table, fitted))
        table.to_csv(table_p)
        self._save_results()
        return table

    def allocate(self, choices: list[Choice], table: SensitivityTable | None) -> Plan:
        plan_p = self.run.path("plan.json")
        if plan_p.exists():
            return Plan.load(plan_p)
        cfg = self.cfg
        freq = np.array([s.frequency for s in self.calib.stats])  # stats are in unit order
        budget = make_budget(cfg, self.units, self.shapes, choices, freq)
        solver = cfg.solver or DEFAULT_SOLVER[cfg.method]
        if table is None:
            loss = np.zeros((len(self.units), len(choices)))
        else:
            loss = table.frequency[:, None] * table.error
        groups = structure_groups(cfg, self.units)
        res = self._timed("allocate_seconds", lambda: allocate(
            loss, budget.cost, budget.total, solver=solver, groups=groups, frequency=freq,
            budget_format=budget.describe))
        meta = {"method": cfg.method, "solver": solver, "budget": {budget.kind: budget.value},
                "granularity": cfg.granularity, "tie_gate_up": cfg.tie_gate_up, "model": cfg.model}
        plan = to_plan(self.units, choices, res, loss, budget.cost, meta)
        plan.meta["avg_bits"] = plan.avg_bits(self.shapes)
        plan.save(plan_p)
        self._save_results()
        return plan

    def quantize(self, plan: Plan) -> None:
        self.results["quantize_seconds"] = round(apply_plan(self.adapter, plan, self.calib.inputs, self.cfg.act_order,
                                                            self.progress), 4)
        self._save_results()

    def precheck_budget(self, choices: list[Choice]) -> None:
        """Fail before calibrating when a storage budget cannot be met (latency needs frequencies)."""
        cfg = self.cfg
        if cfg.latency is not None or self.run.has("plan.json"):
            return
        budget = make_budget(cfg, self.units, self.shapes, choices, np.zeros(len(self.units)))
        solver = cfg.solver or DEFAULT_SOLVER[cfg.method]
        zeros = np.zeros(budget.cost.shape)
        if solver in ("uniform", "freq"):  # cheap: the solver itself is the check
            allocate(zeros, budget.cost, budget.total, solver=solver, frequency=np.ones(len(self.units)),
                     groups=structure_groups(cfg, self.units), budget_format=budget.describe)
        else:
            check_feasible(budget.cost, budget.total, budget.describe)

    # -- the whole job -------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        if self.results.get("done"):
            return self.results
        self.load()
        choices = candidate_choices(cfg)
        self.precheck_budget(choices)
        self.calibrate()
        self.evaluate("ppl_fp")
        table = self.profile(choices)
        plan = self.allocate(choices, table)
        self.quantize(plan)
        self.results.pop("ppl_q", None)  # a quantized model is only ever evaluated right after quantizing
        self.evaluate("ppl_q")
        if cfg.save_model:
            save_quantized(self.model, self.tokenizer, plan, self.run.path("model"))
        unit_bits = plan.storage_bits(self.shapes)
        other = sum(p.numel() for p in self.model.parameters()) - sum(a * b for a, b in self.shapes.values())
        self.results.update({
            "method": cfg.method, "quantizer": cfg.quantizer, "solver": plan.meta.get("solver"),
            "model": cfg.model, "budget": plan.meta.get("budget"),
            "avg_bits": plan.avg_bits(self.shapes), "weight_bytes": unit_bits / 8,
            "model_bytes": unit_bits / 8 + 2 * other,  # non-unit weights kept in 16 bits
            "bits_histogram": plan.bits_histogram(),
            "eval_seconds": self.results.get("ppl_fp_eval_seconds", 0) + self.results.get("ppl_q_eval_seconds", 0),
            "never_routed": len(self.calib.never_routed), "done": True,
        })
        for k in ("calibrate_seconds", "profile_seconds", "allocate_seconds", "quantize_seconds"):
            self.results.setdefault(k, 0.0)
        self._save_results()
        return self.results

    def _save_results(self) -> None:
        atomic_write_json(self.run.path("results.json"), self.results)
