"""The whole job, stage by stage, in a run directory:

    calibrate -> evaluate fp -> fill the sensitivity table (by the method) -> allocate -> quantize -> evaluate

Each stage's artefact is written atomically; a rerun with the same request resumes at the first
missing artefact (see rundir.py). Methods (moebits.methods) differ only in how they fill the sensitivity table
and which solver reads it; from the table on, every method takes the same path: `Budget` (budget.py) ->
`allocate.plan_under_budget` -> `Plan`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..allocate import plan_under_budget
from ..apply import apply_plan, save_quantized
from ..atomic import atomic_write_json
from ..attention import attention_hessians, attention_size, check_attention_choice, quantize_attention
from ..budget import Budget
from ..calibrate import Calibration, calibrate
from ..data import calibration_windows, load_text, tokenize
from ..evaluate import perplexity
from ..methods import Context, Request, get_method
from ..models import load_model
from ..plan import Plan
from ..table import SensitivityTable
from ..units import Choice
from .config import QuantizeConfig, candidate_choices, make_budget, structure_groups
from .rundir import Run

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, cfg: QuantizeConfig, out: str | Path, overwrite: bool = False, progress: bool = True):
        self.method = get_method(cfg.method)
        cfg.check()  # options set one by one since it was built
        cfg.resolve_seqlens()
        self.cfg, self.progress = cfg, progress
        self.rotation = None  # rotate.Rotation once load() rotated the model (--rotate)
        self.allocation_budget = None  # built once, by context(), for the method and the allocation
        from ..fingerprint import run_inputs
        from .rundir import read_cached_json

        self.run = Run(out, cfg.spec(), overwrite=overwrite, inputs=run_inputs(cfg.model, cfg.calib, cfg.eval))
        self.results: dict = read_cached_json(self.run, "results.json") or {}

    @classmethod
    def from_run(cls, directory: str | Path, progress: bool = True, **output_options) -> "Pipeline":
        """The pipeline of an existing run directory, its configuration rebuilt from `run.json`."""
        spec_p = Path(directory) / "run.json"
        if not spec_p.exists():
            raise FileNotFoundError(f"{directory} is not a moebits run directory (no run.json)")
        cfg = QuantizeConfig.from_spec(json.loads(spec_p.read_text())).replace(**output_options)
        return cls(cfg, directory, progress=progress)

    # -- stages ------------------------------------------------------------------------------
    def timed(self, key: str, fn):
        """Run `fn()` and record its wall seconds as `results[key]`."""
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
        self.warn_seqlen()
        self.rotation = None
        if cfg.rotate:  # before calibration: statistics, Hessians and profiles are of the rotated model
            from ..rotate import rotate_model

            self.rotation = self.timed("rotate_seconds", lambda: rotate_model(
                self.model, self.adapter, cfg.rotate, cfg.seed))
            self.results["rotation"] = self.rotation.to_dict()
        self.units = self.adapter.units()
        self.shapes = self.adapter.shapes()

    def calibrate(self) -> Calibration:
        cfg = self.cfg
        self.windows = calibration_windows(self.tokenizer, cfg.calib, cfg.nsamples, cfg.calib_seqlen, cfg.seed)
        if self.run.verified(Calibration.STATS_FILE) and self.run.verified(Calibration.INPUTS_FILE):
            self.calib = Calibration.load(self.run.root)
            return self.calib
        cal = self.timed("calibrate_seconds", lambda: calibrate(
            self.adapter, self.windows, cfg.batch_size, cfg.max_tokens_per_expert, cfg.seed, self.progress,
            holdout=cfg.holdout))
        cal.save(self.run.root)
        self.run.record(Calibration.INPUTS_FILE, Calibration.STATS_FILE)
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
        res = self.timed(f"{key}_eval_seconds", lambda: perplexity(
            self.model, self.eval_tokens(), self.cfg.eval_seqlen, self.cfg.batch_size, self.cfg.eval_windows,
            self.progress, desc=f"eval ({key})"))
        self.results[key] = res.ppl
        self.results["eval_tokens"], self.results["eval_windows"] = res.tokens, res.windows
        self._save_results()

    def new_table(self, choices: list[Choice]) -> SensitivityTable:
        """An empty table over the run's units x `choices`, with the calibration's frequencies."""
        table = SensitivityTable(self.units, list(choices))
        table.frequency[:] = self.calib.stats.aligned(self.units).frequency
        return table

    # -- the method's three steps ----------------------------------------------------------------
    def context(self, choices: list[Choice]) -> Context:
        """The read-only view of this run a method sees (the budget is built once, when first asked for)."""
        def allocation_budget():
            if self.allocation_budget is None:
                self.allocation_budget = self.budget(choices, self.calib.stats.aligned(self.units).frequency)
            return self.allocation_budget

        return Context(self.cfg, self.units, self.shapes, list(choices), stats=self.calib.stats,
                       allocation_budget=None if self.cfg.wbits is not None else allocation_budget,
                       groups=self.groups(), adapter=self.adapter,
                       calib=self.calib, windows=self.windows, tokenizer=self.tokenizer,
                       expert_profiler=self.expert_profiler, results=self.results)

    def requests(self, ctx: Context, table: SensitivityTable):
        """The method's requests; each is measured into `table` before the next is asked for."""
        return self.method.requests(ctx, table)

    def measure(self, request: Request, table: SensitivityTable) -> None:
        """Profile the request (its units x choices, or exactly its (unit, choice) pairs) with the run's metric
        into `table`; `whole_expert`: BT-MoE's joint perturbation of all blocks of an expert (see profile.py).
        Seconds add up in `results["profile_seconds"]` over requests; with the expert metric, requests share
        one `ExpertProfiler` (its reference forwards and prepared Hessians), so adaptive rounds do not redo them."""
        from ..profile import profile

        cfg = self.cfg
        before = self.results.get("profile_seconds", 0.0)
        inputs = self._profile_inputs()
        kw = {"act_clip": cfg.act_clip} if cfg.act_clip != 1.0 else {}
        units, choices, pairs, whole_expert = list(request.units), list(request.choices), request.pairs, request.whole_expert
        stats = self.calib.stats
        t0 = time.perf_counter()
        if cfg.metric == "expert" and not whole_expert:
            todo = list(pairs) if pairs is not None else [(u, c) for u in units for c in choices]
            self.expert_profiler().measure(todo, table, self.progress)
        elif pairs is not None:
            for c in dict.fromkeys(c for _, c in pairs):
                profile(self.adapter, cfg.metric, [u for u, pc in pairs if pc == c], [c], stats, inputs,
                        windows=self.windows, act_order=cfg.act_order, table=table, progress=self.progress,
                        whole_expert=whole_expert, **kw)
        else:
            profile(self.adapter, cfg.metric, units, choices, stats, inputs, windows=self.windows,
                    act_order=cfg.act_order, table=table, progress=self.progress, whole_expert=whole_expert, **kw)
        self.results["profile_seconds"] = round(before + time.perf_counter() - t0, 4)
        self.results["profiled_units"] = self.results.get("profiled_units", 0) + len(units)

    def _profile_inputs(self):
        """`calib.profile_inputs()`, made once per calibration (under --holdout it builds new tensors)."""
        cached = getattr(self, "_profile_inputs_of", None)
        if cached is None or cached[0] is not self.calib:
            cached = self._profile_inputs_of = (self.calib, self.calib.profile_inputs())
        return cached[1]

    def expert_profiler(self):
        """The run's `ExpertProfiler` on the profiling inputs (one per calibration, shared by every
        measure() call of the expert metric)."""
        from ..expert_profiler import ExpertProfiler

        inputs = self._profile_inputs()
        prof = getattr(self, "_profiler", None)
        if prof is None or prof.inputs is not inputs:
            prof = self._profiler = ExpertProfiler(self.adapter, inputs, self.cfg.act_order, self.cfg.act_clip)
        return prof

    def fill_table(self, choices: list[Choice]) -> SensitivityTable:
        """The method's sensitivity table (its requests measured, then completed), saved as table.csv when
        it holds measurements."""
        table_p = self.run.path("table.csv")
        if self.run.verified("table.csv"):
            return SensitivityTable.from_csv(table_p)
        self.results["profile_seconds"] = 0.0  # measure() adds up; an interrupted attempt's seconds do not count
        self.results.pop("profiled_units", None)
        ctx, table = self.context(choices), self.new_table(choices)
        try:
            for request in self.requests(ctx, table):
                self.measure(request, table)
            table = self.method.complete(ctx, table)
        finally:
            self._profiler = None  # its caches (reference forwards, Hessians) are of no use after this stage
        if not table.complete:
            raise RuntimeError(f"method {self.method.name!r} left {int((~np.isfinite(table.error)).sum())} "
                               "table entries unknown")
        if self.method.profiles:
            table.to_csv(table_p)
            self.run.record("table.csv")
        self.results.setdefault("profile_seconds", 0.0)
        self._save_results()
        return table

    def budget(self, choices: list[Choice], frequency: np.ndarray | None) -> Budget:
        return make_budget(self.cfg, self.units, self.shapes, choices, frequency)

    def groups(self) -> np.ndarray | None:
        return structure_groups(self.cfg.granularity_name, self.cfg.tie_gate_up, self.units, self.cfg.target)

    def allocate(self, choices: list[Choice], table: SensitivityTable) -> Plan:
        plan_p = self.run.path("plan.json")
        if self.run.verified("plan.json"):
            return self.load_plan(plan_p, choices, table)
        cfg = self.cfg
        attn = cfg.attention_choice()
        meta = {"method": cfg.method, "granularity": cfg.granularity_name, "tie_gate_up": cfg.tie_gate_up,
                "model": cfg.model, "attention": None if attn is None else attn.to_dict()}
        if any(c.quantizes_acts for c in choices):  # what reloading needs to reproduce the activations
            meta["act_quant"] = {"scheme": "per-token symmetric", "clip": cfg.act_clip}
        if cfg.target != "none":
            meta["target"] = cfg.target
        if self.rotation is not None:  # the plan's units are the rotated model's
            meta["rotation"] = self.rotation.to_dict()
        if cfg.solver_name == "lagrangian":  # greedy fill (moebits) or bisection only (Algorithm 1)
            meta["fill"] = cfg.fill
        if cfg.budget_request()[0] == "wbits":  # no budget: the user fixed the code width
            choice = Choice(cfg.wbits, cfg.group_size, cfg.quantizer, act_bits=cfg.abits or 16)
            plan = Plan.uniform(self.units, self.shapes, choice, {**meta, "solver": "wbits",
                                                                  "budget": {"wbits": cfg.wbits}},
                                zero_points=cfg.zero_points)
            plan.meta["avg_bits"] = plan.avg_bits(self.shapes)
            self.results["allocate_seconds"] = 0.0
            self._note(f"--wbits {cfg.wbits}: {choice.label} for every unit, {plan.meta['avg_bits']:.4f} average "
                       "storage bits per weight (group metadata included)")
        else:
            ctx = self.context(choices)
            budget = ctx.budget
            options = self.method.solver_options(ctx, table, budget)
            plan = self.timed("allocate_seconds", lambda: plan_under_budget(
                table, budget, cfg.solver_name, groups=self.groups(), meta=meta, **options))
            if cfg.solver_name == "ilp" and plan.meta.get("optimal") is False and plan.meta.get("gap") is not None:
                self._note(f"ilp: HiGHS stopped at --ilp-nodes {cfg.ilp_nodes} with the best plan it found, proven "
                           f"within {plan.meta['gap']:.3%} of the optimum (raise --ilp-nodes, or 0, to prove more)")
            if cfg.solver_name == "uniform":
                from ..allocate.uniform import explain

                column = choices.index(plan.choice(self.units[0]))
                plan.meta["note"] = explain(budget.cost, budget.total, choices, column,
                                            [self.shapes[u] for u in self.units], budget.describe, budget.zero_points)
                self._note(plan.meta["note"])
        if cfg.target == "vllm":  # --- serving target (issue 9): the plan must be servable
            from ..export.vllm_rules import vllm_problems

            problems = vllm_problems(plan, self.shapes)
            if problems:
                raise ValueError("--target vllm: this plan is not servable by vLLM: " + "; ".join(problems))
        plan.save(plan_p)
        self.run.record("plan.json")
        self._save_results()
        return plan

    def load_plan(self, plan_p: Path, choices: list[Choice], table: SensitivityTable) -> Plan:
        """The plan of an interrupted run, checked against the run's units, candidates, structure and budget."""
        from ..plan import check_loaded_plan

        plan = Plan.load(plan_p)
        if plan.zero_points != self.cfg.zero_points:
            from ..plan import PlanError

            raise PlanError(f"{plan_p}: the plan stores zero points as {plan.zero_points!r}, this run as "
                            f"{self.cfg.zero_points!r}; delete {plan_p} to allocate again (or restore it)")
        if self.cfg.budget_request()[0] == "wbits":
            wb = Choice(self.cfg.wbits, self.cfg.group_size, self.cfg.quantizer, act_bits=self.cfg.abits or 16)
            check_loaded_plan(plan, plan_p, self.units, [wb])
        else:  # a latency-fri budget would be re-measured (noisy): its plan is checked without the budget
            budget = None if self.cfg.cost == "latency-fri" and self.cfg.latency is not None else \
                self.budget(choices, table.frequency)
            check_loaded_plan(plan, plan_p, self.units, choices, budget, self.groups())
        return plan

    def warn_seqlen(self) -> None:
        from ..data import seqlen_warnings

        for line in seqlen_warnings(self.model.config, calib_seqlen=self.cfg.calib_seqlen,
                                    eval_seqlen=self.cfg.eval_seqlen):
            log.warning(line)
            self._note(line)

    def _note(self, line: str) -> None:
        """A line the user should read (printed by the CLI, kept in results.json)."""
        log.info(line)
        notes = self.results.setdefault("notes", [])
        if line not in notes:
            notes.append(line)

    def quantize(self, plan: Plan) -> None:
        t0 = time.perf_counter()
        attn = self.cfg.attention_choice()
        hessians = None
        if attn is not None and attn.quantizer == "gptq":  # inputs of the unquantized model, like the experts'
            hessians = attention_hessians(self.adapter, self.windows, self.cfg.batch_size)
        self.codes = {} if self.cfg.save_model and self.cfg.save_format == "packed" else None
        if self.cfg.qat_steps > 0:  # fine-tune under the plan; leaves the model quantized by it (RTN grid)
            from ..qat import quantization_aware_training

            res = quantization_aware_training(self.adapter, plan, self.windows, self.cfg.qat_steps, self.cfg.qat_lr,
                                              seed=self.cfg.seed, progress=self.progress, codes=self.codes)
            self.results["qat"] = res.to_dict()
        else:
            apply_plan(self.adapter, plan, self.calib.inputs, self.cfg.act_order, self.progress, codes=self.codes)
        if attn is not None:
            quantize_attention(self.adapter, attn, hessians, self.cfg.act_order)
        self.install_act_quant(plan)
        self.results["quantize_seconds"] = round(time.perf_counter() - t0, 4)
        self._save_results()

    def install_act_quant(self, plan: Plan) -> None:
        """Quantize the input activations of the plan's W-A units in every later forward (quant/act.py)."""
        from ..models.act_quant import install_act_quant

        clip = (plan.meta.get("act_quant") or {}).get("clip", self.cfg.act_clip)
        n = install_act_quant(self.model, {u: a.choice.act_bits for u, a in plan.assignments.items()}, clip)
        if n:
            from ..budget import act_bits_average

            freq = self.calib.stats.aligned(self.units).frequency
            self.results["avg_act_bits"] = act_bits_average([plan.choice(u) for u in self.units],
                                                            [self.shapes[u] for u in self.units], freq)
            self.results["act_quant_units"] = n

    def save(self, plan: Plan) -> dict:
        """Save the quantized model under model/ (packed, or dequantized 16-bit); return the packed
        format's sizes (`model_bytes`, `expert_bytes`), also when it is not the format written."""
        from ..packed import packed_sizes, save_packed

        cfg, out = self.cfg, self.run.path("model")
        rotation = None if self.rotation is None else self.rotation.to_dict()
        if cfg.save_model and cfg.save_format == "packed":
            return save_packed(self.model, self.adapter, plan, self.codes, out, self.tokenizer, rotation=rotation)
        sizes = packed_sizes(self.model, self.adapter, plan)  # before save_quantized rounds the model to 16 bits
        if cfg.save_model:
            if self.rotation is not None and self.rotation.online_down:  # a plain HF checkpoint runs nothing online
                from ..rotate import fold_online

                fold_online(self.adapter)
            save_quantized(self.model, self.tokenizer, plan, out)
        return sizes

    def precheck_budget(self, choices: list[Choice]) -> None:
        """Fail before calibrating when a storage budget cannot be met (latency needs frequencies)."""
        if self.cfg.target == "vllm":  # --- serving target (issue 9): group size must divide every input width
            from ..export.vllm_rules import vllm_problems

            q = next(c for c in choices if not c.is_fp)
            problems = vllm_problems(Plan.uniform(self.units, self.shapes, q), self.shapes)
            if problems:
                raise ValueError(f"--target vllm cannot be met with --group-size {q.group_size}: {problems[0]}")
        if self.cfg.latency is not None or self.run.has("plan.json") or self.cfg.budget_request()[0] == "wbits":
            return
        self.budget(choices, None).check_feasible(self.cfg.solver_name, self.groups())

    # -- the whole job -------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        if cfg.target == "llamacpp":  # --- serving target (issue 21): a ggml type per GGUF tensor
            from ..gguf.quantize import execute

            return execute(self)
        if self.finished():
            return self.results
        self.load()
        choices = candidate_choices(cfg, self.shapes)
        attn = cfg.attention_choice()
        if attn is not None:  # refuse an impossible attention setting before any work
            check_attention_choice(self.adapter, attn)
        self.precheck_budget(choices)
        self.calibrate()
        self.evaluate("ppl_fp")
        table = self.fill_table(choices)
        plan = self.allocate(choices, table)
        self.quantize(plan)
        self.results.pop("ppl_q", None)  # a quantized model is only ever evaluated right after quantizing
        self.evaluate("ppl_q")
        sizes = self.save(plan)
        unit_bits = plan.storage_bits(self.shapes)
        attn_size = attention_size(self.adapter, attn, plan.zero_points)
        params = sum(p.numel() for p in self.model.parameters())
        other = params - sum(a * b for a, b in self.shapes.values()) - attn_size.params
        model_bits = unit_bits + attn_size.storage_bits + 16 * other  # routers, norms, embeddings, biases: 16-bit
        self.results.update({
            "method": cfg.method, "quantizer": cfg.quantizer, "solver": plan.meta.get("solver"),
            "model": cfg.model, "budget": plan.meta.get("budget"),
            "avg_bits": plan.avg_bits(self.shapes), "weight_bytes": unit_bits / 8, "zero_points": plan.zero_points,
            # bytes of the packed checkpoint: every tensor, and the units' codes/scales/zeros/fp16 rows
            "model_bytes": sizes["model_bytes"], "expert_bytes": sizes["expert_bytes"],
            "model_format": (cfg.save_format if cfg.save_model else None),
            # what the units, attention at its setting (--attn-bits) and the 16-bit rest cost, counted exactly
            "attention": "fp16" if attn is None else attn.label, "attention_bytes": attn_size.storage_bits / 8,
            "model_counted_bytes": model_bits / 8, "model_avg_bits": model_bits / params,
            "bits_histogram": plan.bits_histogram(),
        })
        return self.finish_results()

    def finish_results(self) -> dict:
        """Close a finished run's results (every target writes them this way): evaluation seconds, experts never
        routed, every stage's seconds (0 when skipped), done; saved atomically."""
        self.results.update({
            "eval_seconds": self.results.get("ppl_fp_eval_seconds", 0) + self.results.get("ppl_q_eval_seconds", 0),
            "never_routed": len(self.calib.never_routed), "done": True,
        })
        for k in ("calibrate_seconds", "profile_seconds", "allocate_seconds", "quantize_seconds"):
            self.results.setdefault(k, 0.0)
        self._save_results()
        return self.results

    def _save_results(self) -> None:
        atomic_write_json(self.run.path("results.json"), self.results)
        self.run.record("results.json")

    def finished(self) -> bool:
        """A done run whose saved model is still there (a deleted model/ is re-quantized on resume)."""
        if not self.results.get("done"):
            return False
        self.run.verify_all()  # a done run's cached files: as written, or refused by name
        if self.results.get("model_format") and not (self.run.path("model") / "config.json").is_file():
            log.warning("%s: the run is done but its model/ is missing: quantizing again", self.run.root)
            self.results.pop("done")
            return False
        return True
